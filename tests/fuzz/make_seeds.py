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
