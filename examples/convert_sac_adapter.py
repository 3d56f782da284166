#!/usr/bin/env python3
"""Convert SAC's `adapter.pt` to safetensors for `ctxcomp sac --sac-adapter`.

SAC's training code (lx-Meteors/SAC, model/modeling.py, `save_adapter`) saves the trainable state
of its compressing copy with torch.save: `role_tokens` [mem, d] and `special_tokens` [2, d] (the
anchor and special embeddings) and, per layer, the LinearLoraLayer matrices that replace q_proj
and v_proj, `model.model.layers.N.self_attn.{q,v}_proj.lora_A` [in, r] and `.lora_B` [r, out].
This writes them as `role_tokens`, `special_tokens`, `layers.N.{q,v}_proj.lora_A` and
`layers.N.{q,v}_proj.lora_B` in their stored dtype (F32, F16 or BF16; bytes copied, so exact).
The LoRA's forward is y = x W^T + 2 * x A B (scale fixed at 2; docs: README, "SAC adapters").

Needs only Python 3: the zip archive torch.save writes is read directly (pickled metadata plus
raw storages), without PyTorch. The legacy pre-1.6 (non-zip) format is refused.

    python3 examples/convert_sac_adapter.py adapter.pt sac_adapter.safetensors
"""
import argparse
import collections
import os
import pickle
import re
import sys
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_out import write_safetensors  # noqa: E402

DTYPES = {  # torch storage class -> (safetensors dtype, bytes per element)
    "FloatStorage": ("F32", 4), "HalfStorage": ("F16", 2), "BFloat16Storage": ("BF16", 2),
    "DoubleStorage": ("F64", 8),
}


def fail(msg):
    raise SystemExit(f"convert_sac_adapter: {msg}")


class Storage:
    def __init__(self, dtype, size, data):
        self.dtype, self.size, self.data = dtype, size, data


class Tensor:
    """A tensor as stored: its storage, element offset, shape and strides (elements)."""

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

    def contiguous_bytes(self):
        dtype, es = self.storage.dtype
        n = 1
        for s in self.shape:
            n *= s
        # row-major strides of the shape: the bytes can be copied as they are
        want, acc = [], 1
        for s in reversed(self.shape):
            want.append(acc)
            acc *= s
        want.reverse()
        if n == 0:
            return b""
        if all(st == w or sh == 1 for st, w, sh in zip(self.stride, want, self.shape)):
            b = self.offset * es
            return self.storage.data[b:b + n * es]
        out = bytearray()  # gather element by element (a transposed or sliced view)
        for idx in range(n):
            rem, off = idx, self.offset
            for dim in reversed(range(len(self.shape))):
                off += (rem % self.shape[dim]) * self.stride[dim]
                rem //= self.shape[dim]
            out += self.storage.data[off * es:(off + 1) * es]
        return bytes(out)


class Reader(pickle.Unpickler):
    """Unpickles torch.save's data.pkl with storages from the archive, and nothing else."""

    def __init__(self, f, archive, prefix):
        super().__init__(f)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return lambda storage, offset, size, stride, *rest: Tensor(storage, offset, size, stride)
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, hooks, *rest: data
        if module == "torch" and name in DTYPES:
            return DTYPES[name]
        if module == "torch" and name.endswith("Storage"):
            fail(f"tensors of {name} are not supported (floating point only)")
        fail(f"the pickle refers to {module}.{name}, which an adapter state does not hold")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            fail(f"unexpected persistent id {pid!r}")
        dtype, key, numel = pid[1], pid[2], pid[4]
        try:
            data = self.archive.read(f"{self.prefix}data/{key}")
        except KeyError:
            fail(f"storage {key} is missing from the archive")
        if len(data) != numel * dtype[1]:
            fail(f"storage {key} holds {len(data)} bytes, expected {numel * dtype[1]}")
        return Storage(dtype, numel, data)


def load(path):
    if not zipfile.is_zipfile(path):
        fail(f"{path} is not a zip archive: the legacy torch.save format (PyTorch < 1.6) is not read; "
             "re-save it with a recent PyTorch")
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            fail(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0][: -len("data.pkl")]
        if z.namelist() and any(n.endswith("byteorder") for n in z.namelist()):
            order = z.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in z.namelist() else "little"
            if order != "little":
                fail(f"{path}: byte order '{order}' is not supported")
        with z.open(pkl[0]) as f:
            state = Reader(f, z, prefix).load()
    if not isinstance(state, dict):
        fail(f"{path} holds a {type(state).__name__}, expected the adapter's state dict")
    return state


LORA = re.compile(r"^(?:model\.)?model\.layers\.(\d+)\.self_attn\.(q_proj|v_proj)\.(lora_A|lora_B)$")


def convert(state, path):
    out = collections.OrderedDict()
    for name in ("role_tokens", "special_tokens"):
        if name not in state:
            fail(f"{path} has no '{name}' (keys: {sorted(state)[:8]})")
    for name, t in state.items():
        if not isinstance(t, Tensor):
            fail(f"'{name}' is a {type(t).__name__}, not a tensor")
        if name in ("role_tokens", "special_tokens"):
            shape = t.shape
            while len(shape) > 2 and shape[0] == 1:
                shape = shape[1:]
            if len(shape) != 2:
                fail(f"'{name}' has shape {list(t.shape)}, expected [rows, hidden]")
            out[name] = (t, shape)
            continue
        m = LORA.match(name)
        if not m:
            fail(f"'{name}' is neither role_tokens, special_tokens nor a q_proj / v_proj LoRA matrix of SAC's "
                 "compressing copy (model.model.layers.N.self_attn.{q,v}_proj.lora_A / lora_B)")
        if len(t.shape) != 2:
            fail(f"'{name}' has shape {list(t.shape)}, expected a matrix")
        out[f"layers.{m[1]}.{m[2]}.{m[3]}"] = (t, t.shape)
    for key in list(out):
        if key.endswith("lora_A") and key[:-1] + "B" not in out:
            fail(f"'{key}' has no lora_B")
        if key.endswith("lora_B") and key[:-1] + "A" not in out:
            fail(f"'{key}' has no lora_A")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter_pt", help="SAC's adapter.pt (torch.save of the compressing copy's trainable state)")
    ap.add_argument("output", help="safetensors file to write")
    args = ap.parse_args()
    tensors = convert(load(args.adapter_pt), args.adapter_pt)
    write_safetensors(args.output, [(k, t.storage.dtype[0], shape, t.contiguous_bytes()) for k, (t, shape) in tensors.items()],
                      {"source": "SAC adapter.pt", "lora_scale": "2"})
    for k, (t, shape) in tensors.items():
        print(f"{k}: {list(shape)} {t.storage.dtype[0]}")


if __name__ == "__main__":
    main()
