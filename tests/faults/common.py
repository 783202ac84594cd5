"""Shared machinery of the crash and fault suite (tests/faults/run).

Reuses tests/faultutil.py for environments (shim_env/plain_env: LD_PRELOAD +
ACKPT_* with an ACKPT_TEST_MARK) and for finding helpers by that mark.
Every run here is bounded in time; a run that overstays its bound is killed
and counted as a hang.
"""
import dataclasses
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
sys.path.insert(0, str(TESTS))

import faultutil  # noqa: E402
from faultutil import helper_pids, new_mark, plain_env, shim_env  # noqa: E402,F401
from conftest import HELPER, LIB, REPO, VENV_PY, compare_trees  # noqa: E402,F401

PROGS = HERE / "progs"
UID = os.getuid()
REGISTRY = "ackpt-registry-v5.%d" % UID


@dataclasses.dataclass
class Tally:
    """The figures of one scenario (one row of docs/RELIABILITY.md)."""
    name: str
    title: str
    trials: int = 0
    injected: int = 0
    surfaced: int = 0
    commits_after_error: int = 0
    torn: int = 0
    bytes_lost: int = 0
    hangs: int = 0
    classes: list = dataclasses.field(default_factory=list)   # bad-input classes tried
    failures: list = dataclasses.field(default_factory=list)  # other invariant violations
    notes: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    skipped: str = ""                                          # why the scenario did not run

    def fail(self, msg):
        self.failures.append(msg)
        print("  FAIL [%s] %s" % (self.name, msg), flush=True)

    def ok(self):
        return (not self.skipped and self.injected == self.surfaced and self.commits_after_error == 0
                and self.torn == 0 and self.bytes_lost == 0 and self.hangs == 0 and not self.failures)


class Proc:
    """A child in its own session whose stdout lines are collected by a thread."""

    def __init__(self, argv, env, cwd=None, stdin=subprocess.DEVNULL, preexec_fn=None):
        self.argv = [str(a) for a in argv]
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(self.argv, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, stdin=stdin, start_new_session=True,
                                  preexec_fn=preexec_fn)
        self.lines = queue.Queue()
        self.out = []
        self.err = []
        self._to = threading.Thread(target=self._pump, args=(self.p.stdout, self.out, True), daemon=True)
        self._te = threading.Thread(target=self._pump, args=(self.p.stderr, self.err, False), daemon=True)
        self._to.start()
        self._te.start()

    def _pump(self, f, acc, q):
        for raw in iter(f.readline, b""):
            s = raw.decode(errors="replace")
            acc.append(s)
            if q:
                self.lines.put(s.rstrip("\n"))
        if q:
            self.lines.put(None)

    def wait_line(self, pred, timeout):
        """Next stdout line satisfying pred within timeout; None at EOF or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                ln = self.lines.get(timeout=left)
            except queue.Empty:
                return None
            if ln is None:
                return None
            if pred(ln):
                return ln

    def wait(self, timeout):
        """Exit status, or None (after killing the session) when it overstays timeout.
        Also waits for the pipes to close (the helper shares stderr)."""
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.killpg()
            self.p.wait()
            return None
        return rc

    def drain_pipes(self, timeout):
        self._to.join(timeout)
        self._te.join(timeout)
        return not (self._to.is_alive() or self._te.is_alive())

    def killpg(self):
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    @property
    def stdout(self):
        return "".join(self.out)

    @property
    def stderr(self):
        return "".join(self.err)


def run(argv, env, timeout, cwd=None, input=None, preexec_fn=None):
    """Run to completion; returns (rc or None on timeout, stdout, stderr, seconds)."""
    t0 = time.monotonic()
    p = subprocess.Popen([str(a) for a in argv], env=env, cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE,
                         stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                         start_new_session=True, preexec_fn=preexec_fn)
    try:
        so, se = p.communicate(input=input, timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if env.get("ACKPT_TEST_MARK"):
            faultutil.kill_marked(env["ACKPT_TEST_MARK"])
        so, se = p.communicate()
        rc = None
    return rc, so.decode(errors="replace"), se.decode(errors="replace"), time.monotonic() - t0


def wait_helpers_gone(mark, timeout):
    """True when no helper with the mark is alive within timeout (else kill them, False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not helper_pids(mark):
            return True
        time.sleep(0.02)
    faultutil.kill_marked(mark)
    return False


def shm_snapshot():
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("ackpt")}
    except OSError:
        return set()


def shm_leftovers(before):
    """ackpt entries in /dev/shm that appeared since `before`, other than the
    per-uid registry (and other projects' benchmark scratch dirs)."""
    return sorted(n for n in shm_snapshot() - before
                  if not n.startswith("ackpt-registry-v5.") and not n.startswith("ackpt-bench"))


def ackpt_lines(stderr):
    return [ln for ln in stderr.splitlines() if "ackpt" in ln]


def program_told(rc, stdout, lines, mark="error"):
    """Did a fault surface in a program run by progs/sweep_save.py?  A call
    failed (FIRST_ERROR, exit 3), a failed fsync was retried (RETRIED: the
    first attempt reported it), or the program exited 1 with an ackpt line
    containing `mark` (lines: ackpt_lines of its stderr)."""
    return (("FIRST_ERROR" in stdout and rc == 3) or "RETRIED" in stdout
            or (rc == 1 and any(mark in ln for ln in lines)))


def check_trees(flavor, outs, ref, mib, timeout=300):
    """Run progs/check_ckpt.py once over many trees (one torch import); returns {out: dict}."""
    res = {}
    if not outs:
        return res
    rc, so, se, _ = run([VENV_PY, PROGS / "check_ckpt.py", flavor, ref, mib] + list(outs), plain_env(),
                        timeout)
    lines = so.strip().splitlines()
    for i, out in enumerate(outs):
        try:
            res[out] = json.loads(lines[i])
        except (ValueError, IndexError):
            res[out] = {"committed": [], "bad": ["checker failed (status %s): %s" % (rc, se[-2000:])],
                        "bytes_bad": 0, "temporaries": [], "tracker": None}
    return res


def rng_for(seed, *keys):
    return random.Random("%s/%s" % (seed, "/".join(map(str, keys))))


def build_problem_or_none():
    from conftest import build_problem
    return build_problem()
