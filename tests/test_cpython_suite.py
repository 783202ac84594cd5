"""CPython's own regression tests for files, run inside a managed directory.

Each module of MODULES runs twice with Debian's /usr/bin/python3.11 and its
test package (apt: libpython3.11-testsuite, installed by scripts/deps):

    python3.11 -m test -v --junit-xml=... --tempdir=W --timeout=T <module>

with the current directory and TMPDIR set to a fresh directory W: once
plainly, once under the shim managing W (shim_env in faultutil).  regrtest
creates its work directory (test_python_<pid>) and every temporary file under
W, so what the tests write is managed.  The interpreter and its test package
must match, which is why the venv's Python is not used.

Per-test outcomes (pass / fail / error / skip) come from the JUnit XML
(per test id) and from the failure blocks at the end of the verbose output
(these also cover failed subtests, setUpClass/setUpModule errors and
unexpected successes, which the XML does not record); when a run dies before
writing the XML (crash, --timeout), from its verbose lines.

A test that passes plainly and fails or errors under the shim is a candidate
regression.  It is rerun alone (`-m <test id>`) once under the shim and once
plainly, and then:
  - plain rerun fails too: the test is flaky or broken here without ackpt;
    printed, not a regression;
  - otherwise it is a regression, reported with the text of the full shim
    run and the outcome of both reruns ("reproduced when rerun alone" or
    "intermittent: passed when rerun alone under the shim").  At most
    MAX_RERUNS candidates per module are rerun; the rest count unconfirmed.  A failure
    that needs the rest of the module or a lost race to show up is exactly
    what an ackpt bug looks like, so not reproducing it alone does not
    excuse it.
Tests that fail in both full runs, skips that differ and regrtest's
"environment changed" warnings are printed only.  The module also fails if
the shim run did not complete (crash or timeout) while the plain run did,
or exited non-zero with no per-test difference to explain it.

Knobs: ACKPT_TEST_CPYTHON (interpreter, default /usr/bin/python3.11),
ACKPT_TEST_CPYTHON_TIMEOUT (seconds per module run, default 300).  Without
the interpreter or its test package the tests skip, and fail when CI is set.
"""
import functools
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import _truthy
from faultutil import need_shim, plain_env, run, shim_env

CPYTHON = os.environ.get("ACKPT_TEST_CPYTHON", "/usr/bin/python3.11")
MODULE_TIMEOUT = float(os.environ.get("ACKPT_TEST_CPYTHON_TIMEOUT", "300"))
RERUN_TIMEOUT = min(MODULE_TIMEOUT, 120.0)
MAX_RERUNS = 20     # candidates rerun per module; any beyond count as regressions unconfirmed
IN_CI = _truthy(os.environ.get("CI"))

MODULES = ["test_os", "test_shutil", "test_tempfile", "test_zipfile", "test_tarfile", "test_gzip",
           "test_io", "test_fileio", "test_posix", "test_mmap", "test_pathlib", "test_fcntl"]

PASS, FAIL, ERROR, SKIP = "pass", "fail", "error", "skip"
BAD = (FAIL, ERROR)

# Variables that would make the interpreter load something other than its own stdlib.
_PY_ENV_DROP = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONSAFEPATH",
                "PYTHONINSPECT", "PYTHONWARNINGS")


def _missing(reason):
    if IN_CI:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@functools.lru_cache(maxsize=None)
def _available_modules():
    """(set of MODULES importable as test.<name>, None) or (None, reason)."""
    py = Path(CPYTHON)
    if not (py.is_file() and os.access(py, os.X_OK)):
        return None, ("%s not found (Debian's python3.11; set ACKPT_TEST_CPYTHON to another "
                      "interpreter)" % CPYTHON)
    code = ("import importlib.util, sys\n"
            "import test.libregrtest\n"
            "for m in sys.argv[1:]:\n"
            "    if importlib.util.find_spec('test.' + m) is not None: print(m)\n")
    r = subprocess.run([CPYTHON, "-c", code] + MODULES, capture_output=True, text=True,
                       env=plain_env(**{k: None for k in _PY_ENV_DROP}), timeout=120)
    if r.returncode != 0:
        return None, ("%s has no regression-test package (`import test.libregrtest` failed; "
                      "apt-get install libpython3.11-testsuite): %s"
                      % (CPYTHON, (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]))
    return set(r.stdout.split()), None


