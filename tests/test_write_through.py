"""Writes that staging cannot take at memcpy speed go through the kernel
(docs/DESIGN.md, "Never slower than synchronous").

When the arena is full, or the helper has not faulted in the part a write
would land in, the program writes that chunk itself with pwrite, at the
cost a run without ackpt pays, instead of waiting for the disk or for
first-touch page faults.  It may do so only where no staged write of the
same file that is not durable yet covers the same bytes, so the file ends
as if every write had gone in order.  The helper still fsyncs the file
(the shim queues a DIRTY op), so commits and closes stay durable.
"""
import shutil
import subprocess

import pytest

from conftest import VENV_PY
from faultutil import (helper_pid_set, inside, need_shim, parse_strace, run, shim_env,
                       strace_argv)

# A writer that mixes every order question: sequential chunks far past the
# staging size, an overwrite of an early range while later chunks may still
# be staged, a second descriptor, pwrite past the end (a hole), append.
WRITER = r"""
import os, random, sys
d = sys.argv[1]
blob = random.Random(1).randbytes(4 << 20)
p = os.path.join(d, "big.bin")
with open(p, "wb") as f:
    for i in range(24):
        f.write(blob)
        if i == 10:
            f.seek(1 << 20)
            f.write(b"A" * (3 << 20))   # over staged (or written-through) bytes
            f.seek(0, 2)
    f.write(b"tail")
fd = os.open(p, os.O_RDWR)
os.pwrite(fd, b"B" * 5000, 130 << 20)  # past the end: a hole before it
os.pwrite(fd, b"C" * 70000, 2 << 20)   # early range again, second description
os.close(fd)
with open(p, "ab") as f:
    f.write(b"appended")
q = os.path.join(d, "log.bin")                # an O_APPEND description from the start
with open(q, "ab") as f:
    for i in range(8):
        f.write(blob)
fd = os.open(q, os.O_WRONLY)                   # and one that becomes O_APPEND later
os.write(fd, b"head")
import fcntl
fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
for i in range(6):
    os.write(fd, blob)
os.close(fd)
with open(p, "rb") as f:               # read back in the same process
    data = f.read()
print(len(data), data[(2 << 20) - 3:(2 << 20) + 3], data[-8:])
"""


def _run(tmp_path, label, env_extra, staging="16M", wrap=None):
    out = tmp_path / label / "out"
    out.mkdir(parents=True)
    argv = [VENV_PY, "-c", WRITER, str(out)]
    if env_extra is None:
        from faultutil import plain_env
        env = plain_env()
    else:
        env = shim_env(out, staging=staging, ACKPT_LOG="info", **env_extra)
    if wrap:
        argv = wrap(argv, tmp_path / label)
    r = run(argv, env, cwd=tmp_path / label, timeout=180)
    assert r.returncode == 0, r.describe()
    return out, r


@pytest.mark.parametrize("helper", ["normal", "slow"])
def test_written_through_file_matches_plain_run(tmp_path, helper):
    """16 MiB of staging, 96 MiB written: most chunks go through the kernel.
    With a slow helper (50 ms per op) the overwrite and the second
    descriptor land on bytes whose staged writes are not durable yet, so
    they must be staged (or wait) rather than written through.  The file,
    what the program reads back, and its stdout equal a plain run's."""
    need_shim()
    extra = {"ACKPT_WRITE_THROUGH": "auto"}
    if helper == "slow":
        extra["ACKPT_TEST_DELAY_MS"] = 50
    plain, rp = _run(tmp_path, "plain", None)
    shim, rs = _run(tmp_path, "shim", extra)
    assert rs.stdout == rp.stdout, (rp.stdout, rs.stdout)
    assert (shim / "big.bin").read_bytes() == (plain / "big.bin").read_bytes()
    assert (shim / "log.bin").read_bytes() == (plain / "log.bin").read_bytes()
    summary = [ln for ln in rs.stderr.splitlines() if "written through" in ln]
    assert summary, rs.stderr
    through = float(summary[-1].split("MiB staged, ")[1].split(" MiB written through")[0])
    print(summary[-1])
    assert through > 0, "nothing went through the kernel: the test tested nothing\n" + rs.stderr


