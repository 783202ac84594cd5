"""The strace oracle: under the shim, the program itself never writes or
fsyncs a managed file -- only the helper does (docs/DESIGN.md sections 2-3),
as long as staging takes every write (ACKPT_WRITE_THROUGH=off; with it on,
tests/test_write_through.py checks what the program writes itself).

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

    # staging only: with write-through on, a write that staging cannot take
    # at once goes through the kernel from the program (tests/test_write_through.py)
    extra = {"ACKPT_WRITE_THROUGH": "off"}
    if name.endswith("-pool"):
        extra["ACKPT_IO"] = "pool"
    plain, shimmed, pst, sst, diffs = run_plain_and_shim(
        builder, tmp_path, wrap=wrap, timeout=180, shim_extra=extra,
        special={"ckpt/.metadata": _skip_dcp_metadata})
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


@pytest.mark.parametrize("style", ["tracker", "dcp"])
def test_commit_waits_for_durable_names(style, tmp_path):
    """The helper fsyncs the directory of every new data file, and that
    directory's parent (the checkpoint directory the program just made),
    before the metadata commit renames the temporary to its final name.
    The negative control (ACKPT_TEST_SKIP_DIRFSYNC=1, the knob of the
    power-loss scenario) must make the oracle see no such fsync."""
    need_shim()
    if shutil.which("strace") is None:
        pytest.skip("strace not installed")
    from faultutil import run, shim_env
    from conftest import REPO
    prog = REPO / "tests" / "faults" / "progs" / "sweep_save.py"
    found = {}
    for label, extra in (("normal", {}), ("skip-dirfsync", {"ACKPT_TEST_SKIP_DIRFSYNC": "1"})):
        out = tmp_path / label / "ckpt"
        out.mkdir(parents=True)
        trace = tmp_path / label / "strace.txt"
        res = run(strace_argv(trace, [VENV_PY, prog, style, out, "1"],
                              syscalls="fsync,fdatasync,rename,renameat,renameat2,execve,clone,clone3,"
                                       "fork,vfork"),
                  shim_env(out, ACKPT_IO="pool", **extra), timeout=120)
        assert res.returncode == 0 and "OK" in res.stdout, res.describe()
        calls = parse_strace(trace)
        helpers = helper_pid_set(calls)
        assert helpers, "no helper in the trace"
        hcalls = [c for c in calls if c.pid in helpers and c.ret.strip().startswith("0")]
        final = "latest_checkpointed_iteration.txt" if style == "tracker" else ".metadata"
        commit = [i for i, c in enumerate(hcalls) if c.name.startswith("rename")
                  and c.args.rstrip().rstrip('"').endswith(final)]
        assert commit, "no commit rename by the helper: %s" % [(c.name, c.args) for c in hcalls]
        before = hcalls[:commit[-1]]
        dirs = {c.fd_path() for c in before if c.name == "fsync" and c.fd_path()
                and os.path.isdir(c.fd_path())}
        files = {c.fd_path() for c in before if c.name in SYNC_FAMILY and c.fd_path()
                 and not os.path.isdir(c.fd_path())}
        found[label] = (dirs, files)
        print(label, "dir fsyncs before the commit:", sorted(dirs))
    dirs, files = found["normal"]
    it = str(tmp_path / "normal" / "ckpt" / "iter_1")
    assert {it + "/a.bin", it + "/b.bin"} <= files, "data not fsynced before the commit: %s" % files
    assert {it, str(tmp_path / "normal" / "ckpt")} <= dirs, \
        "the data files' directory and its parent were not fsynced before the commit: %s" % dirs
    assert not found["skip-dirfsync"][0], \
        "negative control: ACKPT_TEST_SKIP_DIRFSYNC=1 still fsynced directories: %s" % found["skip-dirfsync"][0]


def test_rename_into_new_directory_makes_its_entry_durable(tmp_path):
    """A deferred rename into a directory the program has just made: after
    the rename the helper fsyncs the new name's directory, the old one's,
    and the new directory's parent (which holds the new directory's own
    entry)."""
    need_shim()
    if shutil.which("strace") is None:
        pytest.skip("strace not installed")
    from faultutil import run, shim_env
    out = tmp_path / "ckpt"
    (out / "a").mkdir(parents=True)
    prog = tmp_path / "mv.py"
    prog.write_text(
        "import os, sys\n"
        "out = sys.argv[1]\n"
        "fd = os.open(out + '/a/tmp.bin', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n"
        "os.write(fd, b'z' * (1 << 20))\n"
        "os.close(fd)\n"
        "os.makedirs(out + '/b/c')\n"
        "os.rename(out + '/a/tmp.bin', out + '/b/c/data.bin')\n"
        "print('OK', flush=True)\n")
    trace = tmp_path / "strace.txt"
    res = run(strace_argv(trace, [VENV_PY, prog, out],
                          syscalls="fsync,rename,renameat,renameat2,execve,clone,clone3,fork,vfork"),
              shim_env(out, ACKPT_TEST_DELAY_MS="200"), timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.describe()
    assert (out / "b" / "c" / "data.bin").read_bytes() == b"z" * (1 << 20)
    calls = parse_strace(trace)
    helpers = helper_pid_set(calls)
    hcalls = [c for c in calls if c.pid in helpers and c.ret.strip().startswith("0")]
    ren = [i for i, c in enumerate(hcalls) if c.name.startswith("rename") and "data.bin" in c.args]
    assert ren, "the rename was not deferred to the helper: %s" % [(c.name, c.args) for c in hcalls]
    after = {c.fd_path() for c in hcalls[ren[0]:] if c.name == "fsync"}
    print("fsyncs after the rename:", sorted(after))
    want = {str(out / "b" / "c"), str(out / "a"), str(out / "b")}
    assert want <= after, "missing directory fsyncs after the rename: %s" % sorted(want - after)
