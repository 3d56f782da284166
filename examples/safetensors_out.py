"""Writes a safetensors file (the converters' one writer): an 8-byte little-endian header length,
the JSON header (with `__metadata__`, padded with spaces to a multiple of 8), then the tensors'
bytes in order."""
import json
import struct


def write_safetensors(path, entries, metadata):
    """entries: (name, dtype such as "F32" / "BF16", shape, little-endian bytes) in file order."""
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