# --------------------------------------------------------------------------
# Parsing regrtest's output
# --------------------------------------------------------------------------

SEP1 = "=" * 70
SEP2 = "-" * 70
_HEADER = re.compile(r"^(FAIL|ERROR|UNEXPECTED SUCCESS): (\S+) \(([\w.]+)\)(.*)$")
_VERBOSE = re.compile(r"^(\w+) \(([\w.]+)\)(?:\n[^\n]*)? \.\.\. "
                      r"(ok|skipped|expected failure|unexpected success|FAIL|ERROR)", re.M)
_FIXTURES = ("setUpClass", "tearDownClass", "setUpModule", "tearDownModule")
_RAN = re.compile(r"^Ran (\d+) tests? in ", re.M)


def _key(name, ident):
    """(test id, -m pattern that reruns it) of a failure-block header."""
    if ident.endswith("." + name):
        return ident, ident                      # a test (or one of its subtests)
    return ident + "." + name, ident + ".*"      # _ErrorHolder: setUpClass (test.mod.Cls) ...


def _failure_blocks(stdout):
    """{key: (status, text, pattern)} from the FAIL:/ERROR: blocks unittest prints at the end."""
    lines = stdout.splitlines()
    found = {}
    i = 0
    while i < len(lines):
        m = _HEADER.match(lines[i])
        if not m or (i > 0 and lines[i - 1] != SEP1):
            i += 1
            continue
        flavour, name, ident, extra = m.groups()
        key, pattern = _key(name, ident)
        if flavour == "UNEXPECTED SUCCESS":
            found.setdefault(key, [FAIL, "unexpected success", pattern])
            i += 1
            continue
        j = i + 1
        while j < len(lines) and j < i + 4 and lines[j] != SEP2:
            j += 1                                # skip the docstring line, if any
        body = []
        j += 1
        while j < len(lines):
            if lines[j] == SEP1:
                break
            if lines[j] == SEP2 and j + 1 < len(lines) and _RAN.match(lines[j + 1]):
                break
            body.append(lines[j])
            j += 1
        text = "\n".join(body).strip()
        if extra.strip():
            text = "subtest %s:\n%s" % (extra.strip(), text)
        status = ERROR if flavour == "ERROR" else FAIL
        if key in found:
            old = found[key]
            old[0] = ERROR if ERROR in (old[0], status) else FAIL
            old[1] += "\n\n" + text
        else:
            found[key] = [status, text, pattern]
        i = j
    return {k: tuple(v) for k, v in found.items()}


def _xml_outcomes(path):
    """{test id: status} from regrtest's --junit-xml (tests that reached an add* call)."""
    out = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = tc.get("name")
        if not name:          # failed subtests / unexpected success: no add* result recorded
            continue
        tags = {c.tag for c in tc}
        if "error" in tags:
            out[name] = ERROR
        elif "failure" in tags:
            out[name] = FAIL
        elif "skipped" in tags:
            out[name] = SKIP
        else:                 # success, or expected failure ("output")
            out[name] = PASS
    return out


def _verbose_outcomes(stdout):
    words = {"ok": PASS, "expected failure": PASS, "skipped": SKIP, "unexpected success": FAIL,
             "FAIL": FAIL, "ERROR": ERROR}
    return {m.group(2): words[m.group(3)] for m in _VERBOSE.finditer(stdout)}


