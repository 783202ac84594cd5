"""A reopen that cannot observe the contents does not wait (docs/DESIGN.md 3.3).

The careful user's save: torch.save(sd, path), then open the path again,
fsync, close.  The open observes nothing, so it returns at once, and so does
the fsync through it.  What can observe the contents through the new
descriptor waits for the file's pending work: read, pread, mmap, sendfile,
lseek to the end, fstat's size, a fork or exec that hands the descriptor
on.  A writer's reopen (no O_TRUNC) takes over the file at once: its writes
land after the earlier ones.

Every test runs the same program without ackpt and under it, with a slow
helper (ACKPT_TEST_DELAY_MS) so that the first close's work is surely still
pending at the reopen, and compares what the program printed and the file
byte for byte.  "Did not wait" is checked without a clock: the program
asks ackpt_get_stats how many ops were still pending right after the
reopen and the fsync, which is only non-zero if neither waited for them.
"""
import hashlib
import subprocess

import pytest

from conftest import VENV_PY
from faultutil import need_shim, plain_env, run, shim_env

PROG = r"""
import ctypes, hashlib, mmap, os, subprocess, sys
d, mode = sys.argv[1], sys.argv[2]
under = os.environ.get("LD_PRELOAD", "").find("libackpt") >= 0

class Stats(ctypes.Structure):
    _fields_ = [("bytes_staged", ctypes.c_uint64), ("files", ctypes.c_uint64),
                ("bytes_written", ctypes.c_uint64), ("errors", ctypes.c_uint64),
                ("ops_pending", ctypes.c_uint64), ("stall_seconds", ctypes.c_double),
                ("active", ctypes.c_int32), ("helper_flags", ctypes.c_int32)]

def pending():
    if not under:
        return -1
    s = Stats()
    ctypes.CDLL(None).ackpt_get_stats(ctypes.byref(s), ctypes.sizeof(s))
    return s.ops_pending

blob = bytes(range(256)) * 4096               # 1 MiB
p = os.path.join(d, "model.pt")
with open(p, "wb") as f:                      # the save: 24 writes of 1 MiB
    for i in range(24):
        f.write(bytes([i]) * 16 + blob[16:])
flags = {"ro": os.O_RDONLY, "wo": os.O_WRONLY, "rw": os.O_RDWR, "ap": os.O_WRONLY | os.O_APPEND}[mode]
fd = os.open(p, flags)
after_open = pending()
os.fsync(fd)
os.fdatasync(fd)
after_fsync = pending()
# the 24 writes are at least one op (consecutive writes extend one record),
# and the close another
print("pending-after-open", after_open >= 2 if under else "plain")
print("pending-after-fsync", after_fsync >= 2 if under else "plain")
print("fstat", os.fstat(fd).st_size)
print("seek-end", os.lseek(fd, 0, os.SEEK_END))
os.lseek(fd, 0, os.SEEK_SET)
if mode in ("ro", "rw"):
    print("pread", hashlib.sha256(os.pread(fd, 3 << 20, 21 << 20)).hexdigest())
    m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    print("mmap", hashlib.sha256(m[:]).hexdigest())
    m.close()
if mode in ("wo", "rw"):
    os.pwrite(fd, b"W" * 100, (24 << 20) - 50)      # over the last staged write, and past it
    os.pwrite(fd, b"X" * 10, 5)                      # over the first one
if mode == "ap":
    os.write(fd, b"appended after the save")
print("size-now", os.fstat(fd).st_size)
# a child reads through the inherited description: it sees what we wrote
pid = os.fork()
if pid == 0:
    os.lseek(fd, 0, os.SEEK_SET)
    if mode in ("ro", "rw"):
        data = b""
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            data += b
        print("child-read", hashlib.sha256(data).hexdigest(), flush=True)
    else:
        print("child-size", os.fstat(fd).st_size, flush=True)
    os._exit(0)
os.waitpid(pid, 0)
# an exec'd program reads the same description
os.set_inheritable(fd, True)
if mode in ("ro", "rw"):
    os.lseek(fd, 0, os.SEEK_SET)
    out = subprocess.run(["sha256sum", "/dev/stdin"], stdin=fd, capture_output=True, text=True).stdout
    print("exec-read", out.split()[0])
os.close(fd)
with open(p, "rb") as f:
    print("final", hashlib.sha256(f.read()).hexdigest())
"""


def _go(tmp_path, label, mode, shim):
    out = tmp_path / label
    out.mkdir()
    if shim:
        # 20 ms per helper op: the 24 writes and the CLOSE are still pending
        # when the program reopens the file
        env = shim_env(out, staging="64M", ACKPT_TEST_DELAY_MS="20")
    else:
        env = plain_env()
    r = run([VENV_PY, "-c", PROG, str(out), mode], env, cwd=out, timeout=120)
    assert r.returncode == 0, r.describe()
    return out, r


@pytest.mark.parametrize("mode", ["ro", "wo", "rw", "ap"])
def test_reopen_does_not_wait_and_observers_see_everything(tmp_path, mode):
    need_shim()
    pout, plain = _go(tmp_path, "plain", mode, False)
    sout, shim = _go(tmp_path, "shim", mode, True)
    plain_lines = [l for l in plain.stdout.splitlines() if not l.startswith("pending-")]
    shim_lines = [l for l in shim.stdout.splitlines() if not l.startswith("pending-")]
    assert shim_lines == plain_lines, (plain.stdout, shim.stdout)
    # neither the open nor the fsync waited for the first close's work
    assert "pending-after-open True" in shim.stdout, shim.stdout
    assert "pending-after-fsync True" in shim.stdout, shim.stdout
    assert (sout / "model.pt").read_bytes() == (pout / "model.pt").read_bytes()


def test_reopen_fsync_reaches_the_kernel_only_through_the_helper(tmp_path):
    """strace: the program's own fsync through the reopened descriptor is
    not a syscall (the helper syncs the file: its CLOSE's fsync), and the
    file is durable at exit all the same."""
    need_shim()
    if subprocess.run(["which", "strace"], capture_output=True).returncode:
        pytest.skip("strace is not installed")
    out = tmp_path / "s"
    out.mkdir()
    trace = tmp_path / "trace"
    env = shim_env(out, staging="64M", ACKPT_TEST_DELAY_MS="20")
    prog = ("import os,sys\np=os.path.join(sys.argv[1],'m.bin')\n"
            "open(p,'wb').write(b'x'*(8<<20))\n"
            "fd=os.open(p,os.O_RDONLY)\nos.fsync(fd)\nos.close(fd)\n")
    r = run(["strace", "-f", "-qq", "-e", "trace=fsync,openat", "-o", str(trace), VENV_PY, "-c", prog,
             str(out)], env, cwd=out, timeout=120)
    assert r.returncode == 0, r.describe()
    lines = trace.read_text().splitlines()
    prog_pid = lines[0].split()[0]
    opened = [l for l in lines if l.startswith(prog_pid + " ") and "m.bin" in l and "O_RDONLY" in l]
    assert opened, lines
    prog_fsyncs = [l for l in lines if l.startswith(prog_pid + " ") and "fsync(" in l]
    assert prog_fsyncs == [], prog_fsyncs
    helper_fsyncs = [l for l in lines if not l.startswith(prog_pid + " ") and "fsync(" in l]
    assert helper_fsyncs, "the helper never fsynced the file"
    assert (out / "m.bin").read_bytes() == b"x" * (8 << 20)
