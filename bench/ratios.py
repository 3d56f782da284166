#!/usr/bin/env python3
"""Prints each ctxcomp benchmark beside its in-binary baseline from one Google Benchmark JSON run.

Usage: ctxcomp_bench --benchmark_out=run.json --benchmark_out_format=json ...
       python3 bench/ratios.py run.json

For every benchmark that has a baseline in the same run it prints one line: the ratio, what it
divides, and both figures; then every multi-thread benchmark `<name>_t<N>` (thread counts from
CTXCOMP_BENCH_THREADS, default 1,2) against `<name>` at one thread: the scaling. With repetitions, medians are used (aggregates "median"; otherwise the
single run). It only prints: no thresholds, no exit status from timings (CI runs it on a smoke
run whose shapes are shrunk).
"""
import json
import re
import signal
import sys

# (regex on the benchmark name, function of the match giving the baseline name, metric, meaning)
# metric "time": baseline time / time (a speed-up); otherwise counter value / baseline value.
RULES = [
    (r"^attention/fused/(cross_128x640|causal_\d+|decode_4096)(_t\d+)?$",
     lambda m: f"attention/naive/{m[1]}", "time", "fused vs naive Eigen attention (speed-up)"),
    (r"^attention/fused/(decode\w*_4096)_(fp16|bf16|int8)(_t\d+)?$",
     lambda m: f"memread/baseline/{m[1]}_{m[2]}{m[3] or ''}", "GBps", "decode read bandwidth vs memread"),
    (r"^attention/fused/(decode_4096_fp16)_hugepages$", lambda m: f"attention/fused/{m[1]}", "time",
     "decode with K/V on 2 MB pages (HugePageAllocator) vs the standard allocator (speed-up)"),
    (r"^attention/fused/(causal_2048)_(fp16|bf16|int8)(_t\d+)?$",
     lambda m: f"attention/fused/{m[1]}{m[3] or ''}", "GFLOPS", "typed-cache prefill vs fp32"),
    (r"^attention/fused/(decode\w*_4096)_int8(_t\d+)?$",
     lambda m: f"attention/fused/{m[1]}_fp16{m[2] or ''}", "time", "int8 vs fp16 decode (speed-up)"),
    (r"^attention/fused_bf16/(\w+?)(_t\d+)?$",
     lambda m: f"attention/fused/{m[1]}{m[2] or ''}", "GFLOPS", "bf16 compute vs fp32 attention"),
    (r"^gemm/ctxcomp_bf16dot/(.*)$", lambda m: f"gemm/ctxcomp_fp32/{m[1]}", "GFLOPS",
     "bf16 compute GEMM vs fp32 GEMM"),
    # AMX builds (amx preset): the bf16 compute path with AMX tiles vs the same with AMX off
    (r"^attention/fused_bf16/(\w+?)(_t\d+)?$",
     lambda m: f"attention/fused_bf16_noamx/{m[1]}{m[2] or ''}", "GFLOPS", "bf16 attention: AMX vs AVX512-BF16"),
    (r"^gemm/ctxcomp_bf16dot/(.*)$", lambda m: f"gemm/ctxcomp_bf16dot_noamx/{m[1]}", "GFLOPS",
     "bf16 GEMM: AMX vs AVX512-BF16"),
    (r"^icformer/bf16dot/chunk512(_t\d+)?$", lambda m: f"icformer/bf16dot_noamx/chunk512{m[1] or ''}", "time",
     "IC-Former bf16 compute: AMX vs AVX512-BF16 (speed-up)"),
    (r"^icformer/bf16dot/chunk512(_t\d+)?$", lambda m: f"icformer/fp32/chunk512{m[1] or ''}", "time",
     "IC-Former bf16 compute vs fp32 (speed-up)"),
    (r"^sac/compress_layer/(chunk\d+)/anchor_r8_bf16dot(_t\d+)?$",
     lambda m: f"sac/compress_layer/{m[1]}/anchor_r8{m[2] or ''}", "time",
     "SAC layer compression, bf16 compute vs fp32 (speed-up)"),
    (r"^attention/paged/(\w+?_fp16)(_nhd|_p64)?$",
     lambda m: f"attention/fused/{m[1]}", "time", "paged vs contiguous attention (speed-up; >= 0.95 wanted)"),
    (r"^attention/paged/(decode_4096_fp16)(_nhd|_p64)?$",
     lambda m: f"memread/paged/{m[1]}{'_p64' if m[2] == '_p64' else ''}", "GBps",
     "paged decode read bandwidth vs memread through the same page tables (NHD: beside the HND read of 16-token pages)"),
    (r"^attention/paged/(decode_4096_fp16)_cached$", lambda m: f"attention/fused/{m[1]}_cached", "time",
     "paged vs contiguous decode, both from the last-level cache (speed-up; the compute alone)"),
    (r"^attention/paged/(decode_4096_fp16)_hugepages$", lambda m: f"attention/fused/{m[1]}_hugepages", "time",
     "paged vs contiguous decode, both on 2 MB pages (speed-up; the gap without the TLB)"),
    (r"^memread/paged/(decode_4096_fp16)(_p64)?$", lambda m: f"memread/baseline/{m[1]}", "GBps",
     "reading a shuffled page pool vs one sequential pass (the memory system's own paged cost)"),
    (r"^attention/fused/(decode_4096)_int8_cached$", lambda m: f"attention/fused/{m[1]}_fp16", "time",
     "int8 decode from the last-level cache vs fp16 decode from memory (speed-up; the int8 target asks >= 1.67 "
     "from memory, which this compute floor bounds)"),
    (r"^attention/fused/(decode_4096_(?:fp16|int8))$", lambda m: f"attention/fused/{m[1]}_cached", "time",
     "decode from memory vs from the last-level cache (speed-up; the share of the compute floor reached)"),
    (r"^attention/cells/(decode_4096_fp16)$", lambda m: f"attention/cells/{m[1]}_compacted", "time",
     "cell cache with holes vs its live cells compacted (speed-up; the cost of the holes)"),
    (r"^attention/cells/(decode_4096_fp16)$", lambda m: f"attention/fused/{m[1]}", "time",
     "cell cache with holes vs attention/fused over a compacted cache (speed-up)"),
    (r"^attention/decode_folded/(.*)$",
     lambda m: f"attention/decode_unfolded/{m[1]}", "time", "folded vs unfolded decode (speed-up)"),
    (r"^kv/fold_span/(\w+)_16384_fp16$", lambda m: f"kv/fold_span/{m[1]}_4096_fp16", "time",
     "folding a just-closed span at 16384 vs 4096 cached tokens (speed-up; ~1 = does not grow)"),
    (r"^kv/fold_span/cells_(\d+)_fp16$", lambda m: f"kv/fold_span/cells_scan_{m[1]}_fp16", "time",
     "cell fold given the span's cells vs scanning every cell for them (speed-up)"),
    (r"^kv/evict/(.*)$", lambda m: f"memcpy/baseline_same_runs/evict_{m[1]}", "GBps",
     "eviction vs memcpy of the same runs"),
    (r"^kernels/tile_gemm_nt/(\w+)_(fp32|fp16|int8)$", lambda m: f"kernels/eigen_fp32/qk_{m[1]}", "time",
     "decode Q*K^T kernel in cache vs Eigen fp32 (speed-up)"),
    (r"^kernels/tile_gemm/(\w+)_(fp32|fp16|int8)$", lambda m: f"kernels/eigen_fp32/pv_{m[1]}", "time",
     "decode P*V kernel in cache vs Eigen fp32 (speed-up)"),
    (r"^kernels/widen_transposed/(\w+)$", lambda m: f"kernels/widen_transposed_scalar/{m[1]}", "time",
     "K tile widened and transposed in registers vs element by element (speed-up)"),
    (r"^gemm/ctxcomp_(fp32|bf16)/(.*)$", lambda m: f"gemm/eigen_fp32/{m[2]}", "time",
     "ctxcomp GEMM vs Eigen (speed-up)"),
    (r"^icformer/(fp32|bf16)/chunk512(_t\d+)?$",
     lambda m: f"icformer/llama7b_layer_baseline/n640{m[2] or ''}", "time",
     "IC-Former chunk vs one Llama-7B layer over the same context (speed-up)"),
    (r"^sac/compress_layer/(chunk\d+)/((?:full|anchor)_r\d+)(_t\d+)?$",
     lambda m: f"sac/compress_layer/{m[1]}/causal_prefill{m[3] or ''}", "time",
     "SAC layer compression vs causal prefill (speed-up)"),
    (r"^sac/llama32_1b/compress_2040_r5(_t\d+)?$",
     lambda m: f"sac/llama32_1b/prefill_2040{m[1] or ''}", "time", "SAC compression vs plain prefill (speed-up)"),
    (r"^sac/llama32_1b/compress_2040_r5_bf16dot(_t\d+)?$",
     lambda m: f"sac/llama32_1b/compress_2040_r5{m[1] or ''}", "time",
     "SAC compression, bf16 compute vs fp32 (speed-up)"),
    (r"^sac/llama32_1b/decode_compressed$", lambda m: "sac/llama32_1b/decode_full", "time",
     "decode over the SAC cache vs the full cache (speed-up)"),
    # Beside stock llama.cpp (bench_llamacpp.cpp, built in the llamacpp preset), same model and threads
    (r"^sac/llama32_1b/(compress_2040_r5(?:_bf16dot)?|prefill_2040)(_t\d+)?$",
     lambda m: f"llamacpp/prefill/2040{m[2] or ''}", "context_tokens_per_s",
     "ctxcomp vs llama.cpp's own prefill of the same context, context tokens/s (compress_2040_r5_bf16dot: "
     ">= 1.2 wanted)"),
    (r"^sac/llama32_1b/compress_2040_r5(_t\d+)?$", lambda m: "llamacpp/load_state/sac_r5", "time",
     "writing the SAC cache into llama.cpp as a share of compressing it (load time / compression time; "
     "<= 0.05 wanted)"),
    (r"^llamacpp/decode/(sac_r5|sentinel_half)_(\d+)(_t\d+)?$",
     lambda m: f"llamacpp/decode/full_{m[2]}{m[3] or ''}", "time",
     "llama.cpp decode over a compressed cache vs the full one (speed-up)"),
    (r"^llamacpp/decode/(sac_r5|sentinel_half)_(\d+)(_t\d+)?$",
     lambda m: f"llamacpp/decode/full_{m[2]}{m[3] or ''}", "kv_cache_bytes",
     "llama.cpp KV cache bytes, compressed vs full"),
    (r"^sac/decode/(ctx\d+)_r(\d+)$", lambda m: f"sac/decode/{m[1]}_uncompressed", "time",
     "decode attention over anchors vs the full cache (speed-up)"),
]


