"""Scenarios 6 (real ENOSPC), 9 (bad input against a run without the shim) and 10 (security)."""
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

from common import (PROGS, REGISTRY, VENV_PY, Proc, Tally, ackpt_lines, compare_trees, helper_pids,
                    plain_env, program_told, run, shim_env, wait_helpers_gone)
from sweep import committed, data_ok, save, temporaries

TIMEOUT = 120


# --------------------------------------------------------------------------
# 6: real ENOSPC on a small tmpfs
# --------------------------------------------------------------------------

def _mount_tmpfs(mnt, size):
    mnt.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    return r.returncode == 0, r.stderr.strip()


def _umount(mnt):
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def scenario_enospc(work, log, trials_per_case=1):
    t = Tally("6-real-enospc", "real ENOSPC: a 3 MiB tmpfs holding checkpoint 1 (2 MiB); "
              "save 2 does not fit")
    mnt = work / "s6-tmpfs"
    ok, why = _mount_tmpfs(mnt, "3m")
    if not ok:
        t.skipped = "cannot mount a tmpfs (needs CAP_SYS_ADMIN): %s" % why
        return t
    try:
        # control: without the shim, save 2 fails with ENOSPC
        d = mnt / "control"
        d.mkdir()
        rc0, so0, _, _ = save("tracker", d, 1, plain_env())
        rc, so, se, _ = save("tracker", d, 2, plain_env())
        if not (rc0 == 0 and rc == 3 and "ENOSPC" in so):
            t.fail("control without the shim did not hit ENOSPC (rc %s, %r)" % (rc, so))
            return t
        shutil.rmtree(d)
        cases = [(style, delay, retry) for style in ("tracker", "dcp") for delay in (0, 50)
                 for retry in (0, 1)]
        for style, delay, retry in cases * trials_per_case:
            d = mnt / "ckpt"
            d.mkdir()
            rc1, _, se1, _ = save(style, d, 1, plain_env())
            env = shim_env(d, staging="16M", ACKPT_TEST_DELAY_MS=delay or None,
                           SWEEP_RETRY_FSYNC=retry or None)
            rc, so, se, secs = save(style, d, 2, env)
            what = "ENOSPC %s delay=%d retry-fsync=%d" % (style, delay, retry)
            t.trials += 1
            t.injected += 1
            if rc is None:
                t.hangs += 1
                t.fail("%s: hang" % what)
            lines = ackpt_lines(se)
            told = program_told(rc, so, lines)
            t.surfaced += told
            if not told:
                t.fail("%s: ENOSPC not reported (rc %s, %r, %r)" % (what, rc, so, se))
            if committed(style, d, 2):
                t.commits_after_error += 1
                t.fail("%s: save 2 committed after ENOSPC (rc %s, %r, %r)" % (what, rc, so, lines))
                if not data_ok(d, 2):
                    t.torn += 1
            if not data_ok(d, 1) or (style == "tracker" and (d / "latest_checkpointed_iteration.txt")
                                     .read_text() not in ("1", "2")) \
                    or (style == "dcp" and not committed(style, d, 1)):
                t.torn += 1
                tr = d / "latest_checkpointed_iteration.txt"
                t.fail("%s: previous checkpoint damaged (tracker %r, iter_1 data %s)"
                       % (what, tr.read_text() if tr.exists() else None, "ok" if data_ok(d, 1) else "bad"))
            if temporaries(d):
                t.fail("%s: temporaries left: %s" % (what, temporaries(d)))
            log("  s6 %-40s rc=%s %s" % (what, rc, so.strip().splitlines()[-1:]))
            shutil.rmtree(d)
        t.notes.append("cases: tracker/DCP commit x helper delay 0/50 ms x program retries a failed "
                       "fsync (fsyncgate pattern: the metadata must still not appear)")
    finally:
        _umount(mnt)
    return t


# --------------------------------------------------------------------------
# 9: bad input, compared with a run without the shim
# --------------------------------------------------------------------------

CASES = ["append", "overlap-sparse", "zero-byte", "opened-twice", "dup", "unlink-inflight",
         "rename-inflight", "odd-names", "symlinked-metadata", "nofollow"]

