"""One checkpoint save for the fault-hook sweep (no torch: fast).

argv: STYLE OUTDIR ITER
Writes OUTDIR/iter_ITER/{a,b}.bin (1 MiB each in 256 KiB writes, fsync,
close), then commits with
  STYLE tracker: OUTDIR/latest_checkpointed_iteration.txt via open('w')
  STYLE dcp:     OUTDIR/iter_ITER/.metadata.tmp written, fsynced, renamed to .metadata
Stops at the first call that fails, printing "FIRST_ERROR <call> <errno>",
and exits 3 (a framework raises; it never writes metadata after an error).
Prints "OK" and exits 0 when every call succeeded.
"""
import errno
import os
import random
import sys

style, out, it = sys.argv[1], sys.argv[2], int(sys.argv[3])


def data(name):
    return random.Random("%d/%s" % (it, name)).randbytes(1 << 20)


RETRY = os.environ.get("SWEEP_RETRY_FSYNC") == "1"


def step(call, fn, *a):
    try:
        return fn(*a)
    except OSError as e:
        if RETRY and call.startswith("fsync"):
            # the fsyncgate pattern: retry a failed fsync and trust it if it succeeds
            try:
                fn(*a)
                print("RETRIED %s %s" % (call, errno.errorcode.get(e.errno, e.errno)), flush=True)
                return None
            except OSError:
                pass
        print("FIRST_ERROR %s %s" % (call, errno.errorcode.get(e.errno, e.errno)), flush=True)
        os._exit(3)


d = os.path.join(out, "iter_%d" % it)
os.makedirs(d, exist_ok=True)
for name in ("a.bin", "b.bin"):
    fd = step("open", os.open, os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    buf = data(name)
    for off in range(0, len(buf), 256 << 10):
        step("write", os.write, fd, buf[off:off + (256 << 10)])
    step("fsync", os.fsync, fd)
    step("close", os.close, fd)
if style == "tracker":
    p = os.path.join(out, "latest_checkpointed_iteration.txt")
    fd = step("open-meta", os.open, p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    step("write-meta", os.write, fd, str(it).encode())
    step("close-meta", os.close, fd)
else:
    tmp = os.path.join(d, ".metadata.tmp")
    fd = step("open-meta", os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    step("write-meta", os.write, fd, b"metadata of %d\n" % it)
    step("fsync-meta", os.fsync, fd)
    step("close-meta", os.close, fd)
    step("rename-meta", os.rename, tmp, os.path.join(d, ".metadata"))
print("OK", flush=True)