class Outcome:
    """One regrtest run of one module (or of one test of it)."""

    def __init__(self, label, res, xml_path):
        self.label = label
        self.res = res
        self.complete = xml_path.exists()
        self.status = _xml_outcomes(xml_path) if self.complete else _verbose_outcomes(res.stdout)
        self.blocks = _failure_blocks(res.stdout)
        self.patterns = {}
        for key, (st, _text, pattern) in self.blocks.items():
            old = self.status.get(key)
            if old not in BAD or st == ERROR:
                self.status[key] = st
            self.patterns[key] = pattern
        m = _RAN.search(res.stdout)
        self.ran = int(m.group(1)) if m else None
        self.warnings = sorted({ln.strip() for ln in res.stdout.splitlines() + res.stderr.splitlines()
                                if ln.startswith("Warning -- ")})

    def get(self, key):
        """Status of key; for a class or module fixture (setUpClass, ...) that this run
        did not report, the outcome of the tests it covers."""
        if key in self.status:
            return self.status[key]
        prefix, _, last = key.rpartition(".")
        if last not in _FIXTURES:
            return None
        covered = {v for k, v in self.status.items() if k.startswith(prefix + ".")}
        for st in (ERROR, FAIL, PASS, SKIP):
            if st in covered:
                return st
        return None

    def count(self, st):
        return sum(1 for v in self.status.values() if v == st)

    def text(self, key):
        if key in self.blocks:
            return self.blocks[key][1]
        return "(no failure text: the run ended before printing it)\n" + self.res.describe(3000)

    def pattern(self, key):
        return self.patterns.get(key, key)

    def summary(self):
        return ("%-5s %7.1fs  exit %-4s ran %-4s passed %-4d failed %-3d errors %-3d skipped %-4d%s"
                % (self.label, self.res.seconds, self.res.returncode,
                   self.ran if self.ran is not None else "?", self.count(PASS), self.count(FAIL),
                   self.count(ERROR), self.count(SKIP), "" if self.complete else "  INCOMPLETE"))


# --------------------------------------------------------------------------
# Running regrtest
# --------------------------------------------------------------------------

def _regrtest(module, base, shimmed, match=None, timeout=MODULE_TIMEOUT):
    """Run `python3.11 -m test` on module in a fresh directory base/work
    (managed when shimmed); XML and logs go to base, outside it."""
    base = Path(base)
    work = base / "work"
    work.mkdir(parents=True)
    xml = base / "junit.xml"
    env = shim_env(work) if shimmed else plain_env()
    for k in list(_PY_ENV_DROP) + ["TEMP", "TMP"]:
        env.pop(k, None)
    env["TMPDIR"] = str(work)
    env["LC_ALL"] = "C.UTF-8"   # not _base_env's C: some test_io tests skip without a UTF-8 locale
    argv = [CPYTHON, "-m", "test", "-v", "--junit-xml", str(xml), "--tempdir", str(work),
            "--timeout", str(int(timeout))]
    if match:
        argv += ["-m", match]
    argv.append(module)
    # regrtest's --timeout (faulthandler: dumps the stacks, then exits) fires first;
    # run()'s own timeout is the backstop for a process that cannot exit
    res = run(argv, env, cwd=work, timeout=timeout + 120)
    (base / "stdout.txt").write_text(res.stdout)
    (base / "stderr.txt").write_text(res.stderr)
    return Outcome("shim" if shimmed else "plain", res, xml)


def _ackpt_lines(res):
    return [ln for ln in res.stderr.splitlines() if "ackpt" in ln.lower()]


def _indent(text, n=6):
    return "\n".join(" " * n + ln for ln in text.splitlines())


