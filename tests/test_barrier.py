"""The metadata commit behind the global durability barrier (issue 3;
docs/DESIGN.md sections 3.7 and 4), with real torchrun + gloo on CPU.

  - DCP save, 2 and 4 ranks, thread_count 2: data byte-identical to a
    synchronous run, .metadata loads (in a process without the shim)
  - the barrier visibly holds .metadata while one rank's helper is slow
    (observer without the shim), plus a control without the delay
  - Megatron-style tracker: never names an iteration whose files are torn
    (plus a control with the tracker not treated as metadata)
  - SIGKILL of one rank mid-save / of its helper mid-barrier: no commit, no
    hang, the previous checkpoint loads
  - a write error on one rank aborts rank 0's commit
  - a whole "node" (rank 1's python + helper) lost with two commits pending
  - two "nodes" (network namespaces + veth)
  - 1024 participants (1 real program + 1023 simulated), with an EIO and a
    dropped participant; a participant lost between barriers; forged
    HELLOs/ACKs and a short fuzz
  - registration: rank 0 behind an exec wrapper; a coordinator that comes
    up 12 s after another rank's first managed open

Programs: tests/barrier_progs/; helpers: tests/barrierutil.py.  Latency
numbers are printed (run with -s to see them), never asserted.
"""
import hashlib
import os
import random
import re
import socket
import stat
import time
from pathlib import Path

import pytest

from barrierutil import (Committer, Observer, dcp_check, free_master_port, free_port, in_netns,
                         job_env, rank_helper_pid, rank_python_pid, run_job, shimmed, sim,
                         start_job, torchrun_argv, two_nodes)
from faultutil import helper_pids, need_shim

JOB_TIMEOUT = 120.0


@pytest.fixture(autouse=True)
def _shim_required():
    need_shim()


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tree(d):
    """{name: (mode bits, size)} of the files in d (one level)."""
    out = {}
    for n in sorted(os.listdir(d)):
        st = os.lstat(os.path.join(d, n))
        out[n] = (stat.S_IMODE(st.st_mode), st.st_size)
    return out


def _leftovers(d):
    """Hidden ackpt temporaries (.<name>.ackpt.<pid>.<n>) left in d."""
    return [n for n in os.listdir(d) if ".ackpt." in n]


DEGRADED = r"error|abort|synchronous|cannot register|did not start|waiting for the coordinator"


def _assert_not_degraded(job):
    """No ackpt error, abort or fallback line (a rank that could not register
    would silently write synchronously and never be part of the barrier)."""
    bad = job.stderr_matching(DEGRADED)
    assert not bad, "unexpected ackpt lines:\n  %s\n%s" % ("\n  ".join(bad), job.describe())


def _staged_lines(job):
    """The per-process summary lines of ACKPT_LOG=info: [(pid, MiB staged or written
    through the kernel)]."""
    return [(int(m.group(1)), float(m.group(2)) + float(m.group(3))) for m in
            re.finditer(r"ackpt\[(\d+)\]: info: \d+ files, ([\d.]+) MiB staged, ([\d.]+) MiB "
                        r"written through", job.stderr())]


def _dcp_job(world, port, saves, threads=2, extra=()):
    args = []
    for s in saves:
        args += ["--save", ",".join(str(x) for x in s)]
    return torchrun_argv(world, port, "dcp_job.py", args + ["--threads", threads] + list(extra))


# --------------------------------------------------------------------------
# 1. DCP save, 2 and 4 ranks
# --------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 4])
def test_dcp_save_matches_sync_run(tmp_path, world):
    """DCP save under the shim (thread_count 2): every __*.distcp is
    byte-identical to a synchronous run, names and permission bits match,
    no temporary is left, and .metadata loads to the saved state in a
    process without the shim."""
    mib, seed = 2, 11
    plain_d, shim_d = tmp_path / "plain" / "ckpt", tmp_path / "shim" / "ckpt"
    plain_d.parent.mkdir()
    shim_d.parent.mkdir()
    plain = run_job("plain", _dcp_job(world, free_master_port(), [(plain_d, mib, seed)]),
                    job_env(), tmp_path, timeout=JOB_TIMEOUT)
    assert plain.returncode == 0, "the job fails WITHOUT the shim:\n" + plain.describe()
    shim = run_job("shim", shimmed(_dcp_job(world, free_master_port(), [(shim_d, mib, seed)]),
                                   shim_d.parent, log="info"),
                   job_env(), tmp_path, timeout=JOB_TIMEOUT)
    assert shim.returncode == 0, "the job fails under the shim:\n" + shim.describe()
    print("plain %.1fs, shim %.1fs" % (plain.seconds, shim.seconds))

    staged = _staged_lines(shim)
    assert len(staged) == world and all(m > 0 for _, m in staged), \
        "expected one 'MiB staged' summary per rank, each > 0 (the shim was not used?):\n" \
        + shim.describe()
    _assert_not_degraded(shim)

    pt, st = _tree(plain_d), _tree(shim_d)
    assert _leftovers(shim_d) == [], "temporaries left: %s" % _leftovers(shim_d)
    assert sorted(pt) == sorted(st), "file names differ: plain %s vs shim %s" % (sorted(pt), sorted(st))
    data = [n for n in pt if n.endswith(".distcp")]
    assert len(data) == world * 2, "expected %d data files (thread_count 2): %s" % (world * 2, data)
    for n in pt:
        assert pt[n][0] == st[n][0], "%s: mode %o (plain) vs %o (shim)" % (n, pt[n][0], st[n][0])
    for n in data:
        assert _sha(plain_d / n) == _sha(shim_d / n), "%s differs from the synchronous run" % n
    assert ".metadata" in st

    res = dcp_check([plain_d, shim_d], world, mib, seed)
    for d, r in res.items():
        assert r["ok"] and not r["preloaded"], "%s does not load to the saved state: %s" % (d, r)


