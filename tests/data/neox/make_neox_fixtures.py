#!/usr/bin/env python3
"""GPT-NeoX fixtures for ctxcomp (issue 33): what the sentinel-token training script
(DRSY/KV_Compression, run_clm_kv_compression.py) leaves behind, on tiny random models, with the
expected outputs from transformers' own GPTNeoXForCausalLM (eager attention) in float64.

Run where torch, transformers (5.x), peft and tokenizers are installed, from the repository root:

    python3 tests/data/neox/make_neox_fixtures.py tests/data/neox

Every case directory holds `case.safetensors` in the sentinel format of the checkpoints fixtures
(tests/data/fixtures/README.md): `input_ids`, `attention_mask` [n, n] (1 = visible),
`position_ids`, `kept_index`, `logits` F64, `logits_f32run` F32, `layer{i}_k` / `layer{i}_v`
[heads, m, head_dim] F64 (keys after RoPE) of the kept tokens; metadata `cl_id`, `cr_id` and a
description. The mask and the positions follow the official rules; `official_mask` below is
checked against every sentinel fixture of tests/data/fixtures before anything is written.

Cases (hidden 64, 4 heads of 16, 2 layers, intermediate 256, LayerNorm eps 1e-5, exact GELU,
attention biases, untied embed_out; the base vocabulary has 128 tokens, `<CL>` / `<CR>` are
added as 128 / 129 with `tokenizer.add_tokens(..., special_tokens=False)` and
`resize_token_embeddings`, and the input embeddings are trained, as the script does):
- `neox_parallel_rot25_peft`: rotary_pct 0.25 (4 of 16 dims rotate), use_parallel_residual
  true, config in the transformers-5 layout (`rope_parameters` with `partial_rotary_factor`).
  `model/` is the resized base checkpoint; `adapter/` is what `PeftModel.save_pretrained` writes
  for LoRA r 4, alpha 8, targets `query_key_value` and `dense` (random non-zero A and B), with
  the tokenizer files (tokenizer.json, tokenizer_config.json) carrying the added tokens.
  Expected: the PEFT model loaded from those files, merged (`merge_and_unload`), in float64.
- `neox_parallel_rot25_peft_vocab`: as the first, but `model/` is the base before the vocabulary
  grew (128 tokens) and the adapter was saved with `save_embedding_layers=True`: it carries the
  resized, trained `gpt_neox.embed_in` and the output layer (which PEFT names `lm_head`, the
  module's name in transformers 5). Expected: the base reloaded, resized, the adapter loaded by
  PEFT and merged, in float64.
- `neox_sequential_rot100_injected`: rotary_pct 1.0, use_parallel_residual false, config in the
  older layout (top-level `rotary_pct` / `rotary_emb_base`, as RedPajama-INCITE-Base-3B-v1's).
  `model/` is the LoRA-injected checkpoint (`base_model.save_pretrained`: `base_layer`,
  `lora_A.default`, `lora_B.default` keys) with adapter_config.json and the tokenizer files in
  the same directory. Expected: the merged model, in float64.
"""
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import transformers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast
import peft
from tokenizers import Tokenizer, models, pre_tokenizers

BASE_VOCAB = 128
CL, CR = BASE_VOCAB, BASE_VOCAB + 1


def official_mask(ids, cl, cr):
    """The sentinel mask and position ids by the rules of tests/data/fixtures/README.md."""
    n = len(ids)
    span = [-1] * n  # span number of <CL>, inner tokens and <CR>
    role = ["o"] * n
    s, open_ = -1, False
    for i, t in enumerate(ids):
        if t == cl:
            assert not open_
            s += 1
            open_ = True
            role[i], span[i] = "L", s
        elif t == cr:
            assert open_
            role[i], span[i] = "R", s
            open_ = False
        elif open_:
            role[i], span[i] = "i", s
    mask = torch.zeros(n, n, dtype=torch.int64)
    for q in range(n):
        for k in range(q + 1):
            if role[q] == "L":
                ok = k == q
            elif role[q] == "R":
                ok = span[k] == span[q]
            else:
                outside = role[k] == "o" or role[k] == "R"
                ok = outside or k == q or (role[q] == "i" and role[k] == "i" and span[k] == span[q])
            mask[q, k] = int(ok)
    pos, p = [], -1
    for i, t in enumerate(ids):
        if t in (cl, cr):
            pos.append(max(p, 0))
        else:
            p += 1
            pos.append(p)
    kept = [i for i in range(n) if role[i] in ("o", "R")]
    return mask, torch.tensor(pos, dtype=torch.int64), torch.tensor(kept, dtype=torch.int64)