@pytest.mark.parametrize("module", MODULES)
def test_cpython_module(module, tmp_path):
    need_shim()
    avail, problem = _available_modules()
    if problem:
        _missing(problem)
    if module not in avail:
        _missing("%s has no test.%s (%s)" % (
            CPYTHON, module, "wrong Python version for this list?" if avail else
            "its test package is only the stub of libpython3.11-stdlib: "
            "apt-get install libpython3.11-testsuite"))

    plain = _regrtest(module, tmp_path / "plain", shimmed=False)
    shim = _regrtest(module, tmp_path / "shim", shimmed=True)
    print("\n%s:\n  %s\n  %s" % (module, plain.summary(), shim.summary()))
    if not plain.complete:
        pytest.fail("%s did not complete WITHOUT the shim (the environment, not ackpt, is at fault):\n%s"
                    % (module, plain.res.describe(4000)), pytrace=False)

    both_bad = sorted(k for k, v in shim.status.items() if v in BAD and plain.get(k) in BAD)
    if both_bad:
        print("  fail in both runs (not regressions): " + ", ".join(
            "%s [%s/%s]" % (k, plain.get(k), shim.status[k]) for k in both_bad))
    skip_diff = sorted(k for k in set(plain.status) | set(shim.status)
                       if (plain.status.get(k) == SKIP) != (shim.status.get(k) == SKIP))
    if skip_diff:
        print("  skipped in one run only: " + ", ".join(
            "%s [%s/%s]" % (k, plain.status.get(k, "-"), shim.status.get(k, "-")) for k in skip_diff))
    if shim.complete:
        no_result = sorted(k for k in plain.status if shim.get(k) is None)
        if no_result:
            print("  no result in the shim run: " + ", ".join(no_result))
    for o in (plain, shim):
        if o.warnings:
            print("  %s run, regrtest warnings: %s" % (o.label, "; ".join(o.warnings)))
    if _ackpt_lines(shim.res):
        print("  ackpt on stderr:\n" + _indent("\n".join(_ackpt_lines(shim.res)[:20]), 4))

    candidates = sorted(k for k, v in shim.status.items() if v in BAD and plain.get(k) == PASS)
    regressions = []
    for n, key in enumerate(candidates, 1):
        if n > MAX_RERUNS:
            regressions.append("%s: plain pass, shim %s; not rerun (more than %d candidates)\n%s"
                               % (key, shim.status[key], MAX_RERUNS, _indent(shim.text(key))))
            continue
        pat = shim.pattern(key)
        r_shim = _regrtest(module, tmp_path / ("rerun%d-shim" % n), True, match=pat, timeout=RERUN_TIMEOUT)
        r_plain = _regrtest(module, tmp_path / ("rerun%d-plain" % n), False, match=pat,
                            timeout=RERUN_TIMEOUT)
        s_st, p_st = r_shim.get(key) or "not run", r_plain.get(key) or "not run"
        if p_st in BAD:
            print("  FLAKY without ackpt, not counted: %s (full runs: plain pass, shim %s; "
                  "rerun alone: shim %s, plain %s)" % (key, shim.status[key], s_st, p_st))
            continue
        if s_st in BAD:
            verdict = "reproduced when rerun alone (shim %s, plain %s)" % (s_st, p_st)
        elif s_st == PASS:
            verdict = ("intermittent: passed when rerun alone under the shim (rerun: shim %s, plain %s)"
                       % (s_st, p_st))
        else:
            verdict = "rerun alone did not confirm it either way (rerun: shim %s, plain %s)" % (s_st, p_st)
        text = shim.text(key)
        if s_st in BAD and key in r_shim.blocks and r_shim.blocks[key][1] != text:
            text += "\n    --- rerun under the shim ---\n" + r_shim.blocks[key][1]
        regressions.append("%s: plain pass, shim %s; %s\n%s" % (key, shim.status[key], verdict,
                                                                  _indent(text)))

    problems = list(regressions)
    if not shim.complete:
        lost = sorted(k for k, v in plain.status.items() if v == PASS and k not in shim.status)
        problems.append("the shim run did not complete (crash or timeout) while the plain run did; "
                        "%d tests that pass plainly have no result under the shim (first: %s)\n%s"
                        % (len(lost), ", ".join(lost[:10]), _indent(shim.res.describe(4000))))
    elif plain.res.returncode == 0 and shim.res.returncode != 0 and not regressions:
        problems.append("exit status 0 without the shim, %s with it, and no per-test difference "
                        "explains it (environment changed? helper error?)\n%s"
                        % (shim.res.returncode, _indent(shim.res.describe(4000))))
    if problems:
        pytest.fail("%s under ackpt: %d regression(s) (plain pass -> shim fail/error, each rerun "
                    "alone once under the shim and once plainly)\n  %s\n  %s\n- %s"
                    % (module, len(problems), plain.summary(), shim.summary(),
                       "\n- ".join(problems)), pytrace=False)
