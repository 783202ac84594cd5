"""The session starts at program start for the trainer (docs/DESIGN.md 3.23).

ACKPT_EARLY_START=auto (the default) starts the helper in the background as
the program starts, instead of at its first managed open, when the process
looks like the trainer: a Python program that ackpt-run started itself, or
one a launcher started as a rank of a one-rank job (RANK and LOCAL_RANK).
Each case runs a Python program that reports, before it opens anything
under the managed root, whether its session is up (ackpt_get_stats'
`active`), and whether a Python child it starts has one; then it writes a
checkpoint.  The checkpoint must match a plain run byte for byte, and every
helper must be gone when the program is.

- ackpt-run -- python prog: up before the first managed open; its child
  (same environment, another pid) does not start early;
- ACKPT_EARLY_START=off, LD_PRELOAD without ackpt-run, and a launcher
  (a script named torchrun run by python): no session until the first
  managed open;
- RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 (torchrun --nproc-per-node 1): early;
- rank 1 of a two-rank job started before rank 0: early, and while its
  start waits for rank 0's coordinator, the program's dup2, fcntl and
  close_range go on (the start waits with the session lock dropped);
- ACKPT_EARLY_START=on: any program, here a shell;
- a fork at the very start, while the session may be starting: parent and
  child write their files, and nothing is left behind;
- a close of every descriptor above 2 at the very start: ackpt's own are
  spared, the session stays up, and stderr stays empty.
"""
import os
import sys
from pathlib import Path

import pytest

from conftest import REPO, VENV_PY, find_launcher
from faultutil import need_shim, plain_env, run, shim_env

PROGS = REPO / "tests" / "progs"

PROG = r"""
import os, subprocess, sys, time
sys.path.insert(0, sys.argv[2])
from progutil import get_stats, prng_bytes
out, wait = sys.argv[1], float(sys.argv[3])

def up():
    return get_stats().get("active", 0)

t0 = time.monotonic()
while not up() and time.monotonic() - t0 < wait:
    time.sleep(0.01)
before = up()
child = subprocess.run([sys.executable, "-c",
                        "import sys, time; sys.path.insert(0, %r); from progutil import get_stats; "
                        "time.sleep(1); print(get_stats().get('active', 0))" % sys.argv[2]],
                       stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
with open(os.path.join(out, "model.pt"), "wb") as f:
    f.write(prng_bytes(8 << 20, 1))
print("before-open", before, "child", child, "after", up(), file=sys.stderr)
"""

FORK_PROG = r"""
import os, sys
pid = os.fork()  # at once: the session may be starting in another thread
sys.path.insert(0, sys.argv[2])
from progutil import prng_bytes
name = "child.bin" if pid == 0 else "parent.bin"
with open(os.path.join(sys.argv[1], name), "wb") as f:
    f.write(prng_bytes(4 << 20, 2 if pid == 0 else 3))
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
"""


def observed(res):
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("before-open")]
    assert line, res.describe()
    w = line[-1].split()
    return {"before": int(w[1]), "child": int(w[3]), "after": int(w[5])}


@pytest.fixture
def prog(tmp_path):
    need_shim()
    p = tmp_path / "early.py"
    p.write_text(PROG)
    return p


def run_prog(tmp_path, label, argv_prefix, env, wait, script="early.py"):
    out = tmp_path / label
    out.mkdir()
    if not (tmp_path / script).exists():
        (tmp_path / script).write_text(PROG)
    r = run(argv_prefix + [VENV_PY, tmp_path / script, out, PROGS, str(wait)], env, cwd=tmp_path)
    assert r.returncode == 0, r.describe()
    return r, out


def same_checkpoint(a, b):
    assert (a / "model.pt").read_bytes() == (b / "model.pt").read_bytes()


def launcher_env(out, **extra):
    env = shim_env(out, **extra)
    for k in ("LD_PRELOAD", "ACKPT_PATHS", "ACKPT_STAGING", "ACKPT_HELPER"):
        env.pop(k, None)
    return env


def test_ackpt_run_starts_the_program_early_not_its_child(tmp_path, prog):
    plain, pout = run_prog(tmp_path, "plain", [], plain_env(), 0)
    runner = find_launcher()
    out = tmp_path / "shim"
    r, sout = run_prog(tmp_path, "shim", [runner, "--dir", out, "--staging", "64M", "--"],
                       launcher_env(out), 20)
    o = observed(r)
    assert o == {"before": 1, "child": 0, "after": 1}, (o, r.describe())
    same_checkpoint(pout, sout)


@pytest.mark.parametrize("how", ["off", "no-ackpt-run", "launcher"])
def test_no_early_start(tmp_path, prog, how):
    plain, pout = run_prog(tmp_path, "plain", [], plain_env(), 0)
    out = tmp_path / "shim"
    script = "early.py"
    if how == "launcher":
        # python .../torchrun: a launcher, whatever the interpreter's name
        argv = [find_launcher(), "--dir", out, "--staging", "64M", "--"]
        env, script = launcher_env(out), "torchrun"
    elif how == "off":
        argv = [find_launcher(), "--dir", out, "--staging", "64M", "--"]
        env = launcher_env(out, ACKPT_EARLY_START="off")
    else:
        argv, env = [], shim_env(out)
    r, sout = run_prog(tmp_path, "shim", argv, env, 1, script)
    assert observed(r)["before"] == 0, r.describe()
    same_checkpoint(pout, sout)