def check_rules_against_fixtures(root):
    d = os.path.join(root, "tests/data/fixtures/sentinel")
    for f in sorted(os.listdir(d)):
        with safe_open(os.path.join(d, f), "pt") as st:
            ids = st.get_tensor("input_ids").tolist()
            cl, cr = int(st.metadata()["cl_id"]), int(st.metadata()["cr_id"])
            m, p, k = official_mask(ids, cl, cr)
            assert torch.equal(m, st.get_tensor("attention_mask")), f
            assert torch.equal(p, st.get_tensor("position_ids")), f
            assert torch.equal(k, st.get_tensor("kept_index")), f
    print("official_mask reproduces", len(os.listdir(d)), "sentinel fixtures")


def tokenizer_with_sentinels():
    vocab = {f"w{i}": i for i in range(BASE_VOCAB)}
    vocab["[UNK]"] = 0
    vocab = {k: v for k, v in vocab.items() if not (k == "w0")}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    added = fast.add_tokens(["<CL>", "<CR>"], special_tokens=False)
    assert added == 2 and fast.convert_tokens_to_ids(["<CL>", "<CR>"]) == [CL, CR], fast.convert_tokens_to_ids(["<CL>", "<CR>"])
    return fast


def stream(g):
    """A token stream with four spans (lengths 1, 3, 6, 2), one at the start, two adjacent."""
    def words(k):
        return torch.randint(0, BASE_VOCAB, (k,), generator=g).tolist()
    ids = [CL] + words(3) + [CR] + words(5) + [CL] + words(1) + [CR] + words(4)
    ids += [CL] + words(6) + [CR] + [CL] + words(2) + [CR] + words(6)
    return ids


def run(model, ids, mask, pos, dtype):
    model = model.to(dtype).eval()
    n = len(ids)
    add = torch.zeros(1, 1, n, n, dtype=dtype)
    add.masked_fill_(mask.view(1, 1, n, n) == 0, torch.finfo(dtype).min)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), attention_mask=add, position_ids=pos.view(1, n), use_cache=True)
    return out.logits[0], out.past_key_values


def causal_sanity(model, ids):
    """The 4-D additive mask path equals the model's own causal path (the mask is honoured)."""
    n = len(ids)
    m = torch.tril(torch.ones(n, n, dtype=torch.int64))
    a, _ = run(model, ids, m, torch.arange(n), torch.float64)
    with torch.no_grad():
        b = model(input_ids=torch.tensor([ids])).logits[0]
    assert torch.allclose(a, b, rtol=0, atol=1e-12), (a - b).abs().max()


def write_case(out_dir, model, ids, description, report, name):
    mask, pos, kept = official_mask(ids, CL, CR)
    causal_sanity(model, ids)
    logits, cache = run(model, ids, mask, pos, torch.float64)
    logits32, _ = run(model, ids, mask, pos, torch.float32)
    t = {"input_ids": torch.tensor(ids, dtype=torch.int64), "attention_mask": mask, "position_ids": pos,
         "kept_index": kept, "logits": logits.contiguous(), "logits_f32run": logits32.contiguous()}
    for i, layer in enumerate(cache.layers):
        t[f"layer{i}_k"] = layer.keys[0][:, kept, :].contiguous()
        t[f"layer{i}_v"] = layer.values[0][:, kept, :].contiguous()
    meta = {"cl_id": str(CL), "cr_id": str(CR), "architecture": "GPTNeoXForCausalLM", "description": description,
            "transformers": transformers.__version__, "torch": torch.__version__, "peft": peft.__version__}
    save_file(t, os.path.join(out_dir, "case.safetensors"), metadata=meta)
    err = (logits32.double() - logits).abs().max().item()
    report[name] = {"logits_f32run_max_abs": err, "relative": err / logits.abs().max().item()}


