"""Write a big file while the test kills the helper.

argv: PATH MIB_BEFORE MIB_AFTER SEED CHUNK_MIB
Writes MIB_BEFORE MiB in CHUNK_MIB os.write calls, prints "staged"
(flushed), waits for a line on stdin (the test kills the helper meanwhile),
writes MIB_AFTER MiB more, fsyncs, closes, reads the file back and checks it,
prints the shim's stats as JSON.  Exit 0 on success, 1 on a mismatch.
"""
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "progs"))
from progutil import check, get_stats  # noqa: E402

path = sys.argv[1]
before, after, seed, chunk = (int(sys.argv[2]) << 20, int(sys.argv[3]) << 20, int(sys.argv[4]),
                              int(sys.argv[5]) << 20)
data = random.Random(seed).randbytes(before + after)
view = memoryview(data)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
off = 0
while off < before:
    off += os.write(fd, view[off:min(off + chunk, before)])
st = get_stats()
print("staged pending=%d" % st.get("ops_pending", -1), flush=True)
sys.stdin.readline()
while off < len(data):
    off += os.write(fd, view[off:off + chunk])
check(os.fstat(fd).st_size == len(data), "fstat size %d" % os.fstat(fd).st_size)
os.fsync(fd)
os.close(fd)
with open(path, "rb") as f:
    got = f.read()
check(got == data, "read-back mismatch: %d bytes, expected %d" % (len(got), len(data)))
print(json.dumps(get_stats()), flush=True)
