"""Shared fixtures for the ackpt test-suite.

The corpus tests run a real program twice -- once plainly, once under the
preload -- and require the two output trees to be identical (names, types,
sizes, bytes, permission bits).  See test_corpus.py and progs/.

Environment knobs (all optional):
  ACKPT_BUILD_DIR        meson build directory (default: <repo>/build)
  ACKPT_TEST_LAUNCHER    launcher to use instead of scripts/ackpt-run
  ACKPT_TEST_MODE        "shim" (default): second run under the shim;
                         "plain": second run also without the shim -- checks
                         that the corpus programs themselves are
                         deterministic; needs no build
  ACKPT_TEST_REQUIRE_BUILD=1 (or CI set): a missing build fails instead of
                         skipping
  ACKPT_TEST_TIMEOUT     per-run timeout in seconds (default 90; a plain run takes
                         a few seconds, so a hit means a hang)
  ACKPT_* (LOG, STAGING, COMMIT, ...) set in the environment are passed to
  the shim run only; the plain run never sees any ACKPT_* or LD_PRELOAD.
"""
import dataclasses
import difflib
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
PROGS = TESTS / "progs"
BUILD = Path(os.environ.get("ACKPT_BUILD_DIR", str(REPO / "build")))
LIB = BUILD / "src" / "shim" / "libackpt.so"
HELPER = BUILD / "src" / "helper" / "ackpt-helper"


def _venv_python():
    p = REPO / ".venv" / "bin" / "python"
    return str(p) if p.exists() else sys.executable


VENV_PY = _venv_python()
MODE = os.environ.get("ACKPT_TEST_MODE", "shim")
if MODE not in ("shim", "plain"):
    raise ValueError("ACKPT_TEST_MODE must be 'shim' or 'plain', not %r" % MODE)
RUN_TIMEOUT = float(os.environ.get("ACKPT_TEST_TIMEOUT", "90"))


def _truthy(v):
    return v not in (None, "", "0", "false", "False", "no")


REQUIRE_BUILD = _truthy(os.environ.get("ACKPT_TEST_REQUIRE_BUILD")) or _truthy(os.environ.get("CI"))


# --------------------------------------------------------------------------
# Locating the build and the launcher
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Shim:
    lib: Path
    helper: Path
    launcher: "Path | None"  # None: set LD_PRELOAD & co. ourselves

    def wrap(self, cmd, managed_dir, env):
        """Return (argv, env) that run cmd under the shim managing managed_dir."""
        env = dict(env)
        env["ACKPT_HELPER"] = str(self.helper)
        env["ACKPT_LIB"] = str(self.lib)  # harmless if the launcher ignores it
        if self.launcher is not None:
            return [str(self.launcher), "--dir", str(managed_dir), "--"] + list(cmd), env
        env["LD_PRELOAD"] = str(self.lib)
        env["ACKPT_PATHS"] = str(managed_dir)
        return list(cmd), env


def find_launcher():
    cand = os.environ.get("ACKPT_TEST_LAUNCHER")
    if cand:
        return Path(cand)
    p = REPO / "scripts" / "ackpt-run"
    if p.is_file() and os.access(p, os.X_OK):
        return p
    return None


def build_problem():
    """None when the shim build is usable, else a sentence saying what is missing."""
    missing = [str(p) for p in (LIB, HELPER) if not p.exists()]
    if missing:
        return ("ackpt is not built (missing %s); run `meson setup build && meson compile -C build`"
                " or set ACKPT_BUILD_DIR" % ", ".join(missing))
    return None


@pytest.fixture(scope="session")
def shim():
    """The built shim, or skip (fail under CI / ACKPT_TEST_REQUIRE_BUILD) when it is missing.

    In ACKPT_TEST_MODE=plain no build is needed and this returns None."""
    if MODE == "plain":
        return None
    problem = build_problem()
    if problem:
        if REQUIRE_BUILD:
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    return Shim(LIB, HELPER, find_launcher())


# --------------------------------------------------------------------------
# Compiling test programs (once per session, cached by source + flags)
# --------------------------------------------------------------------------

_compiled = {}