def trained_model(g, rotary_pct, parallel, save_base_to=None):
    cfg = GPTNeoXConfig(vocab_size=BASE_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, hidden_act="gelu", rotary_pct=rotary_pct, rotary_emb_base=10000,
                        max_position_embeddings=256, layer_norm_eps=1e-5, use_parallel_residual=parallel,
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = GPTNeoXForCausalLM(cfg).float().eval()
    with torch.no_grad():  # random weights and biases of visible size; norms around 1 with a bias
        for n, p in model.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith("final_layer_norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    if save_base_to:  # the base checkpoint as the hub has it, before the vocabulary grows
        model.save_pretrained(save_base_to)
    tok = tokenizer_with_sentinels()
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():  # the two new rows (and the trained embeddings) are random
        model.get_input_embeddings().weight[BASE_VOCAB:] = 0.15 * torch.randn(2, 64, generator=g)
        model.get_output_embeddings().weight[BASE_VOCAB:] = 0.15 * torch.randn(2, 64, generator=g)
    assert model.config.vocab_size == BASE_VOCAB + 2
    return model, tok


def lora(model, g):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                          target_modules=["query_key_value", "dense"])
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return pm.eval()


def main():
    out = sys.argv[1]
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../.."))
    check_rules_against_fixtures(root)
    report = {}
    g = torch.Generator().manual_seed(33)

    # Case 1: PEFT adapter directory on the resized base, transformers-5 config.
    name = "neox_parallel_rot25_peft"
    d = os.path.join(out, name)
    shutil.rmtree(d, ignore_errors=True)
    base, tok = trained_model(g, 0.25, True)
    base.save_pretrained(os.path.join(d, "model"))
    pm = lora(base, g)
    pm.save_pretrained(os.path.join(d, "adapter"))
    tok.save_pretrained(os.path.join(d, "adapter"))
    ids = stream(g)
    reloaded = GPTNeoXForCausalLM.from_pretrained(os.path.join(d, "model"), dtype=torch.float64)
    merged = peft.PeftModel.from_pretrained(reloaded, os.path.join(d, "adapter")).merge_and_unload()
    write_case(d, merged, ids, "GPT-NeoX rotary_pct 0.25, parallel residual, PEFT LoRA adapter directory", report, name)

    # Case 2: the LoRA-injected checkpoint, older config layout, tokenizer files beside it.
    name = "neox_sequential_rot100_injected"
    d = os.path.join(out, name)
    shutil.rmtree(d, ignore_errors=True)
    base, tok = trained_model(g, 1.0, False)
    pm = lora(base, g)
    mdir = os.path.join(d, "model")
    pm.base_model.save_pretrained(mdir)
    pm.peft_config["default"].save_pretrained(mdir)
    tok.save_pretrained(mdir)
    # The older config layout (transformers 4.x, as RedPajama-INCITE ships it).
    with open(os.path.join(mdir, "config.json")) as f:
        c = json.load(f)
    rp = c.pop("rope_parameters")
    assert rp["rope_type"] == "default"
    c["rotary_pct"] = rp.get("partial_rotary_factor", 1.0)
    c["rotary_emb_base"] = rp["rope_theta"]
    c["torch_dtype"] = c.pop("dtype", "float32")
    with open(os.path.join(mdir, "config.json"), "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
    ids = stream(g)
    merged = pm.double().merge_and_unload()
    write_case(d, merged, ids, "GPT-NeoX rotary_pct 1.0, sequential residual, LoRA-injected checkpoint", report, name)

    # Case 3: the base as the hub has it (vocabulary 128); the adapter carries the resized,
    # trained embeddings (save_embedding_layers=True: gpt_neox.embed_in and the output layer,
    # which PEFT names lm_head after transformers 5's module).
    name = "neox_parallel_rot25_peft_vocab"
    d = os.path.join(out, name)
    shutil.rmtree(d, ignore_errors=True)
    base, tok = trained_model(g, 0.25, True, save_base_to=os.path.join(d, "model"))
    pm = lora(base, g)
    pm.save_pretrained(os.path.join(d, "adapter"), save_embedding_layers=True)
    tok.save_pretrained(os.path.join(d, "adapter"))
    ids = stream(g)
    reloaded = GPTNeoXForCausalLM.from_pretrained(os.path.join(d, "model"), dtype=torch.float64)
    assert reloaded.config.vocab_size == BASE_VOCAB
    reloaded.resize_token_embeddings(len(tok), mean_resizing=False)  # as a user reloads it, then the adapter's rows
    merged = peft.PeftModel.from_pretrained(reloaded, os.path.join(d, "adapter")).merge_and_unload()
    assert torch.equal(merged.get_input_embeddings().weight.float(), base.get_input_embeddings().weight.float())
    write_case(d, merged, ids, "GPT-NeoX rotary_pct 0.25, parallel residual, base vocabulary 128, PEFT adapter with the "
               "resized embeddings", report, name)

    for case in sorted(os.listdir(out)):
        p = os.path.join(out, case)
        if os.path.isdir(p):
            for root_, _, files in os.walk(p):
                for f in files:
                    if f.endswith(".safetensors"):
                        with safe_open(os.path.join(root_, f), "pt") as st:
                            report.setdefault("files", {})[os.path.relpath(os.path.join(root_, f), out)] = sorted(st.keys())
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    print(json.dumps({k: v for k, v in report.items() if k != "files"}, indent=1))


if __name__ == "__main__":
    main()
