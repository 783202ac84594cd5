"""Faults and degraded environments: real programs under the shim when the
disk fills up, when the program or the helper is SIGKILLed, without io_uring,
without privileges, with injected helper errors, disabled, or misconfigured.

docs/DESIGN.md section 3 items 6, 9 and 10, and section 5.  The programs live in
tests/fault_progs/; helpers in tests/faultutil.py.
"""
import json
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import VENV_PY, compare_trees
from faultutil import (FPROGS, assert_same_trees, file_matches, helper_pids, need_shim,
                       parse_strace, plain_env, prng, py_prog, read_stats, run,
                       run_plain_and_shim, shim_env, strace_argv, wait_for_helper, wait_helpers,
                       inside, WRITE_FAMILY)


@pytest.fixture(autouse=True)
def _shim_required():
    need_shim()


@pytest.fixture(scope="module")
def errcheck(build_c):
    return build_c(FPROGS / "errcheck.c")


@pytest.fixture(scope="module")
def mini(build_c):
    return build_c(FPROGS / "mini.c")


def _first_error(stdout):
    m = re.search(r"^FIRST_ERROR (\w+) (\w+)$", stdout, re.M)
    return (m.group(1), m.group(2)) if m else None


def _read_line(p, timeout, what):
    """One line from p.stdout within timeout seconds (fails the test otherwise)."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = p.stdout.fileno()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            p.kill()
            pytest.fail("no %r line from the program within %.0fs (got %r)" % (what, timeout, buf),
                        pytrace=False)
        c = os.read(fd, 1)
        if not c:
            err = p.stderr.read().decode(errors="replace") if p.stderr else ""
            pytest.fail("program ended before printing %r (status %s):\n%s"
                        % (what, p.wait(), err[-3000:]), pytrace=False)
        buf += c
    return buf.decode().strip()


# --------------------------------------------------------------------------
# ENOSPC on a small tmpfs
# --------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs (needs root / CAP_SYS_ADMIN): %s" % r.stderr.strip())
    yield mnt
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _plain_enospc_control(errcheck, mnt):
    """Without the shim the same program must hit ENOSPC at a write: proves the fs is small."""
    r = run([errcheck, mnt / "plain.bin", 32, 1024, "check", 0, 0], plain_env())
    assert r.returncode == 3 and _first_error(r.stdout) == ("write", "ENOSPC"), \
        "control run without the shim did not hit ENOSPC at a write:\n" + r.describe()
    os.unlink(mnt / "plain.bin")


def test_enospc_checked_backpressure(errcheck, small_tmpfs):
    """32 MiB through a 16 MiB arena onto an 8 MiB tmpfs: the write calls have
    to wait for the helper, so the helper's ENOSPC must reach the program in
    a write/fsync/close call, and the program's own exit status stands."""
    mnt = small_tmpfs
    _plain_enospc_control(errcheck, mnt)
    r = run([errcheck, mnt / "ckpt.bin", 32, 1024, "check", 0, 0], shim_env(mnt, staging="16M"))
    fe = _first_error(r.stdout)
    assert fe is not None and fe[1] == "ENOSPC", \
        "ENOSPC did not surface as errno ENOSPC from write/fsync/close:\n" + r.describe()
    assert r.returncode == 3, ("the program saw and reported the error itself (%s), so its exit "
                               "status 3 must stand:\n%s" % (fe, r.describe()))


def test_enospc_checked_large_arena(errcheck, small_tmpfs):
    """With an arena larger than the data, every call may return before the
    helper fails; the error then must not be lost: either a call returned
    ENOSPC (status 3 stands) or the exit status is 1 with an error line."""
    mnt = small_tmpfs
    r = run([errcheck, mnt / "ckpt.bin", 32, 1024, "check", 0, 0], shim_env(mnt, staging="64M"))
    fe = _first_error(r.stdout)
    if fe is not None:
        assert fe[1] == "ENOSPC" and r.returncode == 3, r.describe()
    else:
        assert "NO_ERROR" in r.stdout, r.describe()
        assert r.returncode == 1, "ENOSPC never reached the program and exit status is not 1:\n" + r.describe()
        assert any("error" in ln for ln in r.stderr_lines()), r.describe()


