"""CI subset of the crash and fault suite (issue 6): runs `tests/faults/run
--quick --no-doc` and asserts every invariant per scenario: 100% of the
injected faults surfaced, zero commits after an error, zero torn checkpoints
presented as complete, zero bytes lost, zero hangs, no other violation.
The full suite (`tests/faults/run`) regenerates docs/RELIABILITY.md."""
import json
import subprocess

import pytest

from faultutil import need_shim
from conftest import REPO

RUN = REPO / "tests" / "faults" / "run"


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    need_shim()
    out = tmp_path_factory.mktemp("faults") / "figures.json"
    r = subprocess.run([str(RUN), "--quick", "--no-doc", "--json", str(out)], capture_output=True,
                       text=True, timeout=3000)
    if not out.exists():
        pytest.fail("tests/faults/run produced no figures (status %s):\n%s\n%s"
                    % (r.returncode, r.stdout[-4000:], r.stderr[-4000:]), pytrace=False)
    fig = json.loads(out.read_text())
    fig["log"] = r.stdout[-6000:] + r.stderr[-3000:]
    return fig


SCENARIOS = ["1-trainer-kill", "2-helper-kill", "3-crash-sweep", "4-power-loss", "5-fault-sweep",
             "6-real-enospc", "6b-real-eio", "7-multi-rank", "8-back-pressure", "8b-fuse-faults", "9-bad-input",
             "10-security", "10b-coordinator-fuzz"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_invariants(figures, name):
    found = [s for s in figures["scenarios"] if s["name"] == name]
    assert found, "scenario %s did not run:\n%s" % (name, figures["log"])
    s = found[0]
    if s["skipped"]:
        pytest.skip(s["skipped"])
    assert s["trials"] > 0, s
    problems = []
    if s["surfaced"] != s["injected"]:
        problems.append("faults surfaced %d of %d" % (s["surfaced"], s["injected"]))
    for k in ("commits_after_error", "torn", "bytes_lost", "hangs"):
        if s[k]:
            problems.append("%s = %d" % (k, s[k]))
    problems += s["failures"][:20]
    assert not problems, "scenario %s (seed %d):\n  - %s" % (name, figures["seed"],
                                                             "\n  - ".join(p[:600] for p in problems))
