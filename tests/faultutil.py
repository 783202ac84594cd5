"""Helpers shared by test_faults.py, test_oracle.py and test_semantics.py.

These tests drive the shim directly (LD_PRELOAD + ACKPT_* in the
environment, no launcher) so they can add knobs such as ACKPT_TEST_DELAY_MS,
ACKPT_FAULT or a malformed value, and wrap the program in strace or setpriv.

Every shimmed run carries ACKPT_TEST_MARK=<uuid> in its environment.  The
helper inherits the environment (minus LD_PRELOAD) and detaches itself
(fork + setsid), so it is found by that marker in /proc/*/environ.
"""
import dataclasses
import json
import os
import re
import signal
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from conftest import HELPER, LIB, MODE, REPO, VENV_PY, _base_env, build_problem

FPROGS = REPO / "tests" / "fault_progs"
HELPER_NAME = "ackpt-helper"
DEFAULT_TIMEOUT = 60.0


def need_shim():
    """Skip (these tests exercise the shim itself) in plain mode or without a build."""
    if MODE == "plain":
        pytest.skip("ACKPT_TEST_MODE=plain: this test exercises the shim itself")
    problem = build_problem()
    if problem:
        from conftest import REQUIRE_BUILD
        if REQUIRE_BUILD:
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)


# --------------------------------------------------------------------------
# Environments
# --------------------------------------------------------------------------

def plain_env(**extra):
    env = _base_env()
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def shim_env(managed, mark=None, staging="64M", **extra):
    """Environment running a program under the shim managing `managed`.

    staging: ACKPT_STAGING (small by default: the helper faults the whole
    arena in, and 2 CPUs are shared by everything).  extra: more variables;
    a value of None removes the variable."""
    env = _base_env()
    env["LD_PRELOAD"] = str(LIB)
    env["ACKPT_HELPER"] = str(HELPER)
    env["ACKPT_PATHS"] = str(managed)
    env["ACKPT_TEST_MARK"] = mark or new_mark()
    if staging is not None:
        env["ACKPT_STAGING"] = staging
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def new_mark():
    return uuid.uuid4().hex


# --------------------------------------------------------------------------
# Finding helpers
# --------------------------------------------------------------------------

