"""Corpus program: torch.save / torch.load on managed files (CPU only).

argv[1]: output directory (must exist).

A deterministic state dict shaped like a small transformer (a few big
tensors, many small ones, a tied weight, bf16/int tensors, a non-contiguous
view, nested optimizer state) is saved
  - to a path        (PyTorchStreamWriter -> std::ofstream: fopen64/write/writev/fclose),
  - to a file object (buffer.write + flush through CPython, then close),
then loaded back in the same process and compared.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from progutil import Observed, check, report_stats  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)

out = sys.argv[1]
obs = Observed(out)
P = lambda name: os.path.join(out, name)  # noqa: E731

VOCAB, D, FF, LAYERS = 4000, 512, 2048, 2


def make_state():
    sd = {}
    emb = torch.randn(VOCAB, D)
    sd["embed.weight"] = emb
    for i in range(LAYERS):
        p = "layers.%d." % i
        sd[p + "attn.qkv.weight"] = torch.randn(3 * D, D)
        sd[p + "attn.qkv.bias"] = torch.randn(3 * D)
        sd[p + "attn.out.weight"] = torch.randn(D, D)
        sd[p + "attn.out.bias"] = torch.zeros(D)
        sd[p + "mlp.up.weight"] = torch.randn(FF, D).to(torch.bfloat16)
        sd[p + "mlp.down.weight"] = torch.randn(D, FF).to(torch.bfloat16)
        for n in ("ln1", "ln2"):
            sd[p + n + ".weight"] = torch.ones(D)
            sd[p + n + ".bias"] = torch.zeros(D)
        sd[p + "rotary.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    sd["final_ln.weight"] = torch.ones(D)
    sd["lm_head.weight"] = emb  # tied: one storage, saved once
    sd["pos_ids"] = torch.arange(2048, dtype=torch.int64)
    sd["mask"] = torch.rand(64, 64) > 0.5
    sd["strided_view"] = torch.randn(256, 256)[::2, 1::3]
    return sd


def make_ckpt():
    model = make_state()
    optim = {
        "state": {i: {"step": torch.tensor(100.0 + i), "exp_avg": torch.randn(32, 32)}
                  for i in range(40)},
        "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "params": list(range(40))}],
    }
    return {"model": model, "optimizer": optim, "iteration": 1234, "args": {"name": "tiny"}}


def same(x, y, where="root"):
    if isinstance(x, torch.Tensor):
        check(isinstance(y, torch.Tensor), "%s: not a tensor" % where)
        check(x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride(),
              "%s: dtype/shape/stride differ" % where)
        check(torch.equal(x, y), "%s: values differ" % where)
    elif isinstance(x, dict):
        check(isinstance(y, dict) and list(x) == list(y), "%s: keys differ" % where)
        for k in x:
            same(x[k], y[k], "%s.%s" % (where, k))
    elif isinstance(x, (list, tuple)):
        check(type(x) is type(y) and len(x) == len(y), "%s: sequence differs" % where)
        for i, (a, b) in enumerate(zip(x, y)):
            same(a, b, "%s[%d]" % (where, i))
    else:
        check(x == y, "%s: %r != %r" % (where, x, y))


ckpt = make_ckpt()

# 1. To a path (std::ofstream inside libtorch).
torch.save(ckpt, P("model_optim_rng.pt"))
obs.add("path.stat", os.stat(P("model_optim_rng.pt")).st_size)

# 2. To an open file object, then close.
f = open(P("fileobj.pt"), "wb")
torch.save(ckpt, f)
obs.add("fileobj.tell", f.tell())
f.close()

# (The legacy non-zip format is left out: it keys storages by their address, so two
# runs never produce the same bytes.)

# Load everything back in the same process.
for name in ("model_optim_rng.pt", "fileobj.pt"):
    loaded = torch.load(P(name), weights_only=True)
    same(ckpt, loaded, name)
    check(loaded["model"]["lm_head.weight"].data_ptr() == loaded["model"]["embed.weight"].data_ptr(),
          "%s: tied weight not shared after load" % name)

obs.write()
report_stats()
