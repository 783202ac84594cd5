"""The strace oracle: under the shim, the program itself never writes or
fsyncs a managed file -- only the helper does (DESIGN.md sections 2-3).

Each corpus program runs under
  strace -f -qq -y -e trace=write,pwrite64,writev,pwritev,pwritev2,fsync,fdatasync,
                              execve,clone,clone3,fork,vfork
once plainly (positive control: the oracle must see the program's writes to
the output directory) and once under the shim.  Helper pids are the process
that execve'd ackpt-helper and everything it forked or cloned; every other
pid is the program's.  The helper's io_uring writes are invisible to
strace; its pwrite-pool writes and fsyncs are visible and allowed.
"""
import os
import shutil

import pytest

from conftest import PROGS, VENV_PY
from faultutil import (SYNC_FAMILY, WRITE_FAMILY, assert_same_trees, helper_pid_set, inside,
                       need_shim, parse_strace, run_plain_and_shim, strace_argv)

PROGRAMS = {
    "c_basic": None,  # built by the test
    # pwrite pool: the helper's own writes become visible syscalls, so the
    # helper-pid attribution is checked too (they must all be the helper's)
    "c_basic-pool": None,
    "py_torch": [VENV_PY, PROGS / "py_torch.py"],
    "py_dcp4": [VENV_PY, PROGS / "py_dcp.py", "{out}", "4"],
}


def _skip_dcp_metadata(a, b):
    return None  # holds a random save_id and the path; test_corpus compares it properly


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_no_program_writes_to_managed_files(name, build_c, tmp_path):
    need_shim()
    if shutil.which("strace") is None:
        pytest.skip("strace not installed")
    if name.startswith("c_basic"):
        exe = build_c("c_basic.c")
        builder = lambda out: [exe, out]  # noqa: E731
    else:
        argv = PROGRAMS[name]
        if "{out}" in argv:
            builder = lambda out: [str(a).replace("{out}", str(out)) for a in argv]  # noqa: E731
        else:
            builder = lambda out: argv + [out]  # noqa: E731
    traces = {}

    def wrap(label, argv, base):
        traces[label] = base / "strace.txt"
        return strace_argv(traces[label], argv)

    plain, shimmed, pst, sst, diffs = run_plain_and_shim(
        builder, tmp_path, wrap=wrap, timeout=180,
        shim_extra={"ACKPT_IO": "pool"} if name.endswith("-pool") else None, special={"ckpt/.metadata": _skip_dcp_metadata})
    assert_same_trees(diffs, shimmed)
    assert sst and sst.get("active") == 1 and sst.get("bytes_staged", 0) > 0, \
        "the shim run did not go through the shim: %r" % sst

    report = {}
    for label in ("plain", "shim"):
        out = tmp_path / label / "out"
        calls = parse_strace(traces[label])
        assert any(c.name == "execve" for c in calls), "%s trace has no execve: broken trace" % label
        helpers = helper_pid_set(calls)
        hits = [c for c in calls
                if c.name in WRITE_FAMILY | SYNC_FAMILY and inside(c.fd_path(), out)
                and not os.path.isdir(c.fd_path())]
        prog_hits = [c for c in hits if c.pid not in helpers]
        report[label] = (helpers, hits, prog_hits)
        print("%s: %d traced calls, helper pids %s, %d write/fsync calls on managed files "
              "(%d from helper pids)" % (label, len(calls), sorted(helpers), len(hits),
                                         len(hits) - len(prog_hits)))

    helpers, hits, prog_hits = report["plain"]
    assert not helpers, "plain run: a helper was executed: %s" % helpers
    assert len(prog_hits) > 0, "positive control failed: the plain run's writes to the output " \
                               "directory are not visible to the oracle"

    helpers, hits, prog_hits = report["shim"]
    assert helpers, "shim run: no process execve'd ackpt-helper (trace: %s)" % traces["shim"]
    if name.endswith("-pool"):
        assert len(hits) - len(prog_hits) > 0, \
            "ACKPT_IO=pool: the helper's pwrite calls were not seen or not attributed to helper pids"
    if prog_hits:
        sample = "\n  ".join("pid %d %s(%s) = %s" % (c.pid, c.name, c.args[:160], c.ret)
                             for c in prog_hits[:15])
        pytest.fail("%d write/fsync syscalls on managed files came from program pids (not the "
                    "helper %s):\n  %s" % (len(prog_hits), sorted(helpers), sample), pytrace=False)
