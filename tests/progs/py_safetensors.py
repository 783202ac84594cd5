"""Corpus program: safetensors on managed files.

argv[1]: output directory (must exist).

safetensors.torch.save_file (Rust writer inside the extension) and
safetensors.torch.save (bytes, written by Python), then load_file /
safe_open / load, compared in the same process.
"""
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load, load_file, save, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from progutil import Observed, check, report_stats  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)

out = sys.argv[1]
obs = Observed(out)
P = lambda name: os.path.join(out, name)  # noqa: E731

tensors = {
    "embed": torch.randn(4000, 512),
    "qkv": torch.randn(1536, 512).to(torch.bfloat16),
    "ids": torch.arange(10000, dtype=torch.int32),
    "flag": torch.tensor([True, False, True]),
    "scalar": torch.tensor(3.5),
}
for i in range(200):
    tensors["small.%03d" % i] = torch.randn(i % 17 + 1, 7)
# One key only: the Rust writer keeps metadata in a HashMap, so with several keys
# their order (and so the file bytes) changes from run to run.
meta = {"format": "pt"}


def same(a, b, where):
    check(sorted(a) == sorted(b), "%s: keys differ" % where)
    for k in a:
        check(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]),
              "%s: tensor %s differs" % (where, k))


save_file(tensors, P("model.safetensors"), metadata=meta)
obs.add("model.stat", os.stat(P("model.safetensors")).st_size)
same(tensors, load_file(P("model.safetensors")), "model.safetensors load_file")
with safe_open(P("model.safetensors"), framework="pt") as f:
    check(f.metadata() == meta, "metadata differs: %r" % f.metadata())
    check(torch.equal(f.get_tensor("embed"), tensors["embed"]), "safe_open get_tensor differs")

# Second shard written twice (overwrite an existing file with different content).
shard = {k: v for k, v in tensors.items() if k.startswith("small.")}
save_file(tensors, P("shard-00002.safetensors"))
save_file(shard, P("shard-00002.safetensors"))
same(shard, load_file(P("shard-00002.safetensors")), "shard overwrite")

blob = save({"x": tensors["embed"][:100]})
with open(P("bytes.safetensors"), "wb") as f:
    f.write(blob)
with open(P("bytes.safetensors"), "rb") as f:
    same({"x": tensors["embed"][:100]}, load(f.read()), "bytes.safetensors")

obs.write()
report_stats()
