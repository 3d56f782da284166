#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets from the fixtures: corpus/<target>/<n>."""
import os
import struct
import sys

fixtures, out = sys.argv[1], sys.argv[2]


def write(target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


n = 0
for root, _, files in os.walk(fixtures):
    for f in sorted(files):
        path = os.path.join(root, f)
        if f.endswith(".safetensors") and os.path.getsize(path) <= 64 << 10:
            write("safetensors", "seed%d" % n, open(path, "rb").read())
        elif f.endswith(".json") and f != "report.json":
            write("config", "seed%d" % n, open(path, "rb").read())
        n += 1

# Token streams: 0 = <CL>, 1 = <CR>, others ordinary; 0x80 ends a piece.
streams = [b"\x02\x03\x00\x04\x05\x01\x06", b"\x02\x00\x03\x80\x04\x01\x02\x00\x05\x80\x01",
           b"\x00\x00", b"\x01", b"\x02" * 40 + b"\x00" + b"\x03" * 20 + b"\x01" + b"\x80\x02"]
for i, s in enumerate(streams):
    write("spans", "seed%d" % i, s)
# Anchor plans: int16 tokens, chunk_size, ratio, then int16 anchor tokens (each times 8).
for i, (t, c, r, a) in enumerate([(512, 512, 8, [3, 11, 19]), (1000, 256, 4, [0, 255, 256]), (4000, 512, 8, []), (7, 3, 5, []),
                                   (0, 1, 1, []), (10, 0, 2, [1]), (100, 10, 20, [5, 5])]):
    a8 = [x * 8 for x in a]  # the target divides every int16 by 8
    write("anchor_plan", "seed%d" % i, struct.pack("<3h", t * 8, c * 8, r * 8) + struct.pack("<%dh" % len(a8), *a8))


# GGUF: tiny llama files (hidden 8, 2 heads, 1 layer, ff 32, vocab 10), F32 and one Q8_0 tensor.
def gguf(q8):
    def st(x):
        x = x.encode()
        return struct.pack("<Q", len(x)) + x
    kv = [("general.architecture", 8, st("llama"))]
    for k, v in [("embedding_length", 8), ("block_count", 1), ("feed_forward_length", 32),
                 ("attention.head_count", 2), ("attention.head_count_kv", 2)]:
        kv.append(("llama." + k, 4, struct.pack("<I", v)))
    kv.append(("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", 1e-6)))
    tensors = [("token_embd.weight", [8, 10]), ("output_norm.weight", [8]), ("blk.0.attn_norm.weight", [8]),
               ("blk.0.ffn_norm.weight", [8]), ("blk.0.attn_q.weight", [8, 8]), ("blk.0.attn_k.weight", [8, 8]),
               ("blk.0.attn_v.weight", [8, 8]), ("blk.0.attn_output.weight", [8, 8]), ("blk.0.ffn_gate.weight", [8, 32]),
               ("blk.0.ffn_up.weight", [8, 32]), ("blk.0.ffn_down.weight", [32, 8])]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for k, t, v in kv:
        head += st(k) + struct.pack("<I", t) + v
    data, infos = b"", b""
    for name, ne in tensors:
        n = 1
        for e in ne:
            n *= e
        q = q8 and name == "blk.0.ffn_down.weight"
        blob = b"".join(struct.pack("<e", 0.01) + bytes((i * 7) % 256 for i in range(32)) for _ in range(n // 32)) if q \
            else struct.pack("<%df" % n, *[((i * 37) % 17 - 8) / 16.0 for i in range(n)])
        infos += st(name) + struct.pack("<I", len(ne)) + struct.pack("<%dQ" % len(ne), *ne) + \
            struct.pack("<IQ", 8 if q else 0, len(data))
        data += blob + b"\0" * ((-len(blob)) % 32)
    out = head + infos
    return out + b"\0" * ((-len(out)) % 32) + data


write("gguf", "seed0", gguf(False))
write("gguf", "seed1", gguf(True))