def test_a_one_rank_job_starts_early(tmp_path, prog):
    plain, pout = run_prog(tmp_path, "plain", [], plain_env(), 0)
    out = tmp_path / "shim"
    r, sout = run_prog(tmp_path, "shim", [], shim_env(out, RANK=0, LOCAL_RANK=0, WORLD_SIZE=1), 20)
    o = observed(r)
    assert o["before"] == 1 and o["child"] == 0, (o, r.describe())
    same_checkpoint(pout, sout)


def test_on_starts_any_program(tmp_path):
    """on: a shell that opens nothing gets its helper; auto: it does not."""
    import subprocess
    import time

    from faultutil import helper_pids, new_mark, wait_helpers

    need_shim()
    out = tmp_path / "out"
    out.mkdir()
    for mode, want in (("on", True), ("auto", False)):
        mark = new_mark()
        p = subprocess.Popen(["bash", "-c", "read line"], stdin=subprocess.PIPE,
                             env=shim_env(out, mark=mark, ACKPT_EARLY_START=mode))
        t0, seen = time.monotonic(), False
        while time.monotonic() - t0 < (10 if want else 1):
            seen = bool(helper_pids(mark))
            if seen:
                break
            time.sleep(0.02)
        p.communicate(b"done\n", timeout=30)
        wait_helpers(mark)
        assert p.returncode == 0 and seen == want, (mode, seen)


def test_fork_at_start(tmp_path):
    need_shim()
    prog = tmp_path / "fork.py"
    prog.write_text(FORK_PROG)
    runner = find_launcher()
    want = {}
    for i in range(6):
        for label in ("plain", "shim"):
            out = tmp_path / ("%s%d" % (label, i))
            out.mkdir()
            if label == "plain":
                r = run([VENV_PY, prog, out, PROGS], plain_env())
            else:
                r = run([runner, "--dir", out, "--staging", "64M", "--", VENV_PY, prog, out, PROGS],
                        launcher_env(out))
            assert r.returncode == 0, r.describe()
            got = {p.name: p.read_bytes() for p in out.iterdir()}
            if label == "plain" and not want:
                want = got
            assert got == want, "run %d, %s: files differ from the plain run's" % (i, label)


CLOSERANGE_PROG = r"""
import os, sys
os.closerange(3, 65536)  # at once: the session may be starting in another thread
sys.path.insert(0, sys.argv[2])
from progutil import ackpt_wait, get_stats, prng_bytes
with open(os.path.join(sys.argv[1], "model.pt"), "wb") as f:
    f.write(prng_bytes(8 << 20, 4))
st = get_stats()
if st["present"]:
    print("wait", ackpt_wait(60), "active", st["active"], "staged", st["bytes_staged"] > 0)
"""


def test_closerange_at_start(tmp_path):
    """A program that closes every descriptor above 2 as it starts (daemons,
    some launchers) while its session is starting: ackpt's own descriptors
    are spared, the session stays up, and nothing is said on stderr."""
    need_shim()
    prog = tmp_path / "cr.py"
    prog.write_text(CLOSERANGE_PROG)
    runner = find_launcher()
    pout = tmp_path / "plain"
    pout.mkdir()
    r = run([VENV_PY, prog, pout, PROGS], plain_env())
    assert r.returncode == 0, r.describe()
    for i in range(6):
        out = tmp_path / ("shim%d" % i)
        out.mkdir()
        r = run([runner, "--dir", out, "--staging", "64M", "--", VENV_PY, prog, out, PROGS],
                launcher_env(out))
        assert r.returncode == 0 and not r.stderr.strip(), r.describe()
        assert r.stdout.split() == ["wait", "0", "active", "1", "staged", "True"], r.describe()
        same_checkpoint(pout, out)


RANK_PROG = r"""
import fcntl, os, sys, time
sys.path.insert(0, sys.argv[2])
from progutil import get_stats, prng_bytes
out, rank = sys.argv[1], int(os.environ["RANK"])
if rank == 1:
    sys.stdin.readline()  # the test has seen our helper wait for the coordinator
    os.dup2(0, 200)       # each of these takes the session lock
    fcntl.fcntl(200, fcntl.F_GETFD)
    os.closerange(3, 65536)
    print("meanwhile", get_stats().get("active", 0), flush=True)
    sys.stdin.readline()  # rank 0 is on its way
t0 = time.monotonic()
while get_stats()["present"] and not get_stats()["active"] and time.monotonic() - t0 < 60:
    time.sleep(0.01)
before = get_stats().get("active", 0)
with open(os.path.join(out, "rank%d.bin" % rank), "wb") as f:
    f.write(prng_bytes(8 << 20, 10 + rank))
print("before-open", before, flush=True)
if rank == 0:
    sys.stdin.readline()  # as in a real job, rank 0 outlives the others' work
"""