def test_enospc_ignored_exit_status(errcheck, small_tmpfs):
    """A program that ignores every result and whose calls all return before
    the helper fails (ACKPT_TEST_DELAY_MS=300): exit status 1, error line."""
    mnt = small_tmpfs
    plain = run([errcheck, mnt / "plain.bin", 32, 8192, "ignore", 0, 0], plain_env())
    assert plain.returncode == 0, plain.describe()
    os.unlink(mnt / "plain.bin")
    r = run([errcheck, mnt / "ckpt.bin", 32, 8192, "ignore", 0, 0],
            shim_env(mnt, staging="64M", ACKPT_TEST_DELAY_MS=300))
    assert r.returncode == 1, "unreported ENOSPC did not make the exit status 1:\n" + r.describe()
    assert any(re.search(r"ackpt.*error", ln) for ln in r.stderr_lines()), r.describe()
    assert "No space left on device" in r.stderr or "ENOSPC" in r.stderr, \
        "no stderr line names the cause (ENOSPC):\n" + r.describe()


# --------------------------------------------------------------------------
# SIGKILL
# --------------------------------------------------------------------------

def test_sigkill_program_after_save(tmp_path):
    """The program is SIGKILLed right after its save returned, while the data
    is still in flight: the helper must still finish it (docs/DESIGN.md 3.6)."""
    out = tmp_path / "out"
    out.mkdir()
    target = out / "model.pt"
    mib, seed = 48, 7
    env = shim_env(out, ACKPT_TEST_DELAY_MS=300)
    mark = env["ACKPT_TEST_MARK"]
    p = subprocess.Popen(py_prog("save_then_sleep.py") + [str(target), str(mib), str(seed), "16"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        line = _read_line(p, 30, "saved")
        assert line == "saved"
        helper = wait_for_helper(mark)
        size_at_kill = os.stat(target).st_size
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        assert p.returncode == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
    assert size_at_kill < mib << 20, ("precondition: the data should still be in flight at kill "
                                      "time (on-disk size %d)" % size_at_kill)
    waited = wait_helpers(mark, timeout=30)
    err = p.stderr.read().decode(errors="replace")
    print("helper %d finished %.2fs after the kill; stderr: %r" % (helper, waited, err))
    why = file_matches(target, prng(mib << 20, seed))
    assert why is None, "file incomplete after the helper finished: %s\nstderr:\n%s" % (why, err)
    assert "error" not in err, err


def test_sigkill_helper_mid_save(tmp_path):
    """The helper is SIGKILLed while writes are in flight: the program must
    rewrite the unconfirmed data itself, warn once, exit 0 (docs/DESIGN.md 3.10)."""
    out = tmp_path / "out"
    out.mkdir()
    target = out / "big.distcp"
    before, after, seed = 64, 16, 9
    env = shim_env(out, staging="128M", ACKPT_TEST_DELAY_MS=300)
    mark = env["ACKPT_TEST_MARK"]
    p = subprocess.Popen(py_prog("helper_kill.py") + [str(target), str(before), str(after), str(seed), "8"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.PIPE, start_new_session=True)
    try:
        line = _read_line(p, 30, "staged")
        pending = int(line.split("pending=")[1])
        helper = wait_for_helper(mark)
        size_at_kill = os.stat(target).st_size
        os.kill(helper, signal.SIGKILL)
        t0 = time.monotonic()
        while helper_pids(mark) and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        assert not helper_pids(mark), "the helper survived SIGKILL?"
        so, se = p.communicate(b"go\n", timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    so, se = so.decode(errors="replace"), se.decode(errors="replace")
    assert pending > 0 and size_at_kill < before << 20, \
        ("precondition: writes should be in flight at kill time (ops_pending=%d, on-disk %d)"
         % (pending, size_at_kill))
    assert p.returncode == 0, "program failed after the helper died (status %s):\n%s\n%s" % (
        p.returncode, so, se)
    lines = [ln for ln in se.splitlines() if ln.strip()]
    died = [ln for ln in lines if re.search(r"died|dead|lost", ln)]
    assert len(died) == 1 and len(lines) == 1, \
        "expected exactly one stderr line, a warning about the helper dying; got:\n" + se
    why = file_matches(target, prng((before + after) << 20, seed))
    assert why is None, why


# --------------------------------------------------------------------------
# io_uring unavailable
# --------------------------------------------------------------------------

def _c_basic_pair(run_pair, build_c, tmp_path):
    exe = build_c("c_basic.c")
    return run_pair(lambda out: [exe, out], tmp_path)


def test_io_engine_control(mini, tmp_path):
    """Control for the two tests below: by default the helper runs io_uring (flag 1)."""
    if open("/proc/sys/kernel/io_uring_disabled").read().strip() != "0":
        pytest.skip("io_uring is disabled on this machine (kernel.io_uring_disabled != 0)")
    out = tmp_path / "out"
    out.mkdir()
    r = run([mini, out], shim_env(out, ACKPT_TEST_STATS=tmp_path / "st.json"))
    assert r.returncode == 0, r.describe()
    st = read_stats(tmp_path / "st.json")
    assert st["active"] == 1 and st["helper_flags"] & 1, st


def test_io_pool_forced(run_pair, build_c, tmp_path, monkeypatch):
    monkeypatch.setenv("ACKPT_IO", "pool")
    plain, shimmed = _c_basic_pair(run_pair, build_c, tmp_path)
    assert shimmed.stats["helper_flags"] & 1 == 0, \
        "ACKPT_IO=pool but helper_flags=%d says io_uring" % shimmed.stats["helper_flags"]


@pytest.fixture
def io_uring_disabled():
    path = "/proc/sys/kernel/io_uring_disabled"
    try:
        old = open(path).read().strip()
    except OSError:
        pytest.skip("%s does not exist (kernel older than 6.6)" % path)
    try:
        with open(path, "w") as f:
            f.write("2")
    except OSError as e:
        pytest.skip("cannot write %s: %s" % (path, e))
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(old)


def test_io_uring_disabled_by_sysctl(run_pair, build_c, tmp_path, io_uring_disabled):
    plain, shimmed = _c_basic_pair(run_pair, build_c, tmp_path)
    assert shimmed.stats["helper_flags"] & 1 == 0, shimmed.stats
    warn = [ln for ln in shimmed.stderr.splitlines() if "io_uring" in ln]
    assert len(warn) == 1, "expected one warning about io_uring being unavailable, got:\n" + shimmed.stderr


# --------------------------------------------------------------------------
# Unprivileged
# --------------------------------------------------------------------------

NOBODY = 65534


def _memlock_8m():
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (8 << 20, 8 << 20))


def test_unprivileged(build_c):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to uid %d" % NOBODY)
    exe_src = build_c("c_basic.c")
    work = Path(tempfile.mkdtemp(prefix="ackpt-unpriv-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        os.chown(work, NOBODY, NOBODY)
        exe = work / "c_basic"
        shutil.copy(exe_src, exe)
        os.chmod(exe, 0o755)
        setpriv = ["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups",
                   "--inh-caps=-all", "--bounding-set=-all"]
        res, stats, outs = {}, {}, {}
        for label in ("plain", "shim"):
            base = work / label
            out = base / "out"
            out.mkdir(parents=True)
            for d in (base, out):
                os.chown(d, NOBODY, NOBODY)
            sp = base / "stats.json"
            env = plain_env(ACKPT_TEST_STATS=sp) if label == "plain" else shim_env(out, ACKPT_TEST_STATS=sp)
            r = run(setpriv + [exe, out], env, cwd=base, preexec_fn=_memlock_8m)
            assert r.returncode == 0, "%s run as uid %d failed:\n%s" % (label, NOBODY, r.describe())
            res[label], stats[label], outs[label] = r, read_stats(sp), out
        owners = {os.stat(p).st_uid for p in outs["shim"].iterdir()}
        assert owners == {NOBODY}, "output not written by uid %d: owners %s" % (NOBODY, owners)
        assert_same_trees(compare_trees(outs["plain"], outs["shim"]), res["shim"])
        st = stats["shim"]
        assert st and st.get("present") == 1, "the preload did not take effect: %r\n%s" % (
            st, res["shim"].describe())
        assert st["active"] == 1 and st["bytes_staged"] > 0, st
        assert not st["helper_flags"] & 2, \
            "fixed buffers registered despite an 8 MiB RLIMIT_MEMLOCK and no CAP_IPC_LOCK: %r" % st
        print("unprivileged shim stats: %s; stderr: %r" % (json.dumps(st), res["shim"].stderr))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------
# Injected helper errors (ACKPT_FAULT)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["write", "fsync"])
def test_fault_checked(errcheck, tmp_path, op):
    """EIO injected into the helper's first write/fsync; the program pauses
    400 ms before fsync and before close, so the error must be back by then:
    op=write -> a later write or fsync returns EIO; op=fsync -> close does."""
    out = tmp_path / "out"
    out.mkdir()
    r = run([errcheck, out / "f.bin", 8, 1024, "check", 400, 400],
            shim_env(out, ACKPT_FAULT="op=%s,nth=1,err=EIO" % op))
    fe = _first_error(r.stdout)
    allowed = {"write": ("write", "fsync"), "fsync": ("close",)}[op]
    assert fe is not None and fe[1] == "EIO" and fe[0] in allowed, \
        "expected EIO from %s:\n%s" % ("/".join(allowed), r.describe())
    assert r.returncode == 3, "the program handled the error; its status 3 must stand:\n" + r.describe()


def test_fault_checked_no_pause(errcheck, tmp_path):
    """No pauses: whether the error comes back in a call or not depends on
    timing, but it is never lost."""
    out = tmp_path / "out"
    out.mkdir()
    r = run([errcheck, out / "f.bin", 8, 1024, "check", 0, 0],
            shim_env(out, ACKPT_FAULT="op=write,nth=1,err=EIO"))
    fe = _first_error(r.stdout)
    if fe is not None:
        assert fe[1] == "EIO" and r.returncode == 3, r.describe()
    else:
        assert r.returncode == 1 and any("error" in ln for ln in r.stderr_lines()), \
            "EIO neither returned to the program nor turned into exit status 1:\n" + r.describe()


@pytest.mark.parametrize("op", ["write", "fsync"])
def test_fault_ignored(errcheck, tmp_path, op):
    """All calls return before the helper fails (ACKPT_TEST_DELAY_MS=300) and
    the program ignores results anyway: exit status 1 and an error line."""
    out = tmp_path / "out"
    out.mkdir()
    r = run([errcheck, out / "f.bin", 8, 8192, "ignore", 0, 0],
            shim_env(out, ACKPT_TEST_DELAY_MS=300, ACKPT_FAULT="op=%s,nth=1,err=EIO" % op))
    assert r.returncode == 1, "unreported EIO did not make the exit status 1:\n" + r.describe()
    assert any(re.search(r"ackpt.*error", ln) for ln in r.stderr_lines()), r.describe()


# --------------------------------------------------------------------------
# ACKPT_DISABLE=1 and bad configuration
# --------------------------------------------------------------------------

def test_disable_is_pass_through(build_c, tmp_path):
    if shutil.which("strace") is None:
        pytest.skip("strace not installed")
    exe = build_c("c_basic.c")
    trace = tmp_path / "trace.txt"

    def wrap(label, argv, base):
        return strace_argv(trace, argv, "write,pwrite64,writev,pwritev,pwritev2,execve") if label == "shim" else argv

    plain, shimmed, pst, sst, diffs = run_plain_and_shim(lambda out: [exe, out], tmp_path,
                                                         shim_extra={"ACKPT_DISABLE": "1"}, wrap=wrap)
    assert_same_trees(diffs, shimmed)
    assert sst["present"] == 1 and sst["active"] == 0 and sst["bytes_staged"] == 0, sst
    calls = parse_strace(trace)
    execs = [c for c in calls if c.name == "execve"]
    assert execs, "strace saw no execve at all: the trace is broken"
    assert not [c for c in execs if "ackpt-helper" in c.args], "an ackpt-helper was executed"
    prog_pid = execs[0].pid
    out = tmp_path / "shim" / "out"
    own = [c for c in calls if c.pid == prog_pid and c.name in WRITE_FAMILY and inside(c.fd_path(), out)]
    assert len(own) > 1000, "the program's own write syscalls to managed files: %d" % len(own)
    assert not shimmed.stderr.strip(), shimmed.stderr


BAD_VALUES = [
    ("ACKPT_STAGING", "abc"),
    ("ACKPT_STAGING", "1K"),
    ("ACKPT_LOG", "loud"),
    ("ACKPT_COMMIT", "maybe"),
    ("ACKPT_DISABLE", "yes"),
    ("ACKPT_PATHS", "relative/path"),
    ("ACKPT_DIRECT", "2"),
    ("ACKPT_IO", "aio"),
    ("ACKPT_EARLY_START", "sometimes"),
]


@pytest.mark.parametrize("var,value", BAD_VALUES, ids=["%s=%s" % v for v in BAD_VALUES])
def test_bad_config(mini, tmp_path, var, value):
    extra = {var: value}
    staging = None if var == "ACKPT_STAGING" else "64M"
    plain, shimmed, pst, sst, diffs = run_plain_and_shim(
        lambda out: [mini, out], tmp_path, staging=staging, shim_extra=extra)
    lines = shimmed.stderr_lines()
    assert len(lines) == 1 and var in lines[0], \
        "expected exactly one stderr line naming %s, got:\n%s" % (var, shimmed.stderr)
    assert_same_trees(diffs, shimmed)
    assert sst["present"] == 1 and sst["active"] == 0 and sst["bytes_staged"] == 0, \
        "not pass-through: %r" % sst


def test_stale_backup_links_removed_by_next_commit(tmp_path):
    """A helper that dies (or a machine that loses power) between linking the
    previous metadata to ".<name>.ackpt.prev.<helper pid>" and removing that
    link leaves it behind. The next durable commit of <name> removes such
    links of dead pids, and leaves a live process's link alone."""
    need_shim()
    out = tmp_path / "ckpt"
    out.mkdir()
    name = "latest_checkpointed_iteration.txt"
    dead = out / (".%s.ackpt.prev.%d" % (name, 4194303))   # above any pid in use here
    live = out / (".%s.ackpt.prev.%d" % (name, os.getpid()))
    other = out / (".other.txt.ackpt.prev.%d" % 4194303)     # another name's: not ours to judge
    for p in (dead, live, other):
        p.write_text("old")
    try:
        os.kill(4194303, 0)
        pytest.skip("pid 4194303 is in use on this machine")
    except ProcessLookupError:
        pass
    prog = Path(__file__).parent / "faults" / "progs" / "sweep_save.py"
    res = run([VENV_PY, prog, "tracker", out, "1"], shim_env(out))
    assert res.returncode == 0 and "OK" in res.stdout, res.describe()
    assert (out / name).read_text() == "1"
    assert not dead.exists(), "the dead helper's backup link is still there"
    assert live.exists() and other.exists(), "a link that was not stale was removed"


def test_failed_fsync_is_never_retried_and_trusted(tmp_path):
    """The helper fails a write (ACKPT_FAULT, EIO) and drops every later write
    to that file. The program's fsync reports EIO, and so does every retry:
    a second fsync returning 0 would claim durability for lost data (the
    kernel's own behaviour, which PostgreSQL's "fsyncgate" showed to be a
    trap). Every later write fails too, rather than report success for bytes
    that are dropped. The program was told, so the exit status is its own (0
    here)."""
    need_shim()
    out = tmp_path / "ckpt"
    out.mkdir()
    prog = tmp_path / "retry.py"
    prog.write_text(
        "import ctypes, errno, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n"
        "os.write(fd, b'x' * (1 << 20))\n"
        "ctypes.CDLL(None).ackpt_wait(ctypes.c_double(30.0))\n"
        "res = []\n"
        "for i in range(3):\n"
        "    try:\n"
        "        os.fsync(fd)\n"
        "        res.append('ok')\n"
        "    except OSError as e:\n"
        "        res.append(errno.errorcode[e.errno])\n"
        "    try:\n"
        "        os.write(fd, b'y' * 4096)\n"
        "        res.append('w-ok')\n"
        "    except OSError as e:\n"
        "        res.append('w-' + errno.errorcode[e.errno])\n"
        "print(' '.join(res), flush=True)\n")
    res = run([VENV_PY, prog, out / "data.bin"],
              shim_env(out, ACKPT_FAULT="op=write,nth=1,err=EIO,mode=once"))
    assert res.stdout.split() == ["EIO", "w-EIO"] * 3, res.describe()
    assert res.returncode == 0, res.describe()