def _compile(kind, compiler, src, outdir, flags, build_cmd):
    src = Path(src)
    if not src.is_absolute():
        src = PROGS / src
    key = (kind, str(src), tuple(flags))
    if key in _compiled and _compiled[key].exists():
        return _compiled[key]
    exe_cmd = shutil.which(compiler)
    if exe_cmd is None:
        pytest.skip("%s not found on PATH: cannot build %s" % (compiler, src.name))
    tag = hashlib.sha1(("%s|%s|%s" % (kind, src, " ".join(flags))).encode()).hexdigest()[:10]
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    exe = outdir / ("%s-%s" % (src.stem, tag))
    cmd = build_cmd(exe_cmd, src, exe)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(outdir))
    if r.returncode != 0:
        pytest.fail("building %s failed:\n$ %s\n%s%s" % (src.name, " ".join(cmd), r.stdout, r.stderr),
                    pytrace=False)
    _compiled[key] = exe
    return exe


def compile_c(src, outdir, flags=()):
    flags = list(flags)
    return _compile("c", os.environ.get("CC", "cc"), src, outdir, flags,
                    lambda cc, s, e: [cc, "-std=gnu11", "-O2", "-g", "-Wall", "-Wextra"] + flags
                    + ["-o", str(e), str(s)])


def compile_cxx(src, outdir, flags=()):
    flags = list(flags)
    return _compile("cxx", os.environ.get("CXX", "g++"), src, outdir, flags,
                    lambda cxx, s, e: [cxx, "-std=c++17", "-O2", "-g", "-Wall", "-Wextra"] + flags
                    + ["-o", str(e), str(s)])


def compile_rust(src, outdir, flags=()):
    flags = list(flags)
    return _compile("rust", os.environ.get("RUSTC", "rustc"), src, outdir, flags,
                    lambda rc, s, e: [rc, "--edition", "2021", "-O", "-C", "debuginfo=1"] + flags
                    + ["-o", str(e), str(s)])


@pytest.fixture(scope="session")
def prog_cache(tmp_path_factory):
    """A per-session directory where compiled test programs live."""
    return tmp_path_factory.mktemp("progs-bin")


@pytest.fixture(scope="session")
def build_c(prog_cache):
    return lambda src, flags=(): compile_c(src, prog_cache, flags)


@pytest.fixture(scope="session")
def build_cxx(prog_cache):
    return lambda src, flags=(): compile_cxx(src, prog_cache, flags)


@pytest.fixture(scope="session")
def build_rust(prog_cache):
    return lambda src, flags=(): compile_rust(src, prog_cache, flags)


# --------------------------------------------------------------------------
# Running a program
# --------------------------------------------------------------------------

@dataclasses.dataclass
class RunResult:
    label: str
    argv: list
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    out: Path
    stats: "dict | None"

    def describe(self, tail=4000):
        def cut(s):
            return s if len(s) <= tail else "...[cut]...\n" + s[-tail:]
        return ("[%s] $ %s\n  exit status %s after %.1fs\n  --- stdout ---\n%s\n  --- stderr ---\n%s"
                % (self.label, " ".join(map(str, self.argv)), self.returncode, self.seconds,
                   cut(self.stdout), cut(self.stderr)))


def _base_env():
    env = {k: v for k, v in os.environ.items()
           if k != "LD_PRELOAD" and not k.startswith("ACKPT_")}
    env.update({
        "TZ": "UTC",
        "LC_ALL": "C",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    })
    return env


def _shim_passthrough_env():
    """ACKPT_* tuning knobs from the caller's environment, for the shim run only."""
    return {k: v for k, v in os.environ.items()
            if k.startswith("ACKPT_") and not k.startswith("ACKPT_TEST_")
            and k not in ("ACKPT_PATHS", "ACKPT_BUILD_DIR", "ACKPT_DISABLE")}


