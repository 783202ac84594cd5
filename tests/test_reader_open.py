"""Another process's read-only open does not wait (docs/DESIGN.md 3.3).

A writer stages a 24 MiB file and closes it while its helper is slow
(ACKPT_TEST_DELAY_MS); a second process under the shim then opens the file
for reading.  The open cannot observe the pending work, so it returns at
once: the writer checks, right after the reader said it had opened, that
its own work is still pending.  Everything that can observe the contents
through the reader's descriptor then sees all of it:
- fstat's size, read, pread through a dup, mmap;
- a stdio stream over a dup (fdopen, then glibc's fread, which no wrapper
  sees);
- an exec'd program whose stdin is the descriptor (CPython's subprocess:
  dup2 in a vfork child, then exec);
- a process without the shim that receives a dup over SCM_RIGHTS.
The same programs run without ackpt; every line they print and the file
must match.
"""
from pathlib import Path

import pytest

from conftest import VENV_PY
from faultutil import need_shim, plain_env, run, shim_env

PROGS = Path(__file__).resolve().parent / "progs"

WRITER = r"""
import os, subprocess, sys
d, reader = sys.argv[1], sys.argv[2]
sys.path.insert(0, sys.argv[3])
from progutil import get_stats
under = "libackpt" in os.environ.get("LD_PRELOAD", "")

def pending():
    s = get_stats()
    assert s["rc"] == 0, s
    return s["ops_pending"]

r = subprocess.Popen([sys.executable, reader, d], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     text=True)
blob = bytes(range(256)) * 4096                  # 1 MiB
with open(os.path.join(d, "model.pt"), "wb") as f:
    for i in range(24):
        f.write(bytes([i]) * 16 + blob[16:])
r.stdin.write("open\n")
r.stdin.flush()
assert r.stdout.readline() == "opened\n"
# only non-zero if the reader's open did not wait for this work
print("pending-at-reader-open", pending() >= 2 if under else "plain")
r.stdin.write("go\n")
r.stdin.flush()
out, _ = r.communicate(timeout=120)
print(out, end="")
print("exit", r.returncode)
"""

READER = r"""
import ctypes, hashlib, mmap, os, socket, subprocess, sys
d = sys.argv[1]
p = os.path.join(d, "model.pt")
sha = lambda b: hashlib.sha256(b).hexdigest()
assert sys.stdin.readline() == "open\n"
fd = os.open(p, os.O_RDONLY)
print("opened", flush=True)
assert sys.stdin.readline() == "go\n"
print("fstat", os.fstat(fd).st_size)
data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
print("read", len(data), sha(data))
d2 = os.dup(fd)
print("pread-dup", sha(os.pread(d2, 3 << 20, 21 << 20)))
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
print("mmap", sha(m[:]))
m.close()
# a stdio stream over a dup: glibc's fread calls no wrapper
libc = ctypes.CDLL(None, use_errno=True)
libc.fdopen.restype = ctypes.c_void_p
libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
libc.fread.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
os.lseek(fd, 0, os.SEEK_SET)
fp = libc.fdopen(os.dup(fd), b"r")
buf = ctypes.create_string_buffer(24 << 20)
n = libc.fread(buf, 1, 24 << 20, fp)
libc.fclose(fp)
print("fdopen-fread", n, sha(buf.raw[:n]))
# an exec'd program reads the descriptor as its stdin
os.lseek(fd, 0, os.SEEK_SET)
out = subprocess.run(["sha256sum"], stdin=fd, capture_output=True, text=True).stdout
print("exec-stdin", out.split()[0])
# a process without the shim receives a copy over SCM_RIGHTS
a, b = socket.socketpair()
env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
child = subprocess.Popen([sys.executable, "-c", RECV, str(b.fileno())], pass_fds=[b.fileno()],
                         env=env, stdout=subprocess.PIPE, text=True)
b.close()
socket.send_fds(a, [b"x"], [os.dup(fd)])
print("scm-rights", child.communicate(timeout=60)[0].strip())
"""

RECV = r"""
import hashlib, os, socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
_, fds, _, _ = socket.recv_fds(s, 1, 1)
data = os.pread(fds[0], 24 << 20, 0)
print(len(data), hashlib.sha256(data).hexdigest())
"""


def test_reader_in_another_process_does_not_wait_at_open(tmp_path):
    need_shim()
    reader = tmp_path / "reader.py"
    reader.write_text("RECV = %r\n" % RECV + READER)
    writer = tmp_path / "writer.py"
    writer.write_text(WRITER)
    outs = {}
    for label in ("plain", "shim"):
        out = tmp_path / label
        out.mkdir()
        # 50 ms per helper op: the 24 writes and the CLOSE are still pending
        # when the reader opens
        env = plain_env() if label == "plain" else shim_env(out, ACKPT_TEST_DELAY_MS="50")
        r = run([VENV_PY, writer, out, reader, PROGS], env, cwd=out, timeout=300)
        assert r.returncode == 0, r.describe()
        outs[label] = r.stdout
    plain = [l for l in outs["plain"].splitlines() if not l.startswith("pending-")]
    shim = [l for l in outs["shim"].splitlines() if not l.startswith("pending-")]
    assert shim == plain, (outs["plain"], outs["shim"])
    assert "read %d" % (24 << 20) in outs["plain"], outs["plain"]
    assert "pending-at-reader-open True" in outs["shim"], outs["shim"]
    assert (tmp_path / "shim" / "model.pt").read_bytes() == (tmp_path / "plain" / "model.pt").read_bytes()