def _proc_state(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except OSError:
        return None
    return s[s.rfind(")") + 2:].split()[0]


def helper_pids(mark, include_zombies=False):
    """Pids of live ackpt-helper processes whose environment holds ACKPT_TEST_MARK=mark."""
    needle = ("ACKPT_TEST_MARK=%s" % mark).encode()
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        pid = int(d)
        try:
            with open("/proc/%d/comm" % pid) as f:
                comm = f.read().strip()
            if comm != HELPER_NAME:
                continue
            with open("/proc/%d/environ" % pid, "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle not in env:
            continue
        if not include_zombies and _proc_state(pid) in (None, "Z", "X"):
            continue
        if not include_zombies and not _session_leader(pid):
            # the short-lived first process of the helper's double fork:
            # the real helper is the child that called setsid()
            continue
        found.append(pid)
    return sorted(found)


def _session_leader(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[3]) == pid  # state ppid pgrp session ...
    except (OSError, IndexError, ValueError):
        return False


def wait_helpers(mark, timeout=30.0):
    """Wait until no helper with the marker is alive.  Returns the seconds
    waited; fails the test (after killing them) when some are still alive
    after timeout."""
    t0 = time.monotonic()
    while True:
        left = helper_pids(mark)
        if not left:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            pytest.fail("ackpt-helper %s (mark %s) still running %.0fs after the program ended"
                        % (left, mark, timeout), pytrace=False)
        time.sleep(0.02)


def wait_for_helper(mark, timeout=10.0):
    """Wait until exactly one live helper with the marker exists; return its pid."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        pids = helper_pids(mark)
        if len(pids) == 1:
            return pids[0]
        if len(pids) > 1:
            pytest.fail("more than one ackpt-helper with mark %s: %s" % (mark, pids), pytrace=False)
        time.sleep(0.01)
    pytest.fail("no ackpt-helper with mark %s appeared within %.0fs" % (mark, timeout), pytrace=False)


def kill_marked(mark):
    for p in helper_pids(mark, include_zombies=False):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    argv: list
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self, tail=3000):
        def cut(s):
            return s if len(s) <= tail else "...[cut]...\n" + s[-tail:]
        return ("$ %s\n  exit status %s after %.1fs\n  --- stdout ---\n%s\n  --- stderr ---\n%s"
                % (" ".join(map(str, self.argv)), self.returncode, self.seconds,
                   cut(self.stdout), cut(self.stderr)))

    def stderr_lines(self):
        return [ln for ln in self.stderr.splitlines() if ln.strip()]


def run(argv, env, cwd=None, timeout=DEFAULT_TIMEOUT, input=None, wait_helper=True,
        preexec_fn=None):
    """Run argv to completion (own session, stdin from `input` or /dev/null).

    The stderr pipe is shared with the helper (it inherits stderr), so
    communicate() returns only once the helper has exited too; when
    wait_helper, also check that no marked helper is left."""
    argv = [str(a) for a in argv]
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=str(cwd) if cwd else None, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE,
                         stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                         start_new_session=True, preexec_fn=preexec_fn)
    try:
        so, se = p.communicate(input=input.encode() if isinstance(input, str) else input,
                               timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if env.get("ACKPT_TEST_MARK"):
            kill_marked(env["ACKPT_TEST_MARK"])
        so, se = p.communicate()
        pytest.fail("timed out after %.0fs: %s\n--- stderr ---\n%s"
                    % (timeout, " ".join(argv), se.decode(errors="replace")[-4000:]), pytrace=False)
    res = Result(argv, p.returncode, so.decode(errors="replace"), se.decode(errors="replace"),
                 time.monotonic() - t0)
    if wait_helper and env.get("ACKPT_TEST_MARK"):
        wait_helpers(env["ACKPT_TEST_MARK"])
    return res


def read_stats(path):
    path = Path(path)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def run_plain_and_shim(argv_builder, tmp_path, shim_extra=None, staging="64M", timeout=DEFAULT_TIMEOUT,
                       wrap=None, special=None):
    """Run argv_builder(out) plainly into tmp_path/plain/out and under the
    shim (extra env: shim_extra) into tmp_path/shim/out.  Both must exit 0.
    wrap(label, argv, base) -> argv can wrap the command (strace, ...).
    Returns (plain Result, shim Result, plain stats, shim stats, differences)."""
    from conftest import compare_trees
    out = {}
    res = {}
    stats = {}
    for label in ("plain", "shim"):
        base = Path(tmp_path) / label
        o = base / "out"
        o.mkdir(parents=True)
        sp = base / "stats.json"
        if label == "plain":
            env = plain_env(ACKPT_TEST_STATS=sp)
        else:
            env = shim_env(o, staging=staging, ACKPT_TEST_STATS=sp, **(shim_extra or {}))
        argv = [str(a) for a in argv_builder(o)]
        if wrap:
            argv = wrap(label, argv, base)
        r = run(argv, env, cwd=base, timeout=timeout)
        if r.returncode != 0:
            pytest.fail("%s run failed:\n%s" % (label, r.describe()), pytrace=False)
        out[label], res[label], stats[label] = o, r, read_stats(sp)
    diffs = compare_trees(out["plain"], out["shim"], special)
    return res["plain"], res["shim"], stats["plain"], stats["shim"], diffs


def assert_same_trees(diffs, shim_res=None):
    if diffs:
        msg = "shim output differs from the plain run:\n  - " + "\n  - ".join(diffs[:30])
        if shim_res is not None:
            msg += "\n" + shim_res.describe(2000)
        pytest.fail(msg, pytrace=False)


def differential(tmp_path, argv_builder, delay_ms=150, extra=None, timeout=DEFAULT_TIMEOUT,
                 quiet=True):
    """Run argv_builder(out) plainly and under the shim (run_plain_and_shim)
    and require the same trees and the same standard output.  delay_ms
    slows the helper so staged data is still in flight when the program
    looks; None runs it at full speed, with write-through on (any
    ACKPT_TEST_DELAY_MS turns that off).  quiet: the shim prints nothing."""
    env = dict(extra or {})
    if delay_ms is not None:
        env["ACKPT_TEST_DELAY_MS"] = delay_ms
    plain, shimmed, _, _, diffs = run_plain_and_shim(argv_builder, tmp_path, shim_extra=env,
                                                     timeout=timeout)
    assert_same_trees(diffs, shimmed)
    assert shimmed.stdout == plain.stdout, "output differs:\nplain:\n%s\nshim:\n%s" % (
        plain.stdout, shimmed.describe())
    if quiet:
        assert not shimmed.stderr.strip(), shimmed.describe()
    return plain, shimmed


def py_argv(script):
    """argv builder: the venv's Python runs script with the output directory."""
    src = textwrap.dedent(script)
    return lambda out: [VENV_PY, "-c", src, str(out)]


def prng(n, seed):
    import random
    return random.Random(seed).randbytes(n)


def file_matches(path, expected):
    """None when the file at path holds exactly `expected`, else a description."""
    path = Path(path)
    if not path.exists():
        return "%s does not exist" % path
    got = path.read_bytes()
    if got == expected:
        return None
    n = min(len(got), len(expected))
    off = next((i for i in range(0, n, 4096) if got[i:i + 4096] != expected[i:i + 4096]), None)
    if off is not None:
        off = next(i for i in range(off, min(off + 4096, n)) if got[i] != expected[i])
    return ("%s: %d bytes, expected %d; first difference at offset %s"
            % (path, len(got), len(expected), off if off is not None else n))


# --------------------------------------------------------------------------
# Compiling the programs in tests/fault_progs
# --------------------------------------------------------------------------

def build_fault_c(build_c, name, flags=()):
    return build_c(FPROGS / name, flags)


def py_prog(name):
    return [VENV_PY, str(FPROGS / name)]


# --------------------------------------------------------------------------
# strace
# --------------------------------------------------------------------------

WRITE_FAMILY = {"write", "pwrite64", "writev", "pwritev", "pwritev2"}
SYNC_FAMILY = {"fsync", "fdatasync"}
PROC_CREATE = {"clone", "clone3", "fork", "vfork"}
STRACE_SET = ("write,pwrite64,writev,pwritev,pwritev2,fsync,fdatasync,"
              "execve,clone,clone3,fork,vfork")


def strace_argv(trace_file, argv, syscalls=STRACE_SET):
    # no --seccomp-bpf: strace 6.1 sometimes aborts in its seccomp order check
    return ["strace", "-f", "-qq", "-y", "-s", "64", "-o", str(trace_file),
            "-e", "trace=" + syscalls] + list(argv)


@dataclasses.dataclass
class Call:
    pid: int
    name: str
    args: str        # the argument text as strace printed it
    ret: str         # the return value text ("" if never finished)

    def fd_path(self):
        """The -y path of the first argument, if it is a descriptor."""
        m = re.match(r"\s*\d+<(.*?)>(?:,|$)", self.args)
        return m.group(1) if m else None

    def ret_int(self):
        m = re.match(r"\s*(-?\d+)", self.ret)
        return int(m.group(1)) if m else None


_LINE = re.compile(r"^(\d+)\s+(.*)$")
_START = re.compile(r"^([a-z_0-9]+)\((.*)$")
_RESUMED = re.compile(r"^<\.\.\. ([a-z_0-9]+) resumed>(.*)$")


def _split_ret(rest):
    """rest: the text after 'name(' up to the end of line -> (args, ret)."""
    i = rest.rfind(") = ")
    if i < 0:
        m = re.search(r"\)\s+= ", rest)
        if not m:
            return rest, ""
        return rest[:m.start()], rest[m.end():]
    return rest[:i], rest[i + 4:]


def parse_strace(path):
    """List of Call from an `strace -f -o` file (unfinished/resumed pairs joined)."""
    calls = []
    pending = {}
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            m = _LINE.match(line)
            if not m:
                continue
            pid, rest = int(m.group(1)), m.group(2)
            if rest.startswith("+++") or rest.startswith("---"):
                continue
            r = _RESUMED.match(rest)
            if r:
                name = r.group(1)
                start = pending.pop((pid, name), "")
                args, ret = _split_ret(start + r.group(2))
                calls.append(Call(pid, name, args, ret))
                continue
            s = _START.match(rest)
            if not s:
                continue
            name, body = s.group(1), s.group(2)
            if body.endswith("<unfinished ...>"):
                pending[(pid, name)] = body[:-len("<unfinished ...>")].rstrip()
                continue
            args, ret = _split_ret(body)
            calls.append(Call(pid, name, args, ret))
    for (pid, name), start in pending.items():
        calls.append(Call(pid, name, start, ""))
    return calls


def traced_plain_and_shim(tmp_path, name, c_src, syscalls, shim_extra=None):
    """Build c_src as tmp_path/name, run it (argument: its output directory)
    plainly and under the shim, each under strace for `syscalls` and process
    creation.  Returns (plain Result, shim Result, tree differences,
    {"plain": [Call], "shim": [Call]}, pids of the program in the shim run)."""
    (tmp_path / (name + ".c")).write_text(c_src)
    prog = tmp_path / name
    subprocess.run(["cc", "-O1", "-o", str(prog), str(tmp_path / (name + ".c"))], check=True)
    traces = {}

    def wrap(label, argv, base):
        traces[label] = base / "trace"
        return strace_argv(base / "trace", argv, syscalls + ",execve,clone,clone3,fork,vfork")

    plain, shimmed, _, _, diffs = run_plain_and_shim(lambda out: [prog, out], tmp_path,
                                                     shim_extra=shim_extra, wrap=wrap)
    calls = {label: parse_strace(t) for label, t in traces.items()}
    pids = {c.pid for c in calls["shim"] if c.name == "execve" and str(prog) in c.args}
    assert pids, "the program's exec was not traced"
    return plain, shimmed, diffs, calls, pids


def helper_pid_set(calls):
    """Pids belonging to the helper: those that execve'd ackpt-helper
    successfully, and every process/thread they created (transitively)."""
    helpers = set()
    for c in calls:
        if c.name == "execve" and re.match(r'\s*"[^"]*/%s"' % HELPER_NAME, c.args) and c.ret_int() == 0:
            helpers.add(c.pid)
    changed = True
    while changed:
        changed = False
        for c in calls:
            if c.name in PROC_CREATE and c.pid in helpers:
                child = c.ret_int()
                if child and child > 0 and child not in helpers:
                    helpers.add(child)
                    changed = True
    return helpers


def inside(path, root):
    root = str(root).rstrip("/")
    return path is not None and path.startswith(root + "/")
