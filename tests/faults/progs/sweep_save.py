"""One checkpoint save for the fault-hook sweep (no torch: fast).

argv: STYLE OUTDIR ITER
Writes OUTDIR/iter_ITER/{a,b}.bin (1 MiB each in 256 KiB writes, fsync,
close), then commits with
  STYLE tracker: OUTDIR/latest_checkpointed_iteration.txt via open('w')
  STYLE dcp:     OUTDIR/iter_ITER/.metadata.tmp written, fsynced, renamed to .metadata
Stops at the first call that fails, printing "FIRST_ERROR <call> <errno>",
and exits 3 (a framework raises; it never writes metadata after an error).
Prints "OK" and exits 0 when every call succeeded.

Environment:
  SWEEP_RETRY_FSYNC=1  retry a failed fsync once (the fsyncgate pattern): prints
                       "RETRIED <call> <errno>" and goes on if the retry returned 0,
                       "RETRY_FAILED <call> <errno>" if it failed too
  SWEEP_PAUSE=S        after each data file's fsync, sleep S seconds and fsync again
                       ("fsync2"), so the helper's error is returned by an fsync

Also imported by progs/powerloss_save.py (the same bytes and calls, in a loop).
"""
import errno
import os
import random
import sys
import time

CHUNK = 256 << 10
TRACKER = "latest_checkpointed_iteration.txt"


def data(it, name):
    return random.Random("%d/%s" % (it, name)).randbytes(1 << 20)


def make_step(retry=False, tag="FIRST_ERROR"):
    """step(call, fn, *args): fn(*args), or print "<tag> <call> <errno>" and exit 3."""
    def step(call, fn, *a):
        try:
            return fn(*a)
        except OSError as e:
            if retry and call.startswith("fsync"):
                try:
                    fn(*a)
                    print("RETRIED %s %s" % (call, errno.errorcode.get(e.errno, e.errno)), flush=True)
                    return None
                except OSError as e2:
                    print("RETRY_FAILED %s %s" % (call, errno.errorcode.get(e2.errno, e2.errno)),
                          flush=True)
            print("%s %s %s" % (tag, call, errno.errorcode.get(e.errno, e.errno)), flush=True)
            os._exit(3)
    return step


def write_data(out, it, step, pause=0.0):
    d = os.path.join(out, "iter_%d" % it)
    os.makedirs(d, exist_ok=True)
    for name in ("a.bin", "b.bin"):
        fd = step("open", os.open, os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        buf = data(it, name)
        for off in range(0, len(buf), CHUNK):
            step("write", os.write, fd, buf[off:off + CHUNK])
        step("fsync", os.fsync, fd)
        if pause:
            time.sleep(pause)
            step("fsync2", os.fsync, fd)
        step("close", os.close, fd)


def write_metadata(style, out, it, step):
    if style == "tracker":
        # no fsync, as Megatron does
        fd = step("open-meta", os.open, os.path.join(out, TRACKER), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                  0o644)
        step("write-meta", os.write, fd, str(it).encode())
        step("close-meta", os.close, fd)
    else:
        d = os.path.join(out, "iter_%d" % it)
        tmp = os.path.join(d, ".metadata.tmp")
        fd = step("open-meta", os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        step("write-meta", os.write, fd, b"metadata of %d\n" % it)
        step("fsync-meta", os.fsync, fd)
        step("close-meta", os.close, fd)
        step("rename-meta", os.rename, tmp, os.path.join(d, ".metadata"))


if __name__ == "__main__":
    style, out, it = sys.argv[1], sys.argv[2], int(sys.argv[3])
    step = make_step(retry=os.environ.get("SWEEP_RETRY_FSYNC") == "1")
    write_data(out, it, step, float(os.environ.get("SWEEP_PAUSE", "0") or 0))
    write_metadata(style, out, it, step)
    print("OK", flush=True)
