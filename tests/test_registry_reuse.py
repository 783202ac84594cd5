"""A dead helper's pid given to another process is not waited on (docs/DESIGN.md 3.3).

A helper killed without releasing its node-registry entries leaves them
naming its pid.  If the kernel then gives that pid to an unrelated live
process, `kill(pid, 0)` says "alive", and a reader that only asked that
would wait for the entry's pending work forever.  The registry's helper
slot also holds the helper's start time, and readers compare it with
/proc/<pid>/stat.

The test makes that state by hand, in a registry of its own (an unused
uid, through setpriv): an entry for a plain file, pending, owned by a
live `sleep` whose start time is not the slot's.  Then, under the shim:
- a read-only open and read return at once and print what a plain run
  prints (the open's "is anything pending?" sees the helper is gone), and
  leave the entry alone;
- `stat` of the file (which waits in the registry itself) returns within a
  few seconds and frees the entry;
- planted again, the entry is freed by the next helper's sweep at its
  start.
"""
import mmap
import os
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import VENV_PY
from faultutil import need_shim, plain_env, run, shim_env

UID = 47113
REG = Path("/dev/shm/ackpt-registry-v5.%d" % UID)
HELPERS, ENTRIES = 1024, 4096
HELPER_OFF = 16                       # magic, used, names_used
HELPER_SIZE = 24                      # owner, durable_seq, commits_done
ENTRY_OFF = HELPER_OFF + HELPERS * HELPER_SIZE
ENTRY_SIZE = 40                       # pid, helper, dev, ino, last_seq, live, shared
SLOT = HELPERS - 1

READER = r"""
import hashlib, os, sys, time
p = sys.argv[1]
t0 = time.monotonic()
fd = os.open(p, os.O_RDONLY)
data = b"".join(iter(lambda: os.read(fd, 1 << 16), b""))
os.close(fd)
print("read", len(data), hashlib.sha256(data).hexdigest())
print("read-seconds", time.monotonic() - t0, file=sys.stderr)
if len(sys.argv) > 2:
    t0 = time.monotonic()
    print("stat", os.stat(p).st_size)
    print("stat-seconds", time.monotonic() - t0, file=sys.stderr)
"""


def proc_start(pid):
    s = Path("/proc/%d/stat" % pid).read_text()
    return int(s[s.rindex(")") + 2:].split()[19])


def plant(reg, path, pid):
    """An entry for path, pending (last_seq 5, durable 0), owned by pid in
    helper slot SLOT, whose start time is not pid's."""
    st = os.stat(path)
    idx = next(i for i in range(ENTRIES - 1, -1, -1)
               if struct.unpack_from("<i", reg, ENTRY_OFF + i * ENTRY_SIZE)[0] == 0)
    owner = pid | (((proc_start(pid) + 1) & 0xFFFFFFFF) or 1) << 32
    struct.pack_into("<QQQ", reg, HELPER_OFF + SLOT * HELPER_SIZE, owner, 0, 0)
    e = ENTRY_OFF + idx * ENTRY_SIZE
    struct.pack_into("<IQQQII", reg, e + 4, SLOT, st.st_dev, st.st_ino, 5, 1, 0)
    struct.pack_into("<i", reg, e, pid)
    used = struct.unpack_from("<I", reg, 8)[0]
    struct.pack_into("<I", reg, 8, used + 1)
    return idx


def entry_pid(reg, idx):
    return struct.unpack_from("<i", reg, ENTRY_OFF + idx * ENTRY_SIZE)[0]


def test_reused_pid_is_not_waited_on():
    need_shim()
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as uid %d (a registry of its own)" % UID)
    setpriv = ["setpriv", "--reuid=%d" % UID, "--regid=%d" % UID, "--clear-groups"]
    work = Path(tempfile.mkdtemp(prefix="ackpt-reuse-", dir="/tmp"))
    sleeper = None
    REG.unlink(missing_ok=True)
    try:
        os.chmod(work, 0o777)
        managed = work / "ckpt"
        managed.mkdir(mode=0o777)
        os.chmod(managed, 0o777)
        data = work / "data.bin"
        data.write_bytes(os.urandom(1 << 20))
        os.chmod(data, 0o644)
        reader = work / "reader.py"
        reader.write_text(READER)
        os.chmod(reader, 0o644)

        def shim_run(*args, timeout=60):
            return run(setpriv + [VENV_PY] + list(args), shim_env(managed), cwd=work, timeout=timeout)

        # a managed write starts a helper, which makes the registry
        r = shim_run("-c", "open(%r, 'wb').write(b'x' * 4096)" % str(managed / "first"))
        assert r.returncode == 0, r.describe()
        assert REG.exists(), "no registry at %s after a helper ran as uid %d" % (REG, UID)

        plain = run(setpriv + [VENV_PY, str(reader), str(data), "stat"], plain_env(), cwd=work)
        assert plain.returncode == 0, plain.describe()
        sleeper = subprocess.Popen(["sleep", "600"])
        fd = os.open(REG, os.O_RDWR)
        reg = mmap.mmap(fd, 0)
        os.close(fd)

        idx = plant(reg, data, sleeper.pid)
        r = shim_run(str(reader), str(data), timeout=30)
        assert r.returncode == 0, ("a read-only open and read of a file whose only pending "
                                   "entry names a pid reused by another process:\n" + r.describe())
        assert r.stdout == plain.stdout.split("stat")[0], r.describe()
        assert entry_pid(reg, idx) == sleeper.pid, "the open is not the one to free the entry"

        r = shim_run(str(reader), str(data), "stat", timeout=30)
        assert r.returncode == 0, ("stat of the file waited on the entry (it should give up "
                                   "within a second):\n" + r.describe())
        assert r.stdout == plain.stdout, r.describe()
        assert entry_pid(reg, idx) == 0, "stat's wait did not free the stale entry"

        idx = plant(reg, data, sleeper.pid)
        r = shim_run("-c", "open(%r, 'wb').write(b'y' * 4096)" % str(managed / "second"))
        assert r.returncode == 0, r.describe()
        deadline = time.monotonic() + 30
        while entry_pid(reg, idx) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert entry_pid(reg, idx) == 0, "the next helper's sweep did not free the stale entry"
        reg.close()
    finally:
        if sleeper:
            sleeper.kill()
            sleeper.wait()
        REG.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