# --------------------------------------------------------------------------
# 2. The barrier visibly holds the commit
# --------------------------------------------------------------------------

DELAY_MS = 300
BIG_MIB = 48   # per rank: 4 tensors of 12 MiB, written as >= 4 helper chunks


def _observed_dcp_save(tmp_path, label, delay_ms, mib, seed):
    base = tmp_path / label
    d = base / "ckpt"
    d.mkdir(parents=True)
    obs = Observer("dcp", base / "obs.json", d, "__*.distcp", interval_ms=2)
    extra = {"ACKPT_TEST_DELAY_RANK": 1, "ACKPT_TEST_DELAY_MS": delay_ms} if delay_ms else {}
    try:
        job = run_job(label, shimmed(_dcp_job(2, free_master_port(), [(d, mib, seed)]), base,
                                     log="info"),
                      job_env(**extra), base, timeout=JOB_TIMEOUT)
    finally:
        res = obs.stop()
    return job, res, d


def _check_observation(job, res, d, label):
    """The invariant (every sample that shows .metadata shows every data file
    complete; at the first sighting the data files hold their final bytes)
    and the timeline.  Returns (t data complete, t .metadata appeared)."""
    assert job.returncode == 0, job.describe()
    _assert_not_degraded(job)
    assert (d / ".metadata").exists(), "no .metadata after the job:\n" + job.describe()
    assert _leftovers(d) == [], _leftovers(d)
    final = {n: s for n, (_, s) in _tree(d).items() if n.endswith(".distcp")}
    assert len(final) == 4, final
    log = res["log"]
    t_complete = next((e["t"] for e in log if e["sizes"] == final), None)
    t_meta = next((e["t"] for e in log if e["metadata"]), None)
    assert t_complete is not None and t_meta is not None, \
        "the observer never saw the final state (%d samples): %s" % (res["samples"], log[-3:])
    torn = [e for e in log if e["metadata"] and e["sizes"] != final]
    assert not torn, ("%s: .metadata was visible while data files were incomplete: %s\nfinal: %s"
                      % (label, torn[:3], final))
    fm = res["first_metadata"]
    assert "error" not in fm, fm
    bad = [n for n in final if fm["sha"].get(n) != _sha(d / n)]
    assert not bad, ("%s: when .metadata first appeared, %s did not hold their final bytes"
                     % (label, bad))
    assert fm["metadata_len"] == (d / ".metadata").stat().st_size
    assert t_meta >= t_complete
    return t_complete, t_meta


def test_barrier_holds_metadata_until_slow_rank_durable(tmp_path):
    """Rank 1's helper sleeps DELAY_MS before each write chunk: rank 0's
    dcp.save (which writes .metadata) returns at once, but .metadata appears
    to a process outside the shim only once rank 1's data is complete on
    disk.  A control without the delay shows the same invariant."""
    seed = 21
    job, res, d = _observed_dcp_save(tmp_path, "slow", DELAY_MS, BIG_MIB, seed)
    t_complete, t_meta = _check_observation(job, res, d, "slow rank 1")
    saved = job.event(0, "saved0")
    assert saved, job.describe()
    rank1_incomplete = [e for e in res["log"]
                        if any(n.startswith("__1_") for n in e["sizes"]) and not e["metadata"]
                        and e["t"] > saved[0]]
    # the training loop did not wait: rank 0's save returned while rank 1's
    # data was still in flight (and .metadata therefore held back)
    assert saved[0] < t_complete and rank1_incomplete, \
        ("rank 0's dcp.save returned at %.3f, rank 1's data complete at %.3f: the delay did not "
         "keep rank 1's data in flight" % (saved[0], t_complete))
    held = t_meta - saved[0]
    gap = t_meta - t_complete
    print("slow rank 1 (%d ms/chunk): rank 0's dcp.save returned %.3fs before .metadata appeared; "
          ".metadata appeared %.1f ms after the last data byte landed (%d observer samples)"
          % (DELAY_MS, held, gap * 1000, res["samples"]))
    assert held > 3 * DELAY_MS / 1000.0, \
        "the commit was held only %.3fs: rank 1 writes at least 4 delayed chunks" % held

    cjob, cres, cd = _observed_dcp_save(tmp_path, "control", 0, BIG_MIB, seed)
    c_complete, c_meta = _check_observation(cjob, cres, cd, "control")
    csaved = cjob.event(0, "saved0")
    print("control (no delay): .metadata appeared %.1f ms after the data was complete, %.3fs "
          "after rank 0's dcp.save returned" % ((c_meta - c_complete) * 1000, c_meta - csaved[0]))
    res = dcp_check([d, cd], 2, BIG_MIB, seed)
    for k, r in res.items():
        assert r["ok"], "%s: %s" % (k, r)
    for n in os.listdir(d):
        if n.endswith(".distcp"):
            assert _sha(d / n) == _sha(cd / n), "%s differs between the slow and the control run" % n


# --------------------------------------------------------------------------
# 3. Megatron-style tracker
# --------------------------------------------------------------------------