MALFORMED = [("ACKPT_PATHS", "relative/path"), ("ACKPT_METADATA", ":::"), ("ACKPT_STAGING", "12Q"),
             ("ACKPT_LOG", "loud"), ("ACKPT_COMMIT", "maybe"), ("ACKPT_COORD", "no-port"),
             ("ACKPT_BARRIER_TIMEOUT", "-3"), ("ACKPT_DISABLE", "yes"), ("ACKPT_DIRECT", "2"),
             ("ACKPT_IO", "aio"), ("ACKPT_FAULT", "op=bogus"), ("ACKPT_TEST_DELAY_MS", "abc"),
             ("ACKPT_TEST_SKIP_DIRFSYNC", "yes"),
("ACKPT_HELPER", "/nonexistent/ackpt-helper")]


def _pair(t, work, label, case, shim_extra=None, symlink_root=False, staging="64M", timeout=TIMEOUT):
    outs = {}
    results = {}
    for mode in ("plain", "shim"):
        base = work / "s9" / label / mode
        real = base / "out"
        real.mkdir(parents=True)
        out = real
        if symlink_root and mode == "shim":
            out = base / "link"
            os.symlink(real, out)
        env = plain_env() if mode == "plain" else shim_env(out, staging=staging, **(shim_extra or {}))
        rc, so, se, secs = run([VENV_PY, PROGS / "badinput.py", case, out], env, timeout)
        if mode == "shim" and env.get("ACKPT_TEST_MARK") and not wait_helpers_gone(env["ACKPT_TEST_MARK"], 60):
            t.hangs += 1
            t.fail("%s: helper still running 60 s after the program" % label)
        if rc is None:
            t.hangs += 1
            t.fail("%s [%s]: hang" % (label, mode))
        results[mode] = (rc, so, se)
        outs[mode] = real
    t.trials += 1
    if results["plain"][0] != results["shim"][0]:
        t.fail("%s: exit status %s plain, %s under the shim: %s" % (label, results["plain"][0],
                                                                    results["shim"][0], results["shim"][2][-1500:]))
    diffs = compare_trees(outs["plain"], outs["shim"])
    if diffs:
        t.fail("%s: output differs from the run without the shim: %s" % (label, diffs[:5]))
    return results["shim"]


def scenario_badinput(work, log, full=False):
    t = Tally("9-bad-input", "unusual writes, names and settings, compared byte for byte with a run "
              "without the shim")
    cases = CASES + (["huge-write"] if full else [])
    for case in cases:
        staging = "1G" if case == "huge-write" else "64M"
        rc, so, se = _pair(t, work, case, case, staging=staging, timeout=600 if case == "huge-write" else TIMEOUT)
        extra = [ln for ln in ackpt_lines(se)]
        if extra:
            t.fail("%s: unexpected ackpt lines: %s" % (case, extra))
        t.classes.append(case)
        log("  s9 %-22s rc=%s" % (case, rc))
    _pair(t, work, "symlinked-root", "plain-write", symlink_root=True)
    t.classes.append("symlinked-root")
    for var, val in MALFORMED:
        label = "malformed-%s" % var
        rc, so, se = _pair(t, work, label, "plain-write", shim_extra={var: val})
        lines = [ln for ln in se.splitlines() if ln.strip()]
        if len(lines) != 1 or var not in lines[0]:
            t.fail("%s=%r: expected one stderr line naming %s, got %r" % (var, val, var, lines))
        log("  s9 %s=%r -> %r" % (var, val, lines))
    t.classes.append("malformed ACKPT_* (%d variables)" % len(MALFORMED))
    if not full:
        t.notes.append("a single 4 GiB write runs in full mode only")
    return t


# --------------------------------------------------------------------------
# 10: security
# --------------------------------------------------------------------------

NOBODY = 65534

HOLD = r"""
import os, sys
fd = os.open(os.path.join(sys.argv[1], "model.pt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, b"x" * 4096)
print("ready", flush=True)
sys.stdin.readline()
os.close(fd)
"""


def _memfds(pid):
    found = []
    try:
        for n in os.listdir("/proc/%d/fd" % pid):
            try:
                if "ackpt" in os.readlink("/proc/%d/fd/%s" % (pid, n)) and "memfd" in \
                        os.readlink("/proc/%d/fd/%s" % (pid, n)):
                    found.append(int(n))
            except OSError:
                pass
    except OSError:
        pass
    return found