def load(path):
    with open(path) as f:
        data = json.load(f)
    runs = {}
    has_median = any(b.get("aggregate_name") == "median" for b in data["benchmarks"])
    for b in data["benchmarks"]:
        if has_median and b.get("aggregate_name") != "median":
            continue
        if not has_median and b.get("run_type") == "aggregate":
            continue
        name = b.get("run_name", b["name"])
        name = re.sub(r"(/real_time|/iterations:\d+)+$", "", name)
        runs[name] = b
    return runs


def value(b, metric):
    if metric == "time":
        return b["real_time"]
    v = b.get(metric)
    return float(v) if v is not None else None


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    runs = load(sys.argv[1])
    printed = 0
    for name in sorted(runs):
        for pattern, base_of, metric, meaning in RULES:
            m = re.match(pattern, name)
            if not m:
                continue
            base = base_of(m)
            if base not in runs:
                continue
            a, b = value(runs[name], metric), value(runs[base], metric)
            if a is None or b is None or a == 0 or b == 0:
                continue
            ratio = b / a if metric == "time" else a / b
            unit = runs[name].get("time_unit", "") if metric == "time" else metric
            print(f"{ratio:7.3f}  {name}  /  {base}  [{meaning}; {a:.4g} vs {b:.4g} {unit}]")
            printed += 1
    # Thread scaling: every `<name>_t<N>` against `<name>` (one thread) of the same run.
    for name in sorted(runs, key=scaling_key):
        m = re.match(r"^(.*)_t(\d+)$", name)
        if not m or m[1] not in runs:
            continue
        if name.startswith("peak/"):  # a peak runs one loop per thread: its rate scales, not its time
            a, b = value(runs[name], "GFLOPS"), value(runs[m[1]], "GFLOPS")
            if not a or not b:
                continue
            print(f"{a / b:7.3f}  {name}  /  {m[1]}  [{m[2]} threads vs 1 (the cores' own FMA / pair-dot "
                  f"peak scaling); {a:.4g} vs {b:.4g} GFLOPS]")
            printed += 1
            continue
        a, b = value(runs[name], "time"), value(runs[m[1]], "time")
        if not a or not b:
            continue
        what = "the memory system's own scaling" if name.startswith(("memread/", "memcpy/")) else "speed-up"
        print(f"{b / a:7.3f}  {name}  /  {m[1]}  [{m[2]} threads vs 1 ({what}); {a:.4g} vs {b:.4g} "
              f"{runs[name].get('time_unit', '')}]")
        printed += 1
    print(f"{printed} ratios from {len(runs)} benchmarks")


def scaling_key(name):
    """Sorts `x_t2`, `x_t8`, `x_t16` by name, then by thread count."""
    m = re.match(r"^(.*)_t(\d+)$", name)
    return (m[1], int(m[2])) if m else (name, 0)


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `ratios.py run.json | head` ends quietly, not with a traceback
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