def _megatron(tmp_path, label, iters, delay_ms, metadata=None):
    base = tmp_path / label
    root = base / "ckpt"
    root.mkdir(parents=True)
    obs = Observer("tracker", base / "obs.json", root, 2, interval_ms=1)
    extra = {"ACKPT_TEST_DELAY_RANK": 1, "ACKPT_TEST_DELAY_MS": delay_ms}
    if metadata:
        extra["ACKPT_METADATA"] = metadata
    try:
        job = run_job(label, shimmed(torchrun_argv(2, free_master_port(), "megatron_job.py",
                                                   [root, iters]), base),
                      job_env(**extra), base, timeout=JOB_TIMEOUT)
    finally:
        res = obs.stop()
    return job, res, root


def test_megatron_tracker_never_names_torn_iteration(tmp_path):
    """20 iterations of torch.save per rank + dist.barrier + rank 0 writing
    latest_checkpointed_iteration.txt; rank 1's helper is slow.  An
    observer without the shim torch.load's every rank's file of each
    iteration the tracker names, the moment it names it: never torn, never
    going backwards, and the tracker ends at 20."""
    iters = 20
    job, res, root = _megatron(tmp_path, "barrier", iters, 30)
    assert job.returncode == 0, job.describe()
    seen = [s for s in res["seen"] if s["text"] is not None]
    problems = [s for s in seen if s["problems"]]
    assert not problems, ("the tracker named an iteration whose files were incomplete:\n  %s"
                          % "\n  ".join("%s: %s" % (s["text"], s["problems"]) for s in problems[:5]))
    values = [int(s["text"]) for s in seen]
    assert values and values == sorted(values), "tracker went backwards: %s" % values
    assert values[-1] == iters, "the observer's last tracker value is %s" % values
    assert (root / "latest_checkpointed_iteration.txt").read_text() == str(iters)
    assert _leftovers(root) == []
    _assert_not_degraded(job)
    print("tracker values seen by the observer (%d samples): %s" % (res["samples"], values))


def test_megatron_observer_detects_torn_tracker_without_barrier(tmp_path):
    """Control for the test above: with the tracker NOT a metadata name
    (ACKPT_METADATA=.metadata), it is an ordinary async write and the
    same observer must catch it naming an iteration whose rank-1 file is
    not complete yet -- so the observer is able to see what the barrier
    prevents."""
    job, res, root = _megatron(tmp_path, "no-barrier", 4, 150, metadata=".metadata")
    assert job.returncode == 0, job.describe()
    torn = [s for s in res["seen"] if s["problems"]]
    print("without the barrier the observer saw %d torn tracker states of %d: %s"
          % (len(torn), len(res["seen"]), [(s["text"], s["problems"][:1]) for s in torn[:3]]))
    assert torn, ("control failed: without the barrier the observer never saw a torn "
                  "iteration (%s) -- it could not have caught a barrier bug either" % res["seen"])


# --------------------------------------------------------------------------
# 4. SIGKILL one rank mid-save
# --------------------------------------------------------------------------

KILL_TIMEOUT = 20  # ACKPT_BARRIER_TIMEOUT for these jobs
C1 = (1, 31)         # checkpoint 1: MiB per rank, seed
C2 = (BIG_MIB, 32)   # checkpoint 2


def _two_checkpoints_job(tmp_path, label, staging, wait_commit=True, extra=()):
    """Rank 1's helper is slow (DELAY_MS per chunk).  With wait_commit,
    checkpoint 1 is committed (rank 0 stat()s its .metadata, which waits for
    the commit) before checkpoint 2 starts.  extra: more dcp_job options."""
    base = tmp_path / label
    c1, c2 = base / "c1", base / "c2"
    base.mkdir()
    env = job_env(ACKPT_TEST_DELAY_RANK=1, ACKPT_TEST_DELAY_MS=DELAY_MS,
                  ACKPT_BARRIER_TIMEOUT=KILL_TIMEOUT)
    job = start_job(label, shimmed(_dcp_job(2, free_master_port(), [(c1,) + C1, (c2,) + C2],
                                            extra=(["--wait-commit"] if wait_commit else [])
                                            + list(extra)),
                                   base, staging=staging, log="info"), env, base)
    return job, c1, c2


def _kill(pid):
    os.kill(pid, 9)


def _rank1_python(job):
    start = job.wait_event(1, "start", 60)
    want = int(re.search(r"pid=(\d+)", start[3]).group(1))
    pids = rank_python_pid(job.mark, 1)
    assert pids == [want], ("rank 1's python found by its environment marker: %s, by its own "
                            "report: %d" % (pids, want))
    return want


def _checkpoint1_committed(job, c1):
    e = job.wait_event(0, "committed0", 60)
    assert e[3].startswith("ok"), "checkpoint 1 was not committed: %s\n%s" % (e, job.describe())
    assert (c1 / ".metadata").exists()


def test_sigkill_rank_while_staging(tmp_path):
    """Checkpoint 1 commits; during checkpoint 2 rank 1's python is
    SIGKILLed while its writes are still being staged (16 MiB arena, slow
    helper).  No .metadata for checkpoint 2, rank 0 reports the failure and
    the job ends (no hang), checkpoint 1 still loads."""
    job, c1, c2 = _two_checkpoints_job(tmp_path, "kill-staging", "16M")
    try:
        pid = _rank1_python(job)
        _checkpoint1_committed(job, c1)
        job.wait_event(1, "saving1", 60)
        time.sleep(0.5)
        assert job.event(1, "saved1") is None, \
            "rank 1 finished checkpoint 2 before the kill (staging did not block):\n" + job.describe()
        t_kill = time.monotonic()
        _kill(pid)
        rc = job.wait(timeout=KILL_TIMEOUT + 60)
    finally:
        job.kill()
    print("job ended %.1fs after the SIGKILL, status %s" % (time.monotonic() - t_kill, rc))
    assert rc != 0, job.describe()
    assert not (c2 / ".metadata").exists(), \
        "checkpoint 2 was committed although rank 1 died mid-save:\n" + job.describe()
    assert not c2.exists() or _leftovers(c2) == [], _leftovers(c2)
    assert job.event(0, "saved1") is None
    assert re.search(r"aborted|Connection closed|Connection reset|DistBackendError|"
                     r"RuntimeError|ChildFailedError|exitcode\s*:\s*-9", job.stderr()), \
        "no rank reported the failure:\n" + job.describe()
    res = dcp_check(c1, 2, *C1)
    assert res["ok"], "checkpoint 1 no longer loads: %s" % res


