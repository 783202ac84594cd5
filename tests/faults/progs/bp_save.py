"""One large checkpoint save for the back-pressure scenario (tests/faults/backpressure.py).

argv: OUTDIR TOTAL_MIB
Writes OUTDIR/iter_1/ with a mix of call shapes, TOTAL_MIB MiB in all:
  big.bin     half of it in 4 MiB os.write calls
  huge.bin    5/16 in ONE os.write (larger than a TOTAL/4 arena: staged in pieces)
  rev.bin     an eighth with 1 MiB os.pwrite calls at descending offsets
  small.bin   the rest through a buffered file object, in 1..9000-byte writes
  arr.npy     a 1 MiB numpy.save
then fsyncs and closes each, and commits OUTDIR/iter_1/.metadata (written as
.metadata.tmp, fsynced, renamed) and OUTDIR/latest_checkpointed_iteration.txt.
Contents are a function of the file name only, so runs are byte-comparable.

Under the shim (ackpt_get_stats resolvable) a thread samples, every 10 ms,
staged - written payload bytes (what is in the arena awaiting storage).
Every write call is timed; a call that fails is recorded and the save stops
(exit 3), as a framework would.  Prints one JSON line:
  {"ok", "calls", "failed", "max_call_s", "write_phase_s", "save_s",
   "peak_pending", "samples", "stall_s", "staging_bytes", "bytes_staged",
   "helper_flags"}
"""
import ctypes
import json
import os
import random
import sys
import threading
import time

import numpy as np

out, total = sys.argv[1], int(sys.argv[2]) << 20
d = os.path.join(out, "iter_1")
MiB = 1 << 20


class Stats(ctypes.Structure):
    _fields_ = [("bytes_staged", ctypes.c_uint64), ("files", ctypes.c_uint64),
                ("bytes_written", ctypes.c_uint64), ("errors", ctypes.c_uint64),
                ("ops_pending", ctypes.c_uint64), ("stall_seconds", ctypes.c_double),
                ("active", ctypes.c_int32), ("helper_flags", ctypes.c_int32),
                ("helper_cpu_seconds", ctypes.c_double), ("staging_bytes", ctypes.c_uint64)]


try:
    _get = ctypes.CDLL(None).ackpt_get_stats
    _get.argtypes = [ctypes.POINTER(Stats), ctypes.c_size_t]
except AttributeError:
    _get = None


def stats():
    s = Stats()
    if _get is None or _get(ctypes.byref(s), ctypes.sizeof(s)) != 0:
        return None
    return s


res = {"ok": False, "calls": 0, "failed": [], "max_call_s": 0.0, "peak_pending": 0, "samples": 0}
stop = threading.Event()


def sampler():
    while not stop.is_set():
        s = stats()
        if s is not None and s.active:
            res["samples"] += 1
            pend = s.bytes_staged - s.bytes_written
            if pend > res["peak_pending"]:
                res["peak_pending"] = pend
        time.sleep(0.01)


def data(name, n):
    return random.Random(name).randbytes(n)


def timed(call, fn, *a):
    t0 = time.monotonic()
    try:
        r = fn(*a)
    except OSError as e:
        res["failed"].append("%s: %s" % (call, e))
        finish(3)
    dt = time.monotonic() - t0
    res["calls"] += 1
    res["max_call_s"] = max(res["max_call_s"], dt)
    return r


def finish(code):
    stop.set()
    s = stats()
    if s is not None:
        res.update(stall_s=s.stall_seconds, staging_bytes=s.staging_bytes, bytes_staged=s.bytes_staged,
                   helper_flags=s.helper_flags)
    print(json.dumps(res), flush=True)
    os._exit(code) if code else sys.exit(0)


th = threading.Thread(target=sampler, daemon=True)
th.start()
os.makedirs(d, exist_ok=True)
t0 = time.monotonic()
O = os.O_WRONLY | os.O_CREAT | os.O_TRUNC

# big.bin: 4 MiB writes
n = total // 2
buf = data("big.bin", n)
fd = timed("open big", os.open, os.path.join(d, "big.bin"), O, 0o644)
for off in range(0, n, 4 * MiB):
    w = timed("write big", os.write, fd, buf[off:off + 4 * MiB])
    if w != len(buf[off:off + 4 * MiB]):
        res["failed"].append("short write big: %d" % w)
timed("fsync big", os.fsync, fd)
timed("close big", os.close, fd)

# huge.bin: one write
n = total // 4 + total // 16
buf = data("huge.bin", n)
fd = timed("open huge", os.open, os.path.join(d, "huge.bin"), O, 0o644)
w = timed("write huge", os.write, fd, buf)
if w != n:
    res["failed"].append("short write huge: %d of %d" % (w, n))
timed("fsync huge", os.fsync, fd)
timed("close huge", os.close, fd)

# rev.bin: pwrite at descending offsets
n = total // 8
buf = data("rev.bin", n)
fd = timed("open rev", os.open, os.path.join(d, "rev.bin"), O, 0o644)
for off in range(n - MiB, -1, -MiB):
    timed("pwrite rev", os.pwrite, fd, buf[off:off + MiB], off)
timed("fsync rev", os.fsync, fd)
timed("close rev", os.close, fd)

# small.bin: buffered, small unaligned writes
n = total - total // 2 - (total // 4 + total // 16) - total // 8 - MiB
buf = data("small.bin", n)
sizes = random.Random("sizes")
f = timed("open small", open, os.path.join(d, "small.bin"), "wb")
off = 0
while off < n:
    k = min(sizes.randint(1, 9000), n - off)
    timed("write small", f.write, buf[off:off + k])
    off += k
timed("flush small", f.flush)
timed("fsync small", os.fsync, f.fileno())
timed("close small", f.close)

# arr.npy: numpy.save of 1 MiB (header + data)
arr = np.frombuffer(data("arr.npy", MiB - 128), dtype=np.uint8)
timed("np.save", np.save, os.path.join(d, "arr.npy"), arr)
res["write_phase_s"] = time.monotonic() - t0

# commit: DCP-style .metadata and a Megatron-style tracker
tmp = os.path.join(d, ".metadata.tmp")
fd = timed("open meta", os.open, tmp, O, 0o644)
timed("write meta", os.write, fd, b"metadata of 1\n")
timed("fsync meta", os.fsync, fd)
timed("close meta", os.close, fd)
timed("rename meta", os.rename, tmp, os.path.join(d, ".metadata"))
with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w") as f:
    timed("write tracker", f.write, "1")
res["save_s"] = time.monotonic() - t0
res["ok"] = not res["failed"]
finish(0 if res["ok"] else 3)
