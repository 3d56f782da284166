#!/usr/bin/env python3
"""Runs two builds of the `ctxcomp` tool over every fixture and compares their outputs bit for bit.

For refactors that must keep the results ("same bits"): build the old and the new tool, then

    python3 tests/compare_cli_outputs.py OLD/examples/ctxcomp NEW/examples/ctxcomp

Every IC-Former, sentinel, SAC and checkpoints fixture goes through `icformer`, `fold` and `sac`
(fp32 and bf16 compute, every --kv-layout, 1 and 2 threads) and through `demo --json`; the
tensors of each pair of output files must be byte-identical (metadata that names the run, such
as timings, is not compared). `--ignore FIELD` (repeatable, before the two paths) leaves a demo
JSON field out whose meaning changed on purpose. Prints one line per run and exits 1 on the first
difference.
"""
import json
import os
import pathlib
import struct
import subprocess
import sys
import tempfile

FX = pathlib.Path(__file__).resolve().parent / "data" / "fixtures"


def read(path):
    """(header, body) of a safetensors file: the JSON header and the bytes after it."""
    data = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def metadata(path):
    """The __metadata__ strings of a safetensors file."""
    return read(path)[0].get("__metadata__", {})


def tensors(path):
    """{name: (dtype, shape, bytes)} of a safetensors file."""
    header, body = read(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = (info["dtype"], tuple(info["shape"]), body[a:b])
    return out


def runs():
    """(label, arguments with {out} for the output file) of every fixture run."""
    llama = FX / "models" / "llama"
    for c in ("icformer_basic", "icformer_chunked", "icformer_gqa_selfattn"):
        d = FX / "icformer" / c
        meta = metadata(d / "case.safetensors")
        base = (
            f"icformer --checkpoint {d}/model --digests {d}/case.safetensors --input {d}/case.safetensors "
            f"--output {{out}} --max-chunk-len {meta['max_chunk_len']}"
            + ("" if meta.get("use_chunk") == "True" else " --no-chunk")
        )
        for extra in ("--threads 1", "--threads 2", "--threads 2 --compute bf16"):
            yield f"{c} icformer {extra}", f"{base} {extra}"
    for c in ("sentinel_one_span", "sentinel_three_spans", "sentinel_span_at_start", "sentinel_adjacent_spans"):
        i = FX / "sentinel" / f"{c}.safetensors"
        for sched in ("--fold-every-span", "--fold-at-end"):
            yield f"{c} fold {sched}", f"fold --model {llama} --input {i} --output {{out}} --cl 126 --cr 127 --threads 2 {sched}"
        for layout in ("contiguous", "cells", "paged"):
            yield f"{c} fold --kv-layout {layout}", (
                f"fold --model {llama} --input {i} --output {{out}} --cl 126 --cr 127 --kv-layout {layout} --block-size 5"
            )
    for c in ("sac_basic", "sac_multichunk", "sac_ratio5", "sac_anchor_bidir_multichunk"):
        i = FX / "sac" / f"{c}.safetensors"
        meta = metadata(i)
        base = (
            f"sac --model {llama} --anchor-embeds {i} --input {i} --output {{out}} --chunk-size {meta['chunk_size']} "
            f"--ratio {meta['compress_ratio']} --mask {meta['mask']}"
        )
        for extra in ("--threads 2", "--threads 2 --compute bf16", "--kv-layout cells --block-size 3",
                      "--kv-layout paged --block-size 3"):
            yield f"{c} sac {extra}", f"{base} {extra}"
    sac_in = FX / "sac" / "sac_multichunk.safetensors"
    for c in ("llama3_tied_sharded_bf16", "qwen2_bias_fp16", "qwen3_qknorm_bf16"):
        d = FX / "checkpoints" / c
        yield f"{c} fold", f"fold --model {d}/model --input {d}/case.safetensors --output {{out}} --cl 158 --cr 159 --threads 2"
        yield f"{c} sac", (
            f"sac --model {d}/model --anchor-embeds {sac_in} --input {sac_in} --output {{out}} --chunk-size 24 --ratio 4 --threads 2"
        )


def run(cli, args, out):
    cmd = [cli] + args.format(out=out).split()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout


def main():
    args = sys.argv[1:]
    ignore = set()  # demo JSON fields whose meaning changed on purpose between the two builds
    while len(args) >= 2 and args[0] == "--ignore":
        ignore.add(args[1])
        args = args[2:]
    if len(args) != 2:
        sys.exit(__doc__)
    old, new = args
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        for label, args in runs():
            a, b = os.path.join(tmp, "old.safetensors"), os.path.join(tmp, "new.safetensors")
            run(old, args, a)
            run(new, args, b)
            ta, tb = tensors(a), tensors(b)
            if ta.keys() != tb.keys():
                sys.exit(f"DIFFERENT {label}: tensors {sorted(ta)} vs {sorted(tb)}")
            for name in ta:
                if ta[name] != tb[name]:
                    sys.exit(f"DIFFERENT {label}: tensor {name}")
            print(f"same bits  {label}  ({len(ta)} tensors)")
            n += 1
        demo = [json.loads(run(cli, "demo --tokens 256 --threads 2 --json", "-")) for cli in (old, new)]
        for j in demo:
            for key in [k for k in j if k in ignore or k == "timings_disturbed"]:
                j.pop(key)
            for row in j.get("rows", []):
                for key in [k for k in row if k in ignore or any(t in k for t in ("seconds", "_ms", "per_s", "spread"))]:
                    row.pop(key)
        if demo[0] != demo[1]:
            sys.exit("DIFFERENT demo --json (timings left out)")
        print("same       demo --json (timings left out)")
    print(f"{n + 1} runs, all the same")


if __name__ == "__main__":
    main()