def test_sigkill_helper_mid_barrier(tmp_path):
    """Checkpoint 1 commits.  Rank 1 has staged all of checkpoint 2 and rank
    0 has written its .metadata (dcp.save returned); rank 1's helper, still
    writing, is SIGKILLed.  The coordinator loses a participant with
    undurable data: the commit is aborted, rank 0 logs it and exits 1, no
    .metadata for checkpoint 2, checkpoint 1 still loads."""
    # if rank 1 exits non-zero first, torchrun stops rank 0 at once, maybe
    # before rank 0's own exit message: rank 1 lingers until rank 0 is done
    job, c1, c2 = _two_checkpoints_job(tmp_path, "kill-helper", "256M", extra=["--linger", 1, 60])
    try:
        _checkpoint1_committed(job, c1)
        job.wait_event(0, "saved1", 60)
        # let rank 0's helper finish its own data and start the barrier (rank
        # 1's helper needs >= 4 x DELAY_MS for its 48 MiB): the loss happens
        # while the barrier waits for rank 1.  (A loss just before the
        # barrier starts: test_participant_lost_between_barriers_...)
        time.sleep(0.5)
        hp = rank_helper_pid(job.mark, 1)
        assert len(hp) == 1, "rank 1's helper not found (or several): %s" % hp
        assert not (c2 / ".metadata").exists(), \
            ".metadata committed before rank 1's slow helper finished"
        t_kill = time.monotonic()
        _kill(hp[0])
        rc = job.wait(timeout=KILL_TIMEOUT + 60)
    finally:
        job.kill()
    print("job ended %.1fs after the SIGKILL of rank 1's helper, status %s"
          % (time.monotonic() - t_kill, rc))
    assert rc != 0, job.describe()
    assert not (c2 / ".metadata").exists(), "checkpoint 2 committed:\n" + job.describe()
    assert _leftovers(c2) == [], _leftovers(c2)
    assert job.stderr_matching(r"rank 0: commit of .*c2/\.metadata aborted"), job.describe()
    assert job.stderr_matching(r"metadata commit\(s\) were aborted"), job.describe()
    e = job.event(0, "committed1")
    assert e is None or not e[3].startswith("ok"), \
        "rank 0's own stat of .metadata succeeded after the abort: %s" % (e,)
    res = dcp_check(c1, 2, *C1)
    assert res["ok"], "checkpoint 1 no longer loads: %s" % res


def test_sigkill_rank_after_staging(tmp_path):
    """Checkpoint 1 commits.  Rank 1's python is SIGKILLed after it staged
    all of checkpoint 2 (dcp.save returned on both ranks), while its helper
    is still writing.  The helper finishes what was staged and leaves
    cleanly, so the commit may go ahead -- but only of complete data: if
    checkpoint 2's .metadata exists, checkpoint 2 loads completely."""
    job, c1, c2 = _two_checkpoints_job(tmp_path, "kill-after", "256M")
    try:
        pid = _rank1_python(job)
        _checkpoint1_committed(job, c1)
        job.wait_event(0, "saved1", 60)
        job.wait_event(1, "saved1", 60)
        assert rank_helper_pid(job.mark, 1), "rank 1's helper already gone (not slow?)"
        t_kill = time.monotonic()
        _kill(pid)
        rc = job.wait(timeout=KILL_TIMEOUT + 60)
    finally:
        job.kill()
    committed = (c2 / ".metadata").exists()
    print("job ended %.1fs after the SIGKILL, status %s; checkpoint 2 %s"
          % (time.monotonic() - t_kill, rc, "committed" if committed else "not committed"))
    assert _leftovers(c2) == [], _leftovers(c2)
    assert dcp_check(c1, 2, *C1)["ok"], "checkpoint 1 no longer loads"
    if committed:
        res = dcp_check(c2, 2, *C2)
        assert res["ok"], "checkpoint 2 was committed with incomplete data: %s" % res


def test_node_loss_with_two_commits_pending(tmp_path):
    """A whole "node" is lost: both ranks have staged checkpoints 1 and 2
    (the program does not wait for commits), rank 1's helper is slow, and
    then rank 1's python AND its helper are SIGKILLed (as when a node dies).
    Rank 1's undurable data is gone, so neither pending commit may happen:
    no .metadata may name data that is not there."""
    job, c1, c2 = _two_checkpoints_job(tmp_path, "node-loss", "256M", wait_commit=False)
    try:
        pid = _rank1_python(job)
        job.wait_event(0, "saved1", 60)
        job.wait_event(1, "saved1", 60)
        hp = rank_helper_pid(job.mark, 1)
        assert len(hp) == 1, hp
        assert not (c1 / ".metadata").exists(), "checkpoint 1 committed already (helper not slow?)"
        for p in (pid, hp[0]):
            _kill(p)
        rc = job.wait(timeout=KILL_TIMEOUT + 60)
    finally:
        job.kill()
    print("node loss: status %s; c1 committed %s, c2 committed %s; ackpt lines:\n  %s"
          % (rc, (c1 / ".metadata").exists(), (c2 / ".metadata").exists(),
             "\n  ".join(job.stderr_matching(r"ackpt"))))
    assert rc != 0, job.describe()
    for c, spec in ((c1, C1), (c2, C2)):
        if (c / ".metadata").exists():
            res = dcp_check(c, 2, *spec)
            assert res["ok"], ("%s/.metadata was committed after rank 1 was lost with its data "
                               "not durable; the checkpoint does not load: %s\n%s"
                               % (c.name, res.get("error", res)[:300] if res.get("error") else res,
                                  "\n".join(job.stderr_matching(r"ackpt"))))