def _session_members(sid):
    """Live (non-zombie) processes whose session id is sid."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rfind(")") + 2:].split()
        # rest: state ppid pgrp session ...
        if len(rest) > 3 and rest[0] != "Z" and int(rest[3]) == sid:
            try:
                with open("/proc/%s/cmdline" % d, "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmdline = "?"
            found.append("%s %s" % (d, cmdline))
    return found


def run_program(argv, cwd, env, label, out, stats_path, timeout=RUN_TIMEOUT, straggler_timeout=60.0):
    """Run argv in its own session; afterwards wait for any process it left
    behind in that session (a helper finishing the work of an os._exit()ed
    child, say), so the output tree is final when this returns."""
    t0 = time.monotonic()
    p = subprocess.Popen([str(a) for a in argv], cwd=str(cwd), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        so, se = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        so, se = p.communicate()
        pytest.fail("[%s] timed out after %.0fs: %s\n--- stderr ---\n%s"
                    % (label, timeout, " ".join(map(str, argv)), se.decode(errors="replace")[-4000:]),
                    pytrace=False)
    deadline = time.monotonic() + straggler_timeout
    left = _session_members(p.pid)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _session_members(p.pid)
    if left:
        for line in left:
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        pytest.fail("[%s] processes still running %.0fs after the program exited:\n  %s"
                    % (label, straggler_timeout, "\n  ".join(left)), pytrace=False)
    stats = None
    if stats_path.exists():
        try:
            stats = json.loads(stats_path.read_text())
        except ValueError as e:
            stats = {"unparsable": str(e), "text": stats_path.read_text()}
    return RunResult(label, list(argv), p.returncode, so.decode(errors="replace"),
                     se.decode(errors="replace"), time.monotonic() - t0, out, stats)


# --------------------------------------------------------------------------
# Comparing output trees
# --------------------------------------------------------------------------

def _kind(mode):
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "chardev"),
                       (stat.S_ISBLK, "blockdev")):
        if test(mode):
            return name
    return "unknown"


def scan_tree(root):
    """{relative path: lstat result} for everything under root (root itself excluded)."""
    root = Path(root)
    entries = {}

    def walk(d, rel):
        for name in sorted(os.listdir(d)):
            p = d / name
            r = rel + name
            st = os.lstat(p)
            entries[r] = st
            if stat.S_ISDIR(st.st_mode):
                walk(p, r + "/")
    walk(root, "")
    return entries


def _hexctx(path, off, n=16):
    with open(path, "rb") as f:
        f.seek(max(0, off - n))
        b = f.read(2 * n)
    return "%s @%d: %s" % (path.name, max(0, off - n), b.hex(" "))


def first_difference(a, b, chunk=1 << 20):
    """Offset of the first differing byte of two files (None when equal over the
    shorter length)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x = fa.read(chunk)
            y = fb.read(chunk)
            if x != y:
                n = min(len(x), len(y))
                for i in range(n):
                    if x[i] != y[i]:
                        return off + i
                return off + n if len(x) != len(y) else None
            if not x:
                return None
            off += len(x)


def _textdiff(a, b, limit=64 << 10, lines=40):
    """A unified diff when both files are small text files (observed.* say what
    the program saw), else ''."""
    try:
        if os.path.getsize(a) > limit or os.path.getsize(b) > limit:
            return ""
        ta = Path(a).read_bytes().decode("utf-8").splitlines()
        tb = Path(b).read_bytes().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    d = list(difflib.unified_diff(ta, tb, "plain", "shim", lineterm="", n=2))
    if not d:
        return ""
    if len(d) > lines:
        d = d[:lines] + ["... (%d more diff lines)" % (len(d) - lines)]
    return "\n" + "\n".join("        " + x for x in d)


def compare_trees(plain, shim, special=None):
    """List of human-readable differences between two output trees.

    special: {glob on the relative path: callable(plain_file, shim_file) ->
    None or a string describing the difference}.  Matching regular files are
    compared with the callable instead of by size and bytes (type and
    permission bits are still compared)."""
    special = special or {}
    plain, shim = Path(plain), Path(shim)
    a, b = scan_tree(plain), scan_tree(shim)
    diffs = []
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    if only_a:
        diffs.append("missing in the shim run: %s" % ", ".join(only_a))
    if only_b:
        diffs.append("only in the shim run (leftover temporary?): %s" % ", ".join(only_b))
    for rel in sorted(set(a) & set(b)):
        sa, sb = a[rel], b[rel]
        ka, kb = _kind(sa.st_mode), _kind(sb.st_mode)
        if ka != kb:
            diffs.append("%s: type %s (plain) vs %s (shim)" % (rel, ka, kb))
            continue
        if stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode):
            diffs.append("%s: permissions %o (plain) vs %o (shim)"
                         % (rel, stat.S_IMODE(sa.st_mode), stat.S_IMODE(sb.st_mode)))
        if ka == "symlink":
            ta, tb = os.readlink(plain / rel), os.readlink(shim / rel)
            if ta != tb:
                diffs.append("%s: symlink target %r vs %r" % (rel, ta, tb))
            continue
        if ka != "file":
            continue
        cmp_fn = next((fn for pat, fn in special.items() if fnmatch.fnmatchcase(rel, pat)), None)
        if cmp_fn is not None:
            why = cmp_fn(plain / rel, shim / rel)
            if why:
                diffs.append("%s: %s" % (rel, why))
            continue
        if sa.st_size != sb.st_size:
            off = first_difference(plain / rel, shim / rel)
            diffs.append("%s: size %d (plain) vs %d (shim); first differing byte at offset %s%s"
                         % (rel, sa.st_size, sb.st_size, off, _textdiff(plain / rel, shim / rel)))
            continue
        off = first_difference(plain / rel, shim / rel)
        if off is not None:
            diffs.append("%s: contents differ (size %d); first differing byte at offset %d (0x%x)\n"
                         "      plain %s\n      shim  %s%s"
                         % (rel, sa.st_size, off, off, _hexctx(plain / rel, off), _hexctx(shim / rel, off),
                            _textdiff(plain / rel, shim / rel)))
    return diffs


