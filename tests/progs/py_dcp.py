"""Corpus program: single-process torch.distributed.checkpoint save + load.

argv[1]: output directory (must exist); the checkpoint is argv[1]/ckpt.
argv[2]: FileSystemWriter thread_count.

No process group is initialised (DCP's no-dist mode).  The data files
(__0_*.distcp) are byte-deterministic; .metadata holds a random save_id and
the checkpoint path, so the harness compares it by unpickling (see
test_corpus.py).  The checkpoint is loaded back into a fresh state dict in the
same process and compared.
"""
import os
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from progutil import Observed, check, report_stats  # noqa: E402

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
torch.set_num_threads(1)
torch.manual_seed(0)

out = sys.argv[1]
threads = int(sys.argv[2])
ckpt_dir = os.path.join(out, "ckpt")
obs = Observed(out)


def make_state():
    sd = {"embed.weight": torch.randn(4000, 512)}
    for i in range(3):
        p = "layers.%d." % i
        sd[p + "qkv.weight"] = torch.randn(1536, 512)
        sd[p + "mlp.weight"] = torch.randn(1024, 512).to(torch.bfloat16)
        sd[p + "ln.weight"] = torch.ones(512)
        sd[p + "ln.bias"] = torch.zeros(512)
    sd["optim"] = {"step": torch.tensor(10.0), "exp_avg": torch.randn(256, 256)}
    sd["iteration"] = 1234
    sd["note"] = "bytes item"
    return sd


sd = make_state()
writer = dcp.FileSystemWriter(ckpt_dir, thread_count=threads)
dcp.save(sd, storage_writer=writer)
obs.add("files", sorted(os.listdir(ckpt_dir)))

fresh = make_state()
for k, v in fresh.items():
    if isinstance(v, torch.Tensor):
        v.zero_()
fresh["optim"]["exp_avg"].zero_()
fresh["optim"]["step"].zero_()
fresh["iteration"] = 0
fresh["note"] = ""
dcp.load(fresh, storage_reader=dcp.FileSystemReader(ckpt_dir))


def same(a, b, where):
    if isinstance(a, torch.Tensor):
        check(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), "%s differs" % where)
    elif isinstance(a, dict):
        check(sorted(a) == sorted(b), "%s: keys differ" % where)
        for k in a:
            same(a[k], b[k], "%s.%s" % (where, k))
    else:
        check(a == b, "%s: %r != %r" % (where, a, b))


same(sd, fresh, "state")
obs.write()
report_stats()