# --------------------------------------------------------------------------
# 5. A write error on one rank
# --------------------------------------------------------------------------

def test_write_error_on_rank1_aborts_commit(tmp_path):
    """ACKPT_FAULT=op=write,err=EIO in rank 1's helper only (rank=1); rank 1's helper is slowed a little so
    the error happens after DCP closed its files.  Rank 0's commit of
    .metadata is aborted: no .metadata, no temporary, rank 0 logs
    "aborted", rank 1 logs the abort too, the job exits non-zero."""
    base = tmp_path / "fault"
    c = base / "ckpt"
    base.mkdir()
    env = job_env(ACKPT_TEST_DELAY_RANK=1, ACKPT_TEST_DELAY_MS=100, ACKPT_BARRIER_TIMEOUT=KILL_TIMEOUT,
                  ACKPT_FAULT="op=write,nth=1,err=EIO,mode=once,rank=1")
    # rank 1 exits non-zero and torchrun then stops rank 0 at once, maybe
    # before rank 0's own exit message: rank 1 lingers until rank 0 is done
    job = run_job("fault", shimmed(_dcp_job(2, free_master_port(), [(c, 1, 41)],
                                            extra=["--linger", 1, 60]),
                                   base, log="info"),
                  env, base, timeout=JOB_TIMEOUT)
    print("\n".join(job.stderr_matching(r"ackpt")))
    assert job.returncode != 0, job.describe()
    assert job.event(0, "saved0") and job.event(1, "saved0"), \
        "DCP itself failed (the error reached it synchronously); the barrier was not exercised:\n" \
        + job.describe()
    assert not (c / ".metadata").exists(), ".metadata committed despite rank 1's EIO:\n" + job.describe()
    assert _leftovers(c) == [], _leftovers(c)
    assert job.stderr_matching(r"rank 0: commit of .*/\.metadata aborted: Input/output error"), \
        job.describe()
    assert job.stderr_matching(r"metadata commit\(s\) were aborted"), job.describe()
    rank1_pid = int(re.search(r"pid=(\d+)", job.event(1, "start")[3]).group(1))
    others = [ln for ln in job.stderr_matching(r"aborted") if "rank 0: commit" not in ln
              and "barrier" not in ln and "were aborted" not in ln]
    assert others, "rank 1 (pid %d) logged no abort line:\n%s" % (rank1_pid, job.describe())


# --------------------------------------------------------------------------
# 6. Two "nodes": network namespaces and a veth pair
# --------------------------------------------------------------------------

def test_two_nodes_network_namespaces(tmp_path):
    """Rank 0 runs in namespace ackptA (10.231.0.1), rank 1 in ackptB
    (10.231.0.2), each its own torchrun --nnodes 2 under ackpt-run, saving
    DCP into one shared directory.  Rank 1's helper registers with the
    coordinator across the veth pair; with rank 1's helper slowed, .metadata
    appears only after rank 1's data is complete, and loads."""
    seed, mib, delay = 51, 24, 150
    base = tmp_path / "nodes"
    c = base / "ckpt"
    c.mkdir(parents=True)
    with two_nodes() as ((ns_a, addr_a), (ns_b, _addr_b)):
        port = free_master_port()
        jobs = []
        obs = Observer("dcp", base / "obs.json", c, "__*.distcp", interval_ms=2)
        try:
            for node, ns, dev in ((0, ns_a, "ackptvA"), (1, ns_b, "ackptvB")):
                argv = shimmed(torchrun_argv(1, port, "dcp_job.py",
                                             ["--save", "%s,%s,%s" % (c, mib, seed), "--threads", 2],
                                             nnodes=2, node_rank=node, master_addr=addr_a),
                               base, log="info")
                env = job_env(GLOO_SOCKET_IFNAME=dev, TP_SOCKET_IFNAME=dev,
                              ACKPT_TEST_DELAY_RANK=1, ACKPT_TEST_DELAY_MS=delay,
                              ACKPT_BARRIER_TIMEOUT=60)
                jobs.append(start_job("node%d" % node, in_netns(ns, argv), env, base))
            for j in jobs:
                j.wait(JOB_TIMEOUT)
        finally:
            for j in jobs:
                j.kill()
            res = obs.stop()
    for j in jobs:
        assert j.returncode == 0, j.describe()
    for j in jobs:
        _assert_not_degraded(j)
    t_complete, t_meta = _check_observation(jobs[0], res, c, "two nodes")
    saved = jobs[0].event(0, "saved0")
    print("two nodes: rank 0's dcp.save returned %.3fs before .metadata appeared; .metadata %.1f ms "
          "after rank 1's data was complete" % (t_meta - saved[0], (t_meta - t_complete) * 1000))
    assert saved[0] < t_complete, \
        "rank 1's data was complete before rank 0's save returned: the barrier was not exercised"
    r = dcp_check(c, 2, mib, seed)
    assert r["ok"], r


# --------------------------------------------------------------------------
# 7. Scale: 1 real program + 1023 simulated participants on loopback
# --------------------------------------------------------------------------