# --------------------------------------------------------------------------
# run_pair
# --------------------------------------------------------------------------

def _check_stats(res, expect_staged):
    """The shim run must really have gone through the shim."""
    st = res.stats
    if st is None:
        return None
    if "unparsable" in st:
        return "stats file unparsable: %r" % st
    if not st.get("present"):
        return "ackpt_get_stats not found in the process: the preload did not take effect"
    if st.get("rc", 0) != 0:
        return "ackpt_get_stats returned %r" % st.get("rc")
    if st.get("active") != 1:
        return "stats.active=%r: the shim never opened a managed file (%r)" % (st.get("active"), st)
    if expect_staged and not st.get("bytes_staged"):
        return "stats.bytes_staged=0: nothing went through staging (%r)" % st
    return None


def _run_pair(cmd_builder, tmp_path, shim, *, special=None, expect_stats=True, expect_staged=True,
              timeout=RUN_TIMEOUT):
    tmp_path = Path(tmp_path)
    results = []
    for label in ("plain", "shim"):
        base = tmp_path / label
        out = base / "out"
        out.mkdir(parents=True)
        stats_path = base / "stats.json"
        env = _base_env()
        env["ACKPT_TEST_STATS"] = str(stats_path)
        argv = [str(a) for a in cmd_builder(out)]
        if label == "shim" and MODE == "shim":
            env.update(_shim_passthrough_env())
            argv, env = shim.wrap(argv, out, env)
        res = run_program(argv, base, env, label if MODE == "shim" else label + "(no shim)",
                          out, stats_path, timeout=timeout)
        results.append(res)
        if res.returncode != 0:
            if label == "plain":
                pytest.fail("the program failed WITHOUT the shim (the test program itself is broken):\n"
                            + res.describe(), pytrace=False)
            pytest.fail("the program failed under the shim:\n" + res.describe(), pytrace=False)
    plain, shimmed = results
    print("plain %.2fs, %s %.2fs" % (plain.seconds, shimmed.label, shimmed.seconds))
    if shimmed.stats is not None:
        print("stats of the %s run: %s" % (shimmed.label, json.dumps(shimmed.stats, sort_keys=True)))
    if shimmed.stderr.strip():
        print("stderr of the shim run:\n" + shimmed.stderr[-4000:])

    problems = []
    if expect_stats and plain.stats is None:
        problems.append("the program did not write its stats file (ACKPT_TEST_STATS)")
    if plain.stats is not None and plain.stats.get("present"):
        problems.append("plain run: ackpt_get_stats is present -- the plain run is preloaded?")
    if MODE == "shim":
        if expect_stats and shimmed.stats is None:
            problems.append("shim run: the program did not write its stats file (ACKPT_TEST_STATS)")
        why = _check_stats(shimmed, expect_staged)
        if why:
            problems.append("shim run: " + why)
    diffs = compare_trees(plain.out, shimmed.out, special)
    if diffs or problems:
        msg = ["%s output differs from the plain run (%s vs %s):" % (shimmed.label, plain.out, shimmed.out)]
        msg += ["  - " + d for d in problems + diffs[:30]]
        if len(diffs) > 30:
            msg.append("  ... and %d more differences" % (len(diffs) - 30))
        msg.append(shimmed.describe(tail=2000))
        pytest.fail("\n".join(msg), pytrace=False)
    return plain, shimmed


@pytest.fixture
def run_pair(shim):
    """run_pair(cmd_builder, tmp_path, *, special=None, expect_stats=True,
    expect_staged=True, timeout=...) -> (plain RunResult, shim RunResult).

    cmd_builder(outdir) returns the argv to run; outdir exists and is empty.
    Runs it without the shim into tmp_path/plain/out, then under the shim
    (managing tmp_path/shim/out) into tmp_path/shim/out, and asserts both exit
    0 and the trees are identical.  expect_stats: the program writes
    $ACKPT_TEST_STATS (all corpus programs except shell ones); the shim run
    must then show active=1 and (expect_staged) bytes_staged > 0."""
    def run(cmd_builder, tmp_path, **kw):
        return _run_pair(cmd_builder, tmp_path, shim, **kw)
    return run
