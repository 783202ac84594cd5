"""What a program can observe under the shim (docs/DESIGN.md section 3), checked
with data deliberately kept in flight (ACKPT_TEST_DELAY_MS: the helper sleeps
that long before each write chunk of up to 16 MiB).
"""
import json
import re
import subprocess
import time

import pytest

from conftest import VENV_PY
from faultutil import (FPROGS, assert_same_trees, file_matches, need_shim, plain_env, prng,
                       py_prog, run, run_plain_and_shim, shim_env, wait_helpers)


@pytest.fixture(autouse=True)
def _shim_required():
    need_shim()


def test_sizes_and_read_after_write(tmp_path):
    """fstat/stat/getsize/SEEK_END/positions and read-back through several
    fds (pwrite inside and past EOF, O_APPEND, truncate, writev, buffered
    seek) match the program's model while writes are in flight, and the
    observations and files are identical to a plain run."""
    plain, shimmed, pst, sst, diffs = run_plain_and_shim(
        lambda out: py_prog("stat_model.py") + [out], tmp_path, shim_extra={"ACKPT_TEST_DELAY_MS": 50})
    assert_same_trees(diffs, shimmed)
    m = re.search(r"inflight=(\d+) checks=(\d+)", shimmed.stdout)
    assert m, shimmed.describe()
    assert int(m.group(1)) > 0, ("no size check ran while ops were pending: the test did not "
                                 "exercise in-flight data\n" + shimmed.describe())
    assert sst["active"] == 1 and sst["bytes_staged"] > 0, sst
    assert not shimmed.stderr.strip(), shimmed.describe()


def _rename_run(tmp_path, label, env_fn, mib, seed):
    out = tmp_path / label
    out.mkdir()
    r = run(py_prog("rename_observe.py") + [out, mib, seed], env_fn(out), timeout=60)
    assert r.returncode == 0, r.describe()
    return out, r, json.loads(r.stdout.strip().splitlines()[-1])


def test_deferred_rename(tmp_path):
    mib, seed = 48, 21
    data = prng(mib << 20, seed)
    # control: without the shim the observer sees the complete final file
    _, pr, pv = _rename_run(tmp_path, "plain", lambda out: plain_env(), mib, seed)
    assert pv["observer"] == {"final": mib << 20, "tmp": None} and pv["read_ok"], pr.describe()

    out, r, v = _rename_run(tmp_path, "shim", lambda out: shim_env(out, ACKPT_TEST_DELAY_MS=300),
                            mib, seed)
    print(json.dumps(v))
    obs = v["observer"]
    assert "error" not in obs, obs
    # inside the program the rename happened at once ...
    assert v["exists_final"] and not v["exists_tmp"], v
    assert v["read_ok"], "reading the renamed file back inside the program: %r" % v
    # ... outside, the final name never holds partial data ...
    assert obs["final"] in (None, mib << 20), \
        "a process outside ackpt saw a PARTIAL final file: %r" % obs
    # ... and with 3 x 300 ms of delayed 16 MiB chunks it cannot be there yet
    assert obs["final"] is None, \
        ("a process outside ackpt saw the final name %.3fs after the rename, before the data "
         "could be durable: the rename was not deferred (%r)" % (v["observer_seconds"], obs))
    why = file_matches(out / "ckpt.pt", data)
    assert why is None, why
    assert not (out / "ckpt.tmp").exists()


