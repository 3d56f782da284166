#!/usr/bin/env python3
"""Convert the official IC-Former `param.pt` to safetensors for `ctxcomp icformer --digests`.

The official training code saves the learnable digest embeddings and the embeddings that follow
the soft prompt with torch.save({"digest_embeddings": ..., "AE": ..., "FT": ...}, "param.pt"):
AE after pretraining (autoencoding input [soft prompt ; AE ; text]), FT after fine-tuning (the
inference layout [pre ; soft prompt ; FT ; prompt ; post], docs/integration.md section 5). This
writes them as F32 tensors `digest_embeds` [k, hidden], `AE` [1, hidden] and `FT` [1, hidden],
those present (any leading batch dimension of 1 is dropped).
Needs only PyTorch (Debian: python3-torch); the safetensors format is written directly.

    /usr/bin/python3 examples/convert_param_pt.py param.pt digests.safetensors
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_out import write_safetensors  # noqa: E402

NAMES = {"digest_embeddings": "digest_embeds", "AE": "AE", "FT": "FT"}


def as_matrix(name, t):
    t = t.detach().to(torch.float32).cpu().contiguous()
    while t.dim() > 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise SystemExit(f"convert_param_pt: '{name}' has shape {list(t.shape)}, expected [k, hidden]")
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("param_pt", help="official param.pt (a dict with digest_embeddings, and AE and / or FT)")
    ap.add_argument("output", help="safetensors file to write")
    args = ap.parse_args()
    params = torch.load(args.param_pt, map_location="cpu")
    if not isinstance(params, dict):
        raise SystemExit(f"convert_param_pt: {args.param_pt} holds a {type(params).__name__}, expected a dict")
    if "digest_embeddings" not in params:
        raise SystemExit(f"convert_param_pt: {args.param_pt} has no 'digest_embeddings' (keys: {sorted(params)})")
    out = {NAMES[k]: as_matrix(k, params[k]) for k in NAMES if k in params}
    write_safetensors(args.output, [(k, "F32", t.shape, t.numpy().tobytes()) for k, t in out.items()],
                      {"source": "param.pt"})
    for k, t in out.items():
        print(f"{k}: {list(t.shape)}", file=sys.stderr)


if __name__ == "__main__":
    main()