OVERLAP = r"""
import os, sys, random, time
d = sys.argv[1]
blob = random.Random(1).randbytes(4 << 20)
with open(os.path.join(d, "warm.bin"), "wb") as f:   # the arena faults in meanwhile
    f.write(blob * 6)
time.sleep(float(sys.argv[2]))                       # ... and its writes are done
fd = os.open(os.path.join(d, "f.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for i in range(6):
    os.write(fd, blob)                 # 4 staged (arena full, slow helper), 2 through
os.pwrite(fd, b"Z" * (1 << 20), 0)     # over the first, still staged
os.close(fd)
"""


def test_no_write_through_over_staged_bytes(tmp_path):
    """The order rule, made to bite: a slow helper (300 ms per write) and a
    16 MiB arena.  After a warm-up file has drained, four 4 MiB chunks of
    f.bin are staged and fill the arena, two more go through the kernel,
    then 1 MiB of Z is written at offset 0 while the arena is still full.
    Through the kernel it would land first and be overwritten by the staged
    chunk: it must be staged behind it instead.  (Checked: with the rule
    removed, f.bin differs from the plain run's.)"""
    need_shim()
    outs = {}
    for label in ("plain", "shim"):
        out = tmp_path / label
        out.mkdir()
        if label == "plain":
            from faultutil import plain_env
            env = plain_env()
        else:
            env = shim_env(out, staging="16M", ACKPT_TEST_DELAY_MS=300,
                           ACKPT_WRITE_THROUGH="auto", ACKPT_LOG="info")
        r = run([VENV_PY, "-c", OVERLAP, str(out), "2.5"], env, cwd=out, timeout=120)
        assert r.returncode == 0, r.describe()
        outs[label] = (out / "f.bin").read_bytes()
        if label == "shim":
            print([ln for ln in r.stderr.splitlines() if "written through" in ln])
            assert "MiB staged" in r.stderr and " 0.0 MiB written through" not in r.stderr, \
                r.stderr
    assert outs["shim"] == outs["plain"], "f.bin differs from the plain run's"


def test_off_stages_everything(tmp_path):
    """ACKPT_WRITE_THROUGH=off: the same program, every byte staged, nothing
    written through, and the same file."""
    need_shim()
    plain, rp = _run(tmp_path, "plain", None)
    shim, rs = _run(tmp_path, "shim", {"ACKPT_WRITE_THROUGH": "off"})
    assert (shim / "big.bin").read_bytes() == (plain / "big.bin").read_bytes()
    assert " 0.0 MiB written through" in rs.stderr, rs.stderr


def test_program_pwrites_then_helper_fsyncs(tmp_path):
    """What reached the kernel (strace, pwrite-pool helper so its fsyncs are
    visible): the program's own calls on the managed file are pwrite64 only
    (never write/writev, never an fsync), and the helper fsyncs the file
    after the program's last pwrite to it."""
    need_shim()
    if shutil.which("strace") is None:
        pytest.skip("strace not installed")
    trace = tmp_path / "shim" / "strace.txt"

    def wrap(argv, base):
        return strace_argv(trace, argv)

    out, rs = _run(tmp_path, "shim", {"ACKPT_WRITE_THROUGH": "auto", "ACKPT_IO": "pool"},
                   wrap=wrap)
    calls = parse_strace(trace)
    helpers = helper_pid_set(calls)
    assert helpers, "no helper in the trace"
    mine = [(i, c) for i, c in enumerate(calls)
            if c.pid not in helpers and c.fd_path() and inside(c.fd_path(), out)
            and c.name in ("write", "writev", "pwrite64", "pwritev", "pwritev2", "fsync",
                           "fdatasync")]
    assert mine, "the program wrote nothing through the kernel\n" + rs.stderr
    assert {c.name for _, c in mine} == {"pwrite64"}, sorted({c.name for _, c in mine})
    last = max(i for i, _ in mine)
    synced = [i for i, c in enumerate(calls)
              if c.pid in helpers and c.name in ("fsync", "fdatasync") and c.fd_path()
              and c.fd_path().endswith("/big.bin")]
    assert synced and max(synced) > last, \
        "the helper did not fsync big.bin after the program's last pwrite to it"
    print("program pwrite64 calls on big.bin: %d; helper fsyncs after the last: %d"
          % (len(mine), sum(1 for i in synced if i > last)))


def test_bad_value_is_one_line(tmp_path):
    need_shim()
    env = shim_env(tmp_path, ACKPT_WRITE_THROUGH="sometimes")
    r = subprocess.run([VENV_PY, "-c", "open(%r, 'w').write('x')" % str(tmp_path / "f")],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "ACKPT_WRITE_THROUGH" in lines[0], r.stderr
    assert (tmp_path / "f").read_text() == "x"
