#!/usr/bin/env python3
"""Writes adapter.pt as SAC's `save_adapter` does (lx-Meteors/SAC, model/modeling.py): torch.save
of the compressing copy's trainable state — `role_tokens` [mem, d] and `special_tokens` [2, d]
(nn.Parameter), and per layer the LinearLoraLayer matrices of q_proj and v_proj,
`model.model.layers.N.self_attn.{q,v}_proj.lora_A` [in, r] and `.lora_B` [r, out] in bf16 — for
the fixture llama model (hidden 64, 2 layers, q 64 -> 64, v 64 -> 32), r 4, random non-zero.
One lora_A is saved as a transposed view (non-contiguous strides), as a reader must handle.
Also writes adapter_expected.safetensors: every tensor as F32 under the converter's names, for
tests/anchor/test_sac_adapter.cpp. Run where PyTorch and safetensors are installed:

    python3 tests/data/sac_adapter/make_adapter_pt.py tests/data/sac_adapter
"""
import collections
import os
import sys

import torch
from safetensors.torch import save_file

out = sys.argv[1]
g = torch.Generator().manual_seed(7)
state = collections.OrderedDict()
state["role_tokens"] = torch.nn.Parameter(torch.randn(16, 64, generator=g) * 0.05)
state["special_tokens"] = torch.nn.Parameter(torch.randn(2, 64, generator=g) * 0.05)
expected = {"role_tokens": state["role_tokens"].detach().clone(), "special_tokens": state["special_tokens"].detach().clone()}
for layer in range(2):
    for name, width in (("q_proj", 64), ("v_proj", 32)):
        key = f"model.model.layers.{layer}.self_attn.{name}"
        if layer == 1 and name == "q_proj":  # a transposed view: strides (1, 64)
            a = (torch.randn(4, 64, generator=g) * 0.3).to(torch.bfloat16).t()
        else:
            a = (torch.randn(64, 4, generator=g) * 0.3).to(torch.bfloat16)
        b = (torch.randn(4, width, generator=g) * 0.3).to(torch.bfloat16)
        state[key + ".lora_A"] = torch.nn.Parameter(a, requires_grad=True)
        state[key + ".lora_B"] = torch.nn.Parameter(b, requires_grad=True)
        expected[f"layers.{layer}.{name}.lora_A"] = a.detach().float().contiguous()
        expected[f"layers.{layer}.{name}.lora_B"] = b.detach().float().contiguous()
os.makedirs(out, exist_ok=True)
torch.save(state, os.path.join(out, "adapter.pt"))
save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(out, "adapter_expected.safetensors"))
print("wrote", os.path.join(out, "adapter.pt"), "and adapter_expected.safetensors;", torch.__version__)