def test_a_rank_waits_for_the_coordinator_without_the_lock(tmp_path):
    """Rank 1 of a two-rank job starts early, and its start waits for rank
    0's coordinator, which comes only when the test starts rank 0.  The
    wait must not hold the session lock: the program's dup2, fcntl and
    close_range meanwhile return (with the lock held they would wait for
    rank 0, which the test starts only after they have returned), and
    close_range spares the start's descriptors.  Then both ranks' sessions
    are up before their first managed open, and their files match a plain
    run's."""
    import select
    import subprocess
    import time

    from barrierutil import free_port
    from faultutil import helper_pids, new_mark, wait_helpers

    need_shim()
    prog = tmp_path / "rank.py"
    prog.write_text(RANK_PROG)
    plain = tmp_path / "plain"
    plain.mkdir()
    for rank in (0, 1):
        r = run([VENV_PY, prog, plain, PROGS], plain_env(RANK=rank), input="\n\n\n")
        assert r.returncode == 0, r.describe()
    out = tmp_path / "shim"
    out.mkdir()
    mark = new_mark()
    common = dict(WORLD_SIZE=2, ACKPT_COORD="127.0.0.1:%d" % free_port(),
                  ACKPT_SECRET=os.urandom(32).hex(), ACKPT_BARRIER_TIMEOUT=60)

    def start(rank):
        env = shim_env(out, mark=mark, RANK=rank, LOCAL_RANK=rank, **common)
        return subprocess.Popen([VENV_PY, str(prog), str(out), str(PROGS)], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    r1 = start(1)
    r0 = None
    try:
        t0 = time.monotonic()
        while not helper_pids(mark) and time.monotonic() - t0 < 20:
            time.sleep(0.02)
        assert helper_pids(mark), "rank 1 did not start its helper at program start"
        r1.stdin.write("\n")
        r1.stdin.flush()
        # nothing here means the calls above wait for the coordinator
        ready, _, _ = select.select([r1.stdout], [], [], 30)
        assert ready, "rank 1's dup2, fcntl and close_range waited for the coordinator"
        line = r1.stdout.readline().split()
        assert line == ["meanwhile", "0"], line
        r0 = start(0)
        r1.stdin.write("\n")
        r1.stdin.flush()
        res = {}
        for rank, p in ((1, r1), (0, r0)):
            so, se = p.communicate("\n" if rank == 0 else None, timeout=120)
            assert p.returncode == 0, (rank, so, se)
            assert ": warning:" not in se and ": error:" not in se, (rank, se)
            res[rank] = so.split()
        assert res[0] == ["before-open", "1"] and res[1] == ["before-open", "1"], res
    finally:
        for p in (r0, r1):
            if p and p.poll() is None:
                p.kill()
                p.communicate()
    wait_helpers(mark)
    for rank in (0, 1):
        name = "rank%d.bin" % rank
        assert (out / name).read_bytes() == (plain / name).read_bytes(), name


LONELY_PROG = r"""
import os, sys, time
sys.path.insert(0, sys.argv[2])
from progutil import get_stats, prng_bytes
t0, polls = time.monotonic(), 0
while time.monotonic() - t0 < float(sys.argv[3]):
    st = get_stats()  # unlocked, while the start gives up and unmaps
    polls += 1
with open(os.path.join(sys.argv[1], "model.pt"), "wb") as f:
    f.write(prng_bytes(8 << 20, 5))
print("active", get_stats().get("active", 0), "polled", polls > 0)
"""


def test_a_rank_whose_coordinator_never_comes(tmp_path):
    """Rank 1 of two, and rank 0 never comes: its early start gives up
    (ACKPT_BARRIER_TIMEOUT), says so, and its writes go through the kernel
    as in a plain run.  The program reads ackpt_get_stats without pause
    meanwhile, which must not touch the failed start's memory as it goes."""
    from barrierutil import free_port

    need_shim()
    prog = tmp_path / "lonely.py"
    prog.write_text(LONELY_PROG)
    plain = tmp_path / "plain"
    plain.mkdir()
    r = run([VENV_PY, prog, plain, PROGS, "0"], plain_env())
    assert r.returncode == 0, r.describe()
    out = tmp_path / "shim"
    out.mkdir()
    env = shim_env(out, RANK=1, LOCAL_RANK=1, WORLD_SIZE=2, ACKPT_BARRIER_TIMEOUT=1,
                   ACKPT_COORD="127.0.0.1:%d" % free_port(), ACKPT_SECRET=os.urandom(32).hex())
    r = run([VENV_PY, prog, out, PROGS, "4"], env)
    assert r.returncode == 0, r.describe()
    assert r.stdout.split() == ["active", "0", "polled", "True"], r.describe()
    assert "did not start; writes stay synchronous" in r.stderr, r.describe()
    same_checkpoint(plain, out)