SCALE = 1024


def _scale_setup(tmp_path, label, world, modes=None, timeout_s=None, count=3):
    port = free_port()
    d = tmp_path / label
    com = Committer(d, world, port, count, tmp_path / "logs", timeout_s=timeout_s)
    t0 = time.monotonic()
    try:
        s = sim.Sim("127.0.0.1", port, world - 1, modes or {}).start(timeout=60)
    except BaseException:
        com.kill()
        raise
    return com, s, d, time.monotonic() - t0


def _scale_teardown(com, s):
    s.stop()
    rc = com.finish()
    com.wait_helper_gone(30)
    return rc


def test_scale_1024_participants_commit(tmp_path):
    """1023 simulated participants register (the handshake with the job secret) with
    the coordinator hosted by the real program's helper and ACK every
    PREPARE; three commits with ACKPT_COMMIT=sync each succeed, every
    participant saw each PREPARE exactly once."""
    com, s, d, reg = _scale_setup(tmp_path, "ok", SCALE)
    try:
        lats = []
        for i in range(3):
            dt, err = com.commit()
            assert err == 0, "commit %d failed with errno %d\n%s" % (i, err, com.stderr())
            lats.append(dt)
            assert (d / "metadata.json").read_text().startswith('{"iteration": %d' % i)
        summ = s.summary()
    finally:
        rc = _scale_teardown(com, s)
    print("%d participants: registration %.3fs; commit (close() with --commit sync) latency %s ms"
          % (SCALE, reg, ", ".join("%.1f" % (x * 1000) for x in lats)))
    assert rc == 0, com.stderr()
    assert summ["welcomed"] == SCALE - 1
    assert summ["prepares"] == 3 * (SCALE - 1) and summ["acks"] == 3 * (SCALE - 1), summ
    assert summ["decisions"] == [] and summ["lost"] == [], summ
    assert _leftovers(d) == []


@pytest.mark.parametrize("fault", ["eio", "drop"])
def test_scale_1024_one_participant_fails(tmp_path, fault):
    """As above; after a first good commit, simulated participant 700 answers
    the next PREPARE with ACK status EIO (eio) or closes its connection
    without a BYE (drop).  The commit is aborted: close() returns EIO,
    metadata.json keeps the first commit's content, no temporary is left,
    every other participant is told (DECISION with the error), the program
    exits 1."""
    com, s, d, _ = _scale_setup(tmp_path, fault, SCALE)
    try:
        dt, err = com.commit()
        assert err == 0, com.stderr()
        first = (d / "metadata.json").read_text()
        s.set_mode(700, fault)
        dt, err = com.commit()
        time.sleep(0.2)
        summ = s.summary()
    finally:
        rc = _scale_teardown(com, s)
    print("%s: abort reported to the program after %.1f ms" % (fault, dt * 1000))
    assert err == 5, "close() of the aborted metadata returned errno %d, expected EIO\n%s" \
        % (err, com.stderr())
    assert (d / "metadata.json").read_text() == first, "metadata.json changed by an aborted commit"
    assert _leftovers(d) == [], _leftovers(d)
    aborts = [x for x in summ["decisions"] if x[2] != 0]
    told = SCALE - 1 - (1 if fault == "drop" else 0)
    assert len(aborts) == told, "%d participants told of the abort, expected %d" % (len(aborts), told)
    assert all(x[3] == 701 for x in aborts), "the abort does not name rank 701: %s" % aborts[:3]
    assert rc == 1, "exit status %s\n%s" % (rc, com.stderr())
    assert "were aborted" in com.stderr() and "aborted" in com.stderr(), com.stderr()


def test_participant_lost_between_barriers_aborts_next_commit(tmp_path):
    """A participant whose connection drops without a BYE while no barrier is
    running (its helper died, its node was lost) may have had undurable
    data: the next commit must not go ahead as if it had never been part of
    the job (docs/DESIGN.md section 4: a participant lost -> abort).  Small
    world: 4 (1 real + 3 simulated)."""
    com, s, d, _ = _scale_setup(tmp_path, "lost-between", 4)
    try:
        dt, err = com.commit()
        assert err == 0, com.stderr()
        s.drop(1)
        time.sleep(0.3)  # the coordinator has seen the connection close
        dt, err = com.commit()
    finally:
        rc = _scale_teardown(com, s)
    print("commit after a participant was lost: errno %d, exit status %s" % (err, rc))
    assert err != 0, ("the commit after participant rank 2 was lost (no BYE) succeeded: the "
                      "coordinator silently dropped it from the job\n" + com.stderr())


# --------------------------------------------------------------------------
# Security: forged HELLO / ACK, and a short fuzz of the coordinator
# --------------------------------------------------------------------------

def _closed_by_peer(sock, timeout=3.0):
    """True when the peer closed the connection (EOF or reset) within timeout,
    and what it sent before (bytes)."""
    sock.settimeout(timeout)
    got = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            b = sock.recv(4096)
            if not b:
                return True, got
            got += b
    except (ConnectionResetError, BrokenPipeError):
        return True, got
    except socket.timeout:
        return False, got
    return False, got


