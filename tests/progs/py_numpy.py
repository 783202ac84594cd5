"""Corpus program: numpy writers on managed files.

argv[1]: output directory (must exist).

np.save (path and open file), np.savez / np.savez_compressed, ndarray.tofile
(dup + fdopen + fwrite inside numpy) to a path and to an open file with data
written before and after it, np.savetxt; everything is read back and compared
in the same process.

np.savez goes through zipfile.ZipFile.open(name, 'w'), which stamps each
member with the current local time.  That would make two runs differ, so the
clock zipfile sees is pinned (TZ is pinned by the test harness).
"""
import os
import sys
import time
import types
import zipfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from progutil import Observed, check, report_stats  # noqa: E402

zipfile.time = types.SimpleNamespace(time=lambda: 1700000000.0, localtime=time.localtime)

out = sys.argv[1]
obs = Observed(out)
P = lambda name: os.path.join(out, name)  # noqa: E731

rng = np.random.default_rng(1234)
a = rng.standard_normal((1024, 2048), dtype=np.float32)  # 8 MiB
b = rng.integers(0, 1 << 30, size=(333, 77), dtype=np.int64)
c = np.arange(1000, dtype=np.float16)

# np.save to a path and to an open file (two arrays back to back).
np.save(P("a.npy"), a)
with open(P("two.npy"), "wb") as f:
    np.save(f, b)
    obs.add("two.npy.tell-after-first", f.tell())
    np.save(f, c)
    obs.add("two.npy.tell-after-second", f.tell())

# npz, stored and compressed.
np.savez(P("arrays.npz"), a=a, b=b, c=c)
np.savez_compressed(P("arrays_z.npz"), b=b, c=c)

# tofile to a path, and to an open file between Python writes.
a.tofile(P("a.raw"))
with open(P("mixed.raw"), "wb") as f:
    f.write(b"PYHEADER" * 8)
    b.tofile(f)
    obs.add("mixed.raw.tell-after-tofile", f.tell())
    f.write(b"PYTRAILER\n")
    c.tofile(f)
    obs.add("mixed.raw.tell-end", f.tell())

np.savetxt(P("c.txt"), c[:200].reshape(20, 10), fmt="%.3f")

# Read everything back.
check(np.array_equal(np.load(P("a.npy")), a), "a.npy mismatch")
with open(P("two.npy"), "rb") as f:
    check(np.array_equal(np.load(f), b), "two.npy[0] mismatch")
    check(np.array_equal(np.load(f), c), "two.npy[1] mismatch")
with np.load(P("arrays.npz")) as z:
    check(sorted(z.files) == ["a", "b", "c"], "arrays.npz members %r" % z.files)
    check(np.array_equal(z["a"], a) and np.array_equal(z["b"], b) and np.array_equal(z["c"], c),
          "arrays.npz content mismatch")
with np.load(P("arrays_z.npz")) as z:
    check(np.array_equal(z["b"], b) and np.array_equal(z["c"], c), "arrays_z.npz mismatch")
check(np.array_equal(np.fromfile(P("a.raw"), dtype=np.float32).reshape(a.shape), a), "a.raw mismatch")
with open(P("mixed.raw"), "rb") as f:
    check(f.read(64) == b"PYHEADER" * 8, "mixed.raw header")
    check(np.array_equal(np.fromfile(f, dtype=np.int64, count=b.size).reshape(b.shape), b),
          "mixed.raw b")
    check(f.read(10) == b"PYTRAILER\n", "mixed.raw trailer")
    check(np.array_equal(np.fromfile(f, dtype=np.float16), c), "mixed.raw c")
check(np.allclose(np.loadtxt(P("c.txt")).ravel(), c[:200].astype(np.float64), atol=1e-3),
      "c.txt mismatch")
for name in ("a.npy", "a.raw", "mixed.raw"):
    obs.add(name + ".stat", os.stat(P(name)).st_size)

obs.write()
report_stats()
