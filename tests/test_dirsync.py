"""fsync of a checkpoint's directory while its files' writes are in flight
(docs/DESIGN.md 3.2).

A careful saver ends with fsync of the directory.  Without ackpt its files
are durable by then and the call costs under a millisecond; under ackpt the
helper is still writing them, and the journal commit that a directory fsync
forces waits for those writes.  So while this process has work pending, the
fsync of a directory that holds managed files is the helper's, in order
after everything staged before it, and the program's call returns at once.
With nothing pending it is the kernel's, from the program.

- strace: the program's first directory fsync (work pending) is not a system
  call of the program, and the helper fsyncs that directory; its second
  (after ackpt_wait: nothing pending) is the program's own; the files match
  a plain run's;
- a directory outside the managed root is the program's own fsync even with
  work pending;
- the helper's directory fsync fails (ACKPT_FAULT op=dirfsync): the
  program's next directory fsync returns EIO, and ackpt_wait reports it;
  and so it does when the helper has died in between.
"""
import subprocess

import pytest

from conftest import VENV_PY
from faultutil import need_shim, plain_env, run, shim_env
from test_early_start import PROGS

DSYNC = r"""
import errno, os


def dsync(path):  # fsync the directory at path: "ok" or the errno's name
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
    finally:
        os.close(fd)
"""

PROG = DSYNC + r"""
import sys
sys.path.insert(0, sys.argv[2])
from progutil import ackpt_wait, prng_bytes
d, other = sys.argv[1], sys.argv[3]
with open(os.path.join(d, "a.bin"), "wb") as f:
    f.write(prng_bytes(16 << 20, 7))

out = [dsync(other), dsync(d)]   # work pending
w = ackpt_wait(60)
out += [dsync(d), dsync(d)]      # nothing pending: an error left is reported once
print(" ".join(out), "wait", "none" if w is None else w)
"""


def run_prog(tmp_path, label, env_fn, wrap=()):
    d = tmp_path / label
    other = tmp_path / (label + "-other")
    d.mkdir()
    other.mkdir()
    prog = tmp_path / "dirsync.py"
    prog.write_text(PROG)
    r = run(list(wrap) + [VENV_PY, prog, d, PROGS, other], env_fn(d), cwd=tmp_path, timeout=120)
    return r, d


def fsyncs_of(lines, path, mine):
    """fsync calls of the directory path in the strace -f -y lines, by the
    program's main thread (mine) or by any other task (the helper)."""
    prog = lines[0].split()[0]
    want = "<%s>" % path
    return [ln for ln in lines if "fsync(" in ln and want in ln and
            (ln.split()[0] == prog) == mine]


def test_directory_fsync_goes_to_the_helper_while_work_is_pending(tmp_path):
    need_shim()
    if subprocess.run(["which", "strace"], capture_output=True).returncode:
        pytest.skip("strace is not installed")
    plain, pd = run_prog(tmp_path, "plain", lambda d: plain_env())
    assert plain.returncode == 0, plain.describe()
    assert plain.stdout.split() == ["ok"] * 4 + ["wait", "none"], plain.describe()
    trace = tmp_path / "trace"
    r, sd = run_prog(tmp_path, "shim", lambda d: shim_env(d, ACKPT_TEST_DELAY_MS="20"),
                     wrap=["strace", "-f", "-qq", "-y", "-e", "trace=fsync", "-o", str(trace)])
    assert r.returncode == 0, r.describe()
    assert r.stdout.split() == ["ok"] * 4 + ["wait", "0"], r.describe()
    lines = trace.read_text().splitlines()
    other = tmp_path / "shim-other"
    # pending work: the checkpoint's directory is the helper's to fsync ...
    assert fsyncs_of(lines, sd, mine=False), "the helper never fsynced %s:\n%s" % (
        sd, "\n".join(lines))
    # ... the program's own fsyncs of it are the two after the wait
    assert len(fsyncs_of(lines, sd, mine=True)) == 2, "\n".join(lines)
    # a directory that holds no managed files stays the program's
    assert len(fsyncs_of(lines, other, mine=True)) == 1, "\n".join(lines)
    assert (sd / "a.bin").read_bytes() == (pd / "a.bin").read_bytes()


def test_a_failed_directory_fsync_reaches_the_program(tmp_path):
    need_shim()
    r, _ = run_prog(tmp_path, "shim", lambda d: shim_env(
        d, ACKPT_TEST_DELAY_MS="20", ACKPT_FAULT="op=dirfsync,err=EIO,mode=sticky"))
    # the deferred fsync returned at once; the wait reports the failure, the
    # next directory fsync returns it, and the one after is the kernel's
    assert r.stdout.split() == ["ok", "ok", "EIO", "ok", "wait", "-5"], r.describe()
    assert "fsync of directory" in r.stderr, r.describe()


DEAD_PROG = DSYNC + r"""
import signal, sys
sys.path.insert(0, sys.argv[2])
sys.path.insert(0, sys.argv[3])
from progutil import ackpt_wait, get_stats, prng_bytes
from faultutil import helper_pids
d = sys.argv[1]

with open(os.path.join(d, "a.bin"), "wb") as f:
    f.write(prng_bytes(16 << 20, 7))
out = [dsync(d), "wait", str(ackpt_wait(60))]   # deferred; the helper's fails
for pid in helper_pids(os.environ["ACKPT_TEST_MARK"]):
    os.kill(pid, signal.SIGKILL)
with open(os.path.join(d, "b.bin"), "wb") as f:
    f.write(b"b" * 4096)
ackpt_wait(60)   # finds the helper gone, and writes b.bin itself
out += ["active", str(get_stats()["active"]), dsync(d), dsync(d)]
print(" ".join(out))
"""


def test_a_failed_directory_fsync_is_reported_after_the_helper_died(tmp_path):
    """The helper's deferred directory fsync failed, then the helper died
    before the program fsynced the directory again: that next fsync still
    returns the error (from the control block, which stays mapped), and the
    one after is the kernel's."""
    need_shim()
    d = tmp_path / "ckpt"
    d.mkdir()
    prog = tmp_path / "dead.py"
    prog.write_text(DEAD_PROG)
    tests = PROGS.parent
    # nth=3: the helper's first two directory fsyncs make a.bin's name
    # durable (its directory, and that directory's parent); the third is
    # the program's deferred one
    r = run([VENV_PY, prog, d, PROGS, tests], shim_env(
        d, ACKPT_TEST_DELAY_MS="20", ACKPT_FAULT="op=dirfsync,nth=3,err=EIO"), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.describe()
    words = r.stdout.split()
    assert words[:3] == ["ok", "wait", "-5"], r.describe()
    assert words[3:5] == ["active", "0"], "the helper's death went unnoticed: " + r.describe()
    assert words[5:] == ["EIO", "ok"], r.describe()
    assert "fsync of directory %s failed" % d in r.stderr, r.describe()
    assert (d / "b.bin").read_bytes() == b"b" * 4096