def test_coordinator_rejects_forged_peers(tmp_path):
    """While a barrier waits for a legitimate participant (which ACKs 1 s
    late), rogue peers send: a HELLO and a PROOF made up without the secret,
    followed by ACKs (EIO and OK) for the running barrier; ACKs without any
    HELLO; a HELLO with a wrong protocol version; a wrong magic.  Each is
    closed without a WELCOME, and none counts: the commit completes only
    after the legitimate ACK, and succeeds."""
    com, s, d, _ = _scale_setup(tmp_path, "forged", 4, modes={0: "delay:1.0"})
    port = s.port
    try:
        com.p.stdin.write("go\n")
        com.p.stdin.flush()
        deadline = time.monotonic() + 10
        while not s.prepares and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.prepares, "no PREPARE reached the simulated participants"
        bid = max(s.prepares)
        rogues = {
            "made-up proof + ACKs": sim.hello_frame(1) + sim.pack(sim.PROOF, mac=os.urandom(16))
            + sim.pack(sim.ACK, id_=bid, status=5, rank=1) + sim.pack(sim.ACK, id_=bid, rank=1),
            "ACK without HELLO": sim.pack(sim.ACK, id_=bid, status=5, rank=1)
            + sim.pack(sim.ACK, id_=bid, rank=1),
            "wrong version": sim.pack(sim.HELLO, rank=1, version=sim.VERSION + 1)
            + sim.pack(sim.ACK, id_=bid, status=5, rank=1),
            "wrong magic": sim.pack(sim.HELLO, rank=1, magic=0x12345678)
            + sim.pack(sim.ACK, id_=bid, status=5, rank=1),
            "REQUEST without HELLO": sim.pack(sim.REQUEST, arg=99, rank=1),
        }
        results = {}
        for name, payload in rogues.items():
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                c.sendall(payload)
            except OSError:
                pass
            results[name] = _closed_by_peer(c)
            c.close()
        line = com._line(30)
        m = re.match(r"COMMIT \d+ (\S+) (\d+)", line)
        assert m, line
        line_dt, err = float(m.group(1)), int(m.group(2))
        summ = s.summary()
    finally:
        rc = _scale_teardown(com, s)
    for name, (closed, got) in results.items():
        assert closed, "rogue peer %r: the coordinator did not close the connection" % name
        assert len(got) % sim.SIZE == 0
        frames = [sim.unpack(got[i:i + sim.SIZE]) for i in range(0, len(got), sim.SIZE)]
        assert not any(f["type"] == sim.WELCOME for f in frames), "rogue %r was welcomed" % name
    assert err == 0, "a forged ACK aborted the commit (errno %d)\n%s" % (err, com.stderr())
    assert line_dt >= 0.9, ("the commit finished %.3fs after the request, before the legitimate "
                            "participant's ACK (1 s): a forged ACK counted" % line_dt)
    assert summ["decisions"] == [], summ
    assert rc == 0, com.stderr()
    print("forged peers rejected; commit latency %.3fs (waited for the legitimate ACK)" % line_dt)


def test_coordinator_survives_garbage(tmp_path):
    """~5 s of garbage against the coordinator from many connections (random
    bytes, torn frames, frames with valid magic but random fields, HELLOs
    with random tokens, sudden closes) while 3 legitimate participants stay
    registered; afterwards a commit still succeeds and the program exits
    0."""
    com, s, d, _ = _scale_setup(tmp_path, "fuzz", 4)
    rnd = random.Random(1234)
    port = s.port
    sent = conns = 0
    hold = []
    try:
        dt, err = com.commit()
        assert err == 0, com.stderr()
        t_end = time.monotonic() + 5.0
        while time.monotonic() < t_end:
            try:
                c = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError as e:
                pytest.fail("the coordinator stopped accepting connections: %s\n%s"
                            % (e, com.stderr()), pytrace=False)
            conns += 1
            kind = rnd.randrange(5)
            if kind == 0:
                payload = rnd.randbytes(rnd.randrange(1, 300))
            elif kind == 1:
                payload = sim.pack(rnd.randrange(0, 14), rnd.getrandbits(64), rnd.getrandbits(64),
                                   rnd.randrange(-2**31, 2**31), rnd.randrange(-2**31, 2**31),
                                   rnd.randbytes(16))
            elif kind == 2:
                payload = sim.pack(sim.HELLO, rank=rnd.randrange(2**31), tok=rnd.randbytes(16))
                payload += rnd.randbytes(rnd.randrange(0, 100))
            elif kind == 3:
                full = sim.pack(rnd.randrange(1, 8), rnd.getrandbits(64), rnd.getrandbits(64))
                payload = full[:rnd.randrange(1, 48)]   # a torn frame, then close
            else:
                payload = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * rnd.randrange(1, 4)
            try:
                c.sendall(payload)
                sent += len(payload)
            except OSError:
                pass
            if rnd.random() < 0.05 and len(hold) < 50:
                hold.append(c)   # keep some open (idle / half-sent) for a while
            else:
                c.close()
        for c in hold:
            c.close()
        hold = []
        time.sleep(0.3)
        assert helper_pids(com.mark), "the coordinator's helper died under garbage:\n" + com.stderr()
        dt, err = com.commit()
        summ = s.summary()
    finally:
        for c in hold:
            c.close()
        rc = _scale_teardown(com, s)
    print("fuzz: %d connections, %d bytes of garbage; commit afterwards %.1f ms, errno %d"
          % (conns, sent, dt * 1000, err))
    assert err == 0, "commit after the fuzz failed (errno %d)\n%s" % (err, com.stderr())
    assert summ["lost"] == [] and summ["decisions"] == [], summ
    assert rc == 0, com.stderr()