def scenario_security(work, log):
    t = Tally("10-security", "staging and registry not readable by other users; temporaries with "
              "O_EXCL, the program's mode and umask; no symlink followed that plain would not")
    base = work / "s10"
    base.mkdir(parents=True)
    # (a) staging memfd of trainer and helper: another uid cannot open it through /proc
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        t.notes.append("staging check skipped: needs root and setpriv")
    else:
        out = base / "hold"
        out.mkdir()
        env = shim_env(out)
        p = Proc([VENV_PY, "-c", HOLD, out], env, stdin=subprocess.PIPE)
        if p.wait_line(lambda ln: ln == "ready", 60) is None:
            t.fail("staging check: program never got ready: %s" % p.stderr)
        else:
            hp = helper_pids(env["ACKPT_TEST_MARK"])
            for who, pid in [("trainer", p.p.pid)] + [("helper", h) for h in hp]:
                fds = _memfds(pid)
                if not fds:
                    t.fail("no ackpt memfd found in %s %d" % (who, pid))
                for fd in fds:
                    t.trials += 1
                    r = subprocess.run(["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY,
                                        "--clear-groups", "head", "-c1", "/proc/%d/fd/%d" % (pid, fd)],
                                       capture_output=True)
                    if r.returncode == 0:
                        t.fail("uid %d read the staging memfd of the %s via /proc/%d/fd/%d"
                               % (NOBODY, who, pid, fd))
                    log("  s10 memfd %s pid %d fd %d: other uid -> %s" % (who, pid, fd,
                                                                         r.stderr.decode().strip()[:80]))
            reg = Path("/dev/shm") / REGISTRY
            t.trials += 1
            if not reg.exists():
                t.fail("registry %s not found" % reg)
            else:
                mode = stat.S_IMODE(reg.stat().st_mode)
                log("  s10 registry %s mode %o" % (reg, mode))
                if mode & 0o077:
                    t.fail("registry %s has mode %o (group/other access)" % (reg, mode))
        p.p.stdin.write(b"go\n")
        p.p.stdin.flush()
        if p.wait(60) is None:
            t.hangs += 1
        wait_helpers_gone(env["ACKPT_TEST_MARK"], 60)
        p.drain_pipes(10)
    # (b) metadata temporaries: the final mode under several umasks matches a plain run
    for um in (0o022, 0o027, 0o077):
        modes = {}
        for mode in ("plain", "shim"):
            d = base / ("umask-%o-%s" % (um, mode))
            d.mkdir()
            env = plain_env() if mode == "plain" else shim_env(d)
            rc, so, se, _ = run([VENV_PY, PROGS / "sweep_save.py", "tracker", d, 1], env, TIMEOUT,
                                preexec_fn=lambda: os.umask(um))
            if rc is None:
                t.hangs += 1
            modes[mode] = {str(q.relative_to(d)): stat.S_IMODE(q.stat().st_mode) for q in d.rglob("*")}
        t.trials += 1
        log("  s10 umask %03o: plain %s / shim %s" % (um, modes["plain"], modes["shim"]))
        if modes["plain"] != modes["shim"]:
            t.fail("umask %03o: modes differ: plain %s, shim %s" % (um, modes["plain"], modes["shim"]))
    # an existing tracker keeps its mode (as O_TRUNC would), and an existing temporary name is not reused
    modes = {}
    for mode in ("plain", "shim"):
        d = base / ("existing-%s" % mode)
        d.mkdir()
        tr = d / "latest_checkpointed_iteration.txt"
        tr.write_text("0")
        os.chmod(tr, 0o600)
        env = plain_env() if mode == "plain" else shim_env(d)
        rc, so, se, _ = run([VENV_PY, PROGS / "sweep_save.py", "tracker", d, 1], env, TIMEOUT)
        modes[mode] = (rc, stat.S_IMODE(tr.stat().st_mode), tr.read_text())
    t.trials += 1
    if modes["plain"] != modes["shim"]:
        t.fail("existing 0600 tracker: plain %s, shim %s" % (modes["plain"], modes["shim"]))
    t.notes.append("O_EXCL of temporaries is checked indirectly (modes and umask match, no temporary "
                   "left); the O_NOFOLLOW and symlinked-tracker cases run in scenario 9")
    return t
