"""Corpus program: another process reads a file right after it was written.

argv[1]: output directory (must exist).

A checkpoint is written (torch.save to a path, and a big plain write) and
immediately copied by a subprocess -- coreutils cp (copy_file_range) -- and
in-process by shutil.copyfile (sendfile).  One source is still open (flushed,
not closed) while cp runs.  The copies are read back and compared with the
sources in the same process.
"""
import os
import shutil
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from progutil import Observed, check, prng_bytes, report_stats  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)

out = sys.argv[1]
obs = Observed(out)
P = lambda name: os.path.join(out, name)  # noqa: E731


def read(name):
    with open(P(name), "rb") as f:
        return f.read()


# 1. torch.save, then cp right away.
torch.save({"w": torch.randn(2048, 1024), "b": torch.randn(1024)}, P("ckpt.pt"))
subprocess.run(["cp", P("ckpt.pt"), P("ckpt_copy.pt")], check=True)
check(read("ckpt.pt") == read("ckpt_copy.pt"), "cp of ckpt.pt differs from the source")

# 2. A big plain write, closed, then cp and shutil.copyfile.
data = prng_bytes(16 << 20, 21)
with open(P("blob.bin"), "wb") as f:
    f.write(data)
subprocess.run(["cp", P("blob.bin"), P("blob_cp.bin")], check=True)
shutil.copyfile(P("blob.bin"), P("blob_shutil.bin"))
check(read("blob_cp.bin") == data, "cp of blob.bin differs")
check(read("blob_shutil.bin") == data, "shutil.copyfile of blob.bin differs")

# 3. Source still open (flushed, not closed) while cp runs.
f = open(P("open_src.bin"), "wb")
f.write(data[: 5 << 20])
f.flush()
subprocess.run(["cp", P("open_src.bin"), P("open_src_cp.bin")], check=True)
check(read("open_src_cp.bin") == data[: 5 << 20], "cp of a still-open file differs")
f.write(b"more after the copy")
f.close()
check(read("open_src.bin") == data[: 5 << 20] + b"more after the copy", "open_src.bin differs")

for name in sorted(os.listdir(out)):
    if name != "observed.json":
        obs.add(name + ".size", os.stat(P(name)).st_size)
obs.write()
report_stats()