def test_unauthenticated_flood_does_not_stall_a_barrier(tmp_path):
    """Peers without a HELLO stream valid-looking ACK frames as fast as they
    can while a barrier waits for a participant that answers after 1 s
    (barrier timeout 5 s). The coordinator must drop them at their first
    frame and keep serving its own I/O and the legitimate peers: the commit
    succeeds. (It used to read such a stream frame by frame until the socket
    was empty, which stalled the helper for seconds and timed the barrier
    out, blaming an innocent rank.)"""
    import threading
    com, s, d, _ = _scale_setup(tmp_path, "flood", 4, modes={0: "delay:1.0"}, timeout_s=5)
    port = s.port
    sent = []

    def flood():
        buf = sim.pack(sim.ACK, id_=1, status=0, rank=1) * (1 << 16)
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        t_end = time.monotonic() + 8.0
        n = 0
        try:
            while time.monotonic() < t_end:
                c.sendall(buf)
                n += len(buf)
        except OSError:
            pass
        sent.append(n)
        c.close()

    try:
        dt, err = com.commit()
        assert err == 0, com.stderr()
        com.go()
        time.sleep(0.2)   # the barrier is running, waiting for the slow participant
        ths = [threading.Thread(target=flood) for _ in range(5)]
        for th in ths:
            th.start()
        dt, err = com.commit(timeout=90, go=False)
        for th in ths:
            th.join()
        summ = s.summary()
    finally:
        rc = _scale_teardown(com, s)
    print("commit during an unauthenticated flood (%d bytes sent before the coordinator closed "
          "the connections): %.2f s, errno %d" % (sum(sent), dt, err))
    assert err == 0, "the flood made the commit fail (errno %d)\n%s" % (err, com.stderr())
    assert summ["decisions"] == [] and summ["lost"] == [], summ
    assert rc == 0, com.stderr()


def test_idle_strangers_are_closed(tmp_path):
    """Connections that never say HELLO (port scanners, half-open peers) are
    closed after 10 s, so they cannot hold the coordinator's descriptors and
    slots forever; legitimate participants are untouched and a commit after
    that succeeds."""
    com, s, d, _ = _scale_setup(tmp_path, "idle", 4)
    idle = [socket.create_connection(("127.0.0.1", s.port), timeout=5) for _ in range(3)]
    try:
        t0 = time.monotonic()
        closed = [_closed_by_peer(c, timeout=25.0)[0] for c in idle]
        waited = time.monotonic() - t0
        dt, err = com.commit()
        summ = s.summary()
    finally:
        for c in idle:
            c.close()
        rc = _scale_teardown(com, s)
    print("idle connections closed by the coordinator after %.1f s: %s" % (waited, closed))
    assert all(closed), "an idle connection without HELLO was never closed"
    assert err == 0 and summ["lost"] == [] and summ["decisions"] == [], (err, summ)
    assert rc == 0, com.stderr()


# --------------------------------------------------------------------------
# Registration edge cases
# --------------------------------------------------------------------------

def test_rank0_behind_exec_wrapper_hosts_coordinator(tmp_path):
    """Rank 0 started through a wrapper that execs the real program (`bash
    -c 'exec python ...'`, as with `torchrun --no-python run.sh` or an srun
    script): the same process (same pid) must still host the coordinator,
    so a participant can register and a commit goes through the barrier."""
    port = free_port()
    com = Committer(tmp_path / "wrapped", 2, port, 1, tmp_path / "logs", timeout_s=30,
                    exec_wrapper=True, log="info")
    try:
        s = sim.Sim("127.0.0.1", port, 1).start(timeout=5)
    except (OSError, TimeoutError) as e:
        com.kill()
        pytest.fail("no coordinator at 127.0.0.1:%d 5 s after rank 0 (behind an exec wrapper) "
                    "started: %s\n%s" % (port, e, com.stderr()), pytrace=False)
    try:
        dt, err = com.commit()
        summ = s.summary()
    finally:
        s.stop()
    rc = com.finish()
    assert err == 0, com.stderr()
    assert summ["prepares"] == 1 and summ["acks"] == 1, summ
    assert "did not start" not in com.stderr(), com.stderr()
    assert rc == 0, com.stderr()


def test_registration_waits_for_a_late_coordinator(tmp_path):
    """A rank's first managed open returns only once its helper registered
    with the coordinator, waiting up to min(ACKPT_BARRIER_TIMEOUT, 120 s).
    Here rank 1 opens its file 12 s before rank 0 (the coordinator) starts,
    with ACKPT_BARRIER_TIMEOUT=40: rank 1 must wait, register, and commit
    its own metadata through the barrier (a REQUEST from a participant) --
    not give up and fall back to synchronous writes after 10 s."""
    port = free_port()
    r1 = Committer(tmp_path / "r1", 2, port, 1, tmp_path / "logs", timeout_s=40, rank=1,
                   log="info")
    r0 = None
    try:
        t0 = time.monotonic()
        r1.go()
        time.sleep(12)
        r0 = Committer(tmp_path / "r0", 2, port, 1, tmp_path / "logs", timeout_s=40)
        dt1, err1 = r1.commit(go=False, timeout=60)
        waited = time.monotonic() - t0
        rc1 = r1.finish()
        dt0, err0 = r0.commit()
        rc0 = r0.finish()
    finally:
        r1.kill()
        if r0 is not None:
            r0.kill()
    print("rank 1 waited %.1fs for the coordinator; its commit %d, rank 0's %d" % (waited, err1, err0))
    assert "did not start" not in r1.stderr() and "synchronous" not in r1.stderr(), \
        ("rank 1 gave up on its helper (which was still registering, allowed up to 40 s) and "
         "fell back to synchronous writes:\n" + r1.stderr())
    assert waited >= 12, "rank 1's first managed open returned before the coordinator existed"
    assert err1 == 0 and rc1 == 0, r1.stderr()
    assert err0 == 0 and rc0 == 0, r0.stderr()