def test_no_idle_stall_after_fsync_close(build_c, tmp_path):
    """write -> fsync -> close, then (a) rename + stat of the new name,
    (b) exit.  Nothing is delayed, so each must finish in well under a
    second; a multi-second wait is the helper sleeping in its idle poll while
    a rename / sync-all op sits queued behind an op it completed inline."""
    out = tmp_path / "out"
    out.mkdir()
    prog = ("import os, sys, time\n"
            "d = sys.argv[1]\n"
            "fd = os.open(d + '/a.tmp', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n"
            "os.write(fd, b'x' * (1 << 20)); os.fsync(fd); os.close(fd)\n"
            "os.replace(d + '/a.tmp', d + '/a.pt')\n"
            "t = time.monotonic(); os.stat(d + '/a.pt')\n"
            "print('stat_after_rename %.3f' % (time.monotonic() - t))\n")
    r = run([VENV_PY] + ["-c", prog, out], shim_env(out))
    assert r.returncode == 0, r.describe()
    t_stat = float(r.stdout.split()[-1])

    errcheck = build_c(FPROGS / "errcheck.c")
    t0 = time.monotonic()
    r2 = run([errcheck, out / "b.bin", 8, 8192, "check", 0, 0], shim_env(out))
    t_exit = time.monotonic() - t0
    assert r2.returncode == 0, r2.describe()
    problems = []
    if t_stat > 1.5:
        problems.append("stat() of a just-renamed 1 MiB file took %.2fs" % t_stat)
    if t_exit > 1.5:
        problems.append("write 8 MiB + fsync + close + exit took %.2fs; stderr: %r" % (t_exit, r2.stderr))
    assert not problems, "; ".join(problems)


def test_exit_progress(tmp_path):
    """Exit waits for durability and says so after ~1 s (docs/DESIGN.md 3.6)."""
    out = tmp_path / "out"
    out.mkdir()
    mib, seed = 64, 4
    env = shim_env(out, staging="128M", ACKPT_TEST_DELAY_MS=700)
    prog = ("import random, sys\n"
            "with open(sys.argv[1] + '/big.pt', 'wb') as f:\n"
            "    f.write(random.Random(%d).randbytes(%d << 20))\n" % (seed, mib))
    t0 = time.monotonic()
    p = subprocess.Popen([VENV_PY] + ["-c", prog, str(out)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
    took = time.monotonic() - t0
    # checked the moment the program is gone, before the helper is waited for
    why = file_matches(out / "big.pt", prng(mib << 20, seed))
    so, se = p.communicate(timeout=60)
    se = se.decode(errors="replace")
    wait_helpers(env["ACKPT_TEST_MARK"])
    assert p.returncode == 0, se
    assert why is None, "the program exited before its data was durable: %s" % why
    assert "waiting for" in se and "MiB" in se, \
        "no progress line while exit waited %.1fs; stderr:\n%s" % (took, se)


def test_log_info_summary(build_c, tmp_path):
    """ACKPT_LOG=info: one summary line at exit with the file count and MiB staged."""
    mini = build_c(FPROGS / "mini.c")
    out = tmp_path / "out"
    out.mkdir()
    r = run([mini, out], shim_env(out, ACKPT_LOG="info", ACKPT_TEST_STATS=tmp_path / "st.json"))
    assert r.returncode == 0, r.describe()
    st = json.loads((tmp_path / "st.json").read_text())
    summary = [ln for ln in r.stderr_lines() if re.search(r"\bfiles?\b", ln) and "MiB" in ln]
    assert len(summary) == 1, "expected exactly one summary line mentioning files and MiB:\n" + r.stderr
    m = re.search(r"(\d+) files?, ([\d.]+) MiB staged", summary[0])
    assert m, summary[0]
    # mini opens 6 managed files (log.txt three times) and stages ~7 MiB
    assert int(m.group(1)) == st["files"] == 6, (summary[0], st)
    assert abs(float(m.group(2)) - st["bytes_staged"] / 1048576.0) < 0.06, (summary[0], st)
    print("stderr:\n" + r.stderr)


def test_fork(build_c, tmp_path):
    """Parent and two children (exit / _exit) write their own managed files;
    the parent reads the children's files back; identical to a plain run."""
    exe = build_c(FPROGS / "fork_writer.c")
    plain, shimmed, pst, sst, diffs = run_plain_and_shim(
        lambda out: [exe, out], tmp_path, shim_extra={"ACKPT_TEST_DELAY_MS": 100})
    assert_same_trees(diffs, shimmed)
    assert not [ln for ln in shimmed.stderr_lines() if "error" in ln or "warning" in ln], shimmed.describe()
