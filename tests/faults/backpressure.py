"""Scenarios 8 (back-pressure through slow storage) and 8b (real errors from a
FUSE file system), both over tests/faults/faultfs.c.

faultfs is a passthrough FUSE file system over a backing directory, compiled
here on the fly (cc + pkg-config fuse3), that throttles write bandwidth and
fails the N-th write / fsync(dir) / rename with a real errno (once or sticky).
It is driven through its control file MNT/.faultfs, which also reports how
many operations it saw and how many it failed ("hits"), so a fault is known
to have been hit from the file system's side, not guessed from the program.

8  back-pressure: a 4C checkpoint (64 MiB, big writes, one write larger than
   the arena, descending pwrites, small buffered writes, numpy.save) saved
   under ACKPT_STAGING=C (16 MiB) onto faultfs throttled to 16-32 MiB/s.
   Peak staging stays at or below C plus a small margin (measured inside the
   program as staged - written payload through ackpt_get_stats, and outside
   as RssShmem of trainer and helper from /proc/PID/status), every write call
   succeeds (blocks rather than fails), the save takes roughly
   (4C - C)/bandwidth at least, the bytes equal those of the same program
   run without the shim on a plain directory, metadata is committed and
   nothing is left behind.
8b real errors: EIO/ENOSPC/EACCES from faultfs on the N-th write / fsync /
   rename, once and sticky, N = 1, 2, ... until a save completes without the
   fault being hit (the SQLite-style loop of scenario 5, with the fault made
   by the file system instead of the helper's ACKPT_FAULT hook).  For every
   hit: the program is told (a call failed, or exit status 1 with an ackpt
   error line), no metadata of that save exists, the previous checkpoint is
   intact, no temporaries are left, and the next save without the fault
   succeeds.

Standalone: .venv/bin/python tests/faults/backpressure.py [--quick] [--only 8|8b] [--keep]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (HERE, PROGS, VENV_PY, Proc, Tally, ackpt_lines, compare_trees,  # noqa: E402
                    helper_pids, plain_env, program_told, shim_env, shm_leftovers, shm_snapshot,
                    wait_helpers_gone)
from sweep import committed, data_ok, save, temporaries  # noqa: E402

MiB = 1 << 20
FAULTFS_SRC = HERE / "faultfs.c"


# --------------------------------------------------------------------------
# faultfs: build, mount, control, unmount
# --------------------------------------------------------------------------

def build_faultfs(work):
    """(path of the faultfs binary, None) or (None, why it cannot be built/used)."""
    if not os.path.exists("/dev/fuse"):
        return None, "/dev/fuse is missing (no FUSE in this kernel/container)"
    if not shutil.which("pkg-config"):
        return None, "pkg-config is missing (apt-get install pkg-config libfuse3-dev fuse3)"
    r = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True)
    if r.returncode != 0:
        return None, "pkg-config fuse3 failed (apt-get install libfuse3-dev fuse3): %s" % r.stderr.strip()
    if not shutil.which("fusermount3") and os.geteuid() != 0:
        return None, "fusermount3 is missing and not root (apt-get install fuse3)"
    out = Path(work) / "faultfs"
    if out.exists():
        return out, None
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler"
    try:
        r = subprocess.run([cc, "-O2", "-Wall", "-o", str(out) + ".tmp", str(FAULTFS_SRC)] + r.stdout.split(),
                           capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None, "compiling faultfs.c took over 120 s"
    if r.returncode != 0:
        return None, "compiling faultfs.c failed: %s" % r.stderr.strip()[-2000:]
    os.rename(str(out) + ".tmp", out)
    return out, None


def _mounted(mnt):
    mnt = os.path.realpath(mnt)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(ln.split()[4] == mnt for ln in f)
    except OSError:
        return False


class FaultFS:
    """One faultfs mount of `backing` at `mnt` (a context manager: always unmounted)."""

    def __init__(self, binary, backing, mnt, throttle=0, fault=None, directio=False, trace=False):
        self.backing, self.mnt = Path(backing), Path(mnt)
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        o = "backing=%s" % self.backing
        if throttle:
            o += ",throttle=%d" % throttle
        if fault:
            o += ",fault=%s" % fault
        if directio:
            o += ",directio"
        if trace:
            o += ",trace"
        self.argv = [str(binary), "-f", "-s", "-o", o, str(self.mnt)]
        self.logf = None
        self.p = None

    def __enter__(self):
        self.logf = open(str(self.mnt) + ".log", "wb")
        self.p = subprocess.Popen(self.argv, env=plain_env(), stdin=subprocess.DEVNULL, stdout=self.logf,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while not _mounted(self.mnt):
            if self.p.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("faultfs did not mount %s (status %s): %s"
                                   % (self.mnt, self.p.returncode, self.log()))
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def log(self):
        try:
            return Path(str(self.mnt) + ".log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def ctl(self, line):
        with open(self.mnt / ".faultfs", "w") as f:
            f.write(line + "\n")

    def stats(self):
        with open(self.mnt / ".faultfs") as f:
            s = f.read()
        return {k: (int(v) if v.isdigit() else v) for k, v in (w.split("=", 1) for w in s.split())}

    def close(self):
        """Unmount (fusermount3 -u, else umount, else lazy umount) and reap the daemon."""
        if _mounted(self.mnt):
            for argv in (["fusermount3", "-u", str(self.mnt)], ["umount", str(self.mnt)],
                         ["umount", "-l", str(self.mnt)]):
                try:
                    subprocess.run(argv, capture_output=True, timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    continue
                if not _mounted(self.mnt):
                    break
        if self.p is not None and self.p.poll() is None:
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        if _mounted(self.mnt):   # the daemon is gone: a lazy unmount cannot block now
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, timeout=30)
        if self.logf:
            self.logf.close()
            self.logf = None


# --------------------------------------------------------------------------
# 8: back-pressure
# --------------------------------------------------------------------------

BP_TIMEOUT = 180


def _rss_shmem(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for ln in f:
                if ln.startswith("RssShmem:"):
                    return int(ln.split()[1]) * 1024
    except OSError:
        pass
    return None


def _memfd_size(pid):
    """Size of the staging memfd the helper holds on fd 4 (control block + arena)."""
    try:
        if "ackpt-staging" in os.readlink("/proc/%d/fd/4" % pid):
            return os.stat("/proc/%d/fd/4" % pid).st_size
    except OSError:
        pass
    return None


class ShmSampler(threading.Thread):
    """Samples, every 20 ms, the shared-memory RSS of the trainer and its helper."""

    def __init__(self, pid, mark):
        super().__init__(daemon=True)
        self.pid, self.mark = pid, mark
        self.helper = None
        self.peak_trainer = self.peak_helper = 0
        self.memfd = None
        self.samples = 0
        self.stop = threading.Event()

    def run(self):
        next_look = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if self.helper is None and now >= next_look:
                pids = helper_pids(self.mark)
                self.helper = pids[0] if pids else None
                next_look = now + 0.1
            a = _rss_shmem(self.pid)
            if a is not None:
                self.peak_trainer = max(self.peak_trainer, a)
            if self.helper is not None:
                b = _rss_shmem(self.helper)
                if b is not None:
                    self.peak_helper = max(self.peak_helper, b)
                m = _memfd_size(self.helper)
                if m is not None:
                    self.memfd = max(self.memfd or 0, m)
            self.samples += 1
            self.stop.wait(0.02)


def _bp_run(out, env, sample):
    """Run progs/bp_save.py; returns (rc, result dict or None, stderr, seconds, sampler or None)."""
    p = Proc([VENV_PY, PROGS / "bp_save.py", out, TOTAL_MIB], env)
    smp = None
    if sample:
        smp = ShmSampler(p.p.pid, env["ACKPT_TEST_MARK"])
        smp.start()
    rc = p.wait(BP_TIMEOUT)
    secs = time.monotonic() - p.t0
    if smp:
        smp.stop.set()
        smp.join()
    p.drain_pipes(10)
    res = None
    for ln in reversed(p.stdout.splitlines()):
        try:
            res = json.loads(ln)
            break
        except ValueError:
            continue
    return rc, res, p.stderr, secs, smp


TOTAL_MIB = 64
STAGING = 16 * MiB
MARGIN = 4 * MiB   # control block (~260 KiB), the per-uid registry (~150 KiB), slack


def scenario_backpressure(work, log, quick=False):
    t = Tally("8-back-pressure", "back-pressure: a 4C (64 MiB) save under ACKPT_STAGING=C (16 MiB) onto a "
              "FUSE filesystem throttled to 16-32 MiB/s")
    binary, why = build_faultfs(work)
    if not binary:
        t.skipped = why
        return t
    base = Path(work) / "s8"
    base.mkdir(parents=True, exist_ok=True)
    C = STAGING
    total = TOTAL_MIB * MiB
    # (bandwidth, extra environment of the shim run)
    configs = [(24 * MiB, {}), (16 * MiB, {}), (32 * MiB, {"ACKPT_DIRECT": "0"}),
               (24 * MiB, {"ACKPT_IO": "pool"}), (32 * MiB, {})]
    if quick:
        configs = configs[:2]
    ref = base / "ref"
    ref.mkdir()
    rc, res, se, ref_s, _ = _bp_run(ref, plain_env(), False)
    if rc != 0 or not res or not res.get("ok"):
        t.fail("reference run without the shim on a plain directory failed (rc %s, %s): %s" % (rc, res, se[-2000:]))
        return t
    t.notes.append("C = ACKPT_STAGING = %d MiB; checkpoint %d MiB in 6 files (4 MiB writes, one %d MiB write, "
                   "1 MiB descending pwrites, 1-9000 byte buffered writes, numpy.save, .metadata via rename, "
                   "tracker); reference run without the shim on a plain directory %.2f s"
                   % (C >> 20, TOTAL_MIB, (total // 4 + total // 16) >> 20, ref_s))
    before = shm_snapshot()
    with FaultFS(binary, base / "backing", base / "mnt") as fs:
        for i, (bw, extra) in enumerate(configs):
            fs.ctl("throttle %d" % bw)
            what = "trial %d (%d MiB/s%s)" % (i, bw >> 20, "".join(", %s=%s" % kv for kv in extra.items()))
            # the same program without the shim through the same throttled mount
            pout = base / "mnt" / ("plain-%d" % i)
            pout.mkdir()
            prc, pres, pse, plain_s, _ = _bp_run(pout, plain_env(), False)
            if prc != 0 or not pres or not pres.get("ok"):
                t.fail("%s: plain run through faultfs failed (rc %s): %s" % (what, prc, pse[-2000:]))
                continue
            d = compare_trees(ref, base / "backing" / ("plain-%d" % i))
            if d:
                t.fail("%s: faultfs itself changed the bytes (plain run): %s" % (what, d[:5]))
            shutil.rmtree(base / "backing" / ("plain-%d" % i), ignore_errors=True)
            # the shim run
            sout = base / "mnt" / ("shim-%d" % i)
            sout.mkdir()
            env = shim_env(sout, staging="%dM" % (C >> 20), **extra)
            fs.ctl("reset")
            rc, res, se, secs, smp = _bp_run(sout, env, True)
            st = fs.stats()
            t.trials += 1
            lines = ackpt_lines(se)
            if rc is None:
                t.hangs += 1
                t.fail("%s: hang (> %d s)" % (what, BP_TIMEOUT))
                continue
            if rc != 0 or not res or not res.get("ok"):
                t.fail("%s: save failed under back-pressure (rc %s, result %s): %s"
                       % (what, rc, res, lines[-5:]))
                continue
            if res.get("failed"):
                t.fail("%s: write calls failed: %s" % (what, res["failed"]))
            warn = [ln for ln in lines if "error" in ln or "warn" in ln]
            if warn:
                t.fail("%s: ackpt warned/errored: %s" % (what, warn[:5]))
            peak = res.get("peak_pending", 0)
            shm_peak = max(smp.peak_trainer, smp.peak_helper)
            expect_block = (total - C) / bw
            if res.get("staging_bytes") != C:
                t.fail("%s: staging arena is %s bytes, not %d" % (what, res.get("staging_bytes"), C))
            if peak > C:
                t.fail("%s: %d bytes staged but not written at once, above C = %d" % (what, peak, C))
            if peak < C // 2:
                t.fail("%s: peak staged-unwritten %d bytes never came near C = %d: back-pressure not exercised"
                       % (what, peak, C))
            if shm_peak > C + MARGIN:
                t.fail("%s: shared-memory RSS peaked at %d bytes (trainer %d, helper %d), above C + %d MiB"
                       % (what, shm_peak, smp.peak_trainer, smp.peak_helper, MARGIN >> 20))
            if smp.memfd is not None and smp.memfd > C + MARGIN:
                t.fail("%s: staging memfd is %d bytes" % (what, smp.memfd))
            if smp.helper is None:
                t.fail("%s: the helper was never seen (no shared-memory sample)" % what)
            if res["write_phase_s"] < 0.5 * expect_block:
                t.fail("%s: the write phase took %.2f s, far below (4C - C)/bandwidth = %.2f s: writes did "
                       "not block?" % (what, res["write_phase_s"], expect_block))
            if st["bytes"] < total:
                t.fail("%s: faultfs saw only %d bytes written" % (what, st["bytes"]))
            if not wait_helpers_gone(env["ACKPT_TEST_MARK"], 15):
                t.hangs += 1
                t.fail("%s: helper still alive 15 s after the program exited" % what)
            sback = base / "backing" / ("shim-%d" % i)
            diffs = compare_trees(ref, sback)
            if diffs:
                t.fail("%s: output differs from the run without the shim: %s" % (what, diffs[:5]))
                t.bytes_lost += sum(p.stat().st_size for p in ref.rglob("*") if p.is_file())
            if not ((sback / "iter_1" / ".metadata").exists()
                    and (sback / "latest_checkpointed_iteration.txt").exists()):
                t.fail("%s: metadata not committed" % what)
            if temporaries(sback):
                t.fail("%s: temporaries left: %s" % (what, temporaries(sback)))
            note = ("%s: %d write calls, all succeeded, longest %.2f s, stall %.2f s; peak staged-unwritten "
                    "%.1f MiB (%d samples), peak shm RSS trainer %.1f / helper %.1f MiB, memfd %.1f MiB; "
                    "write phase %.2f s (>= (4C-C)/bw = %.2f s expected), save + exit wait %.2f s vs "
                    "%.2f s without the shim through faultfs; helper flags %s"
                    % (what, res["calls"], res["max_call_s"], res.get("stall_s", 0), peak / MiB, res["samples"],
                       smp.peak_trainer / MiB, smp.peak_helper / MiB, (smp.memfd or 0) / MiB,
                       res["write_phase_s"], expect_block, secs, plain_s, res.get("helper_flags")))
            t.notes.append(note)
            log("  s8 " + note)
            if not t.failures:
                shutil.rmtree(sback, ignore_errors=True)
    left = shm_leftovers(before)
    if left:
        t.fail("shared memory left behind: %s" % left)
    return t


# --------------------------------------------------------------------------
# 8b: real errors from faultfs, swept over N
# --------------------------------------------------------------------------

SWEEP_TIMEOUT = 60
NMAX = 40


# variants: how the file system or the helper behaves besides the fault
VARIANTS = {
    "": ({}, []),                                   # defaults: io_uring, O_DIRECT
    "slowfsync": ({}, ["fsyncdelay 20"]),           # every fsync takes 20 ms: fixes the op order
    "nolink": ({}, ["nolink 1"]),                   # link(2) fails with EPERM (no hard links)
    "pool": ({"ACKPT_IO": "pool"}, []),             # the pwrite thread pool instead of io_uring
    "nodirect": ({"ACKPT_DIRECT": "0"}, []),        # buffered writes only
}
UNDO = {"slowfsync": ["fsyncdelay 0"], "nolink": ["nolink 0"]}


def _sweep_cases(quick):
    styles, ops, errs, modes = ("tracker", "dcp"), ("write", "fsync", "rename"), ("EIO", "ENOSPC", "EACCES"), \
        ("once", "sticky")
    if quick:
        # every op, errno, mode, style and variant appears, in 10 sweeps
        return [("dcp", "write", "EIO", "once", ""), ("tracker", "write", "ENOSPC", "sticky", ""),
                ("tracker", "fsync", "EIO", "sticky", ""), ("dcp", "fsync", "EACCES", "once", ""),
                ("dcp", "rename", "ENOSPC", "once", ""), ("tracker", "rename", "EACCES", "sticky", ""),
                ("tracker", "fsync", "EIO", "once", "slowfsync"), ("tracker", "fsync", "EIO", "once", "nolink"),
                ("dcp", "write", "EIO", "sticky", "pool"), ("tracker", "write", "ENOSPC", "once", "nodirect")]
    cases = [(s, o, e, m, "") for s in styles for o in ops for e in errs for m in modes]
    cases += [(s, "fsync", "EIO", m, "slowfsync") for s in styles for m in modes]
    cases += [("tracker", o, "EIO", m, "nolink") for o in ("fsync", "rename") for m in modes]
    cases += [(s, o, "EIO", "once", "nodirect") for s in styles for o in ("write", "fsync")]
    cases += [(s, o, e, m, "pool") for s in styles for o in ops for e in errs for m in modes]
    return cases


def scenario_fusefaults(work, log, quick=False):
    t = Tally("8b-fuse-faults", "real EIO/ENOSPC/EACCES from a FUSE filesystem on the N-th write / fsync / "
              "rename, once and sticky, N = 1.. until the save completes")
    binary, why = build_faultfs(work)
    if not binary:
        t.skipped = why
        return t
    budget = 75 if quick else 330
    t_end = time.monotonic() + budget
    base = Path(work) / "s8b"
    base.mkdir(parents=True, exist_ok=True)
    backing = base / "backing"
    templates = {}
    for style in ("tracker", "dcp"):
        tp = base / ("template-" + style)
        tp.mkdir()
        rc, so, se, _ = save(style, tp, 1, plain_env())
        if rc != 0:
            t.fail("template save failed: %s" % se)
            return t
        templates[style] = tp
    cases = _sweep_cases(quick)
    counters = {"runs": 0, "sweeps": 0}
    per_case = {}
    before = shm_snapshot()
    with FaultFS(binary, backing, base / "mnt") as fs:
        for style, op, err, mode, variant in cases:
            if time.monotonic() > t_end:
                break
            extra, setup = VARIANTS[variant]
            for line in setup:
                fs.ctl(line)
            sweep_loop(t, fs, templates, backing, base, style, op, err, mode, variant, extra, t_end, budget,
                       per_case, counters, log)
            for line in UNDO.get(variant, []):
                fs.ctl(line)
    done = sum(1 for v in per_case.values() if v is not None)
    left = shm_leftovers(before)
    if left:
        t.fail("shared memory left behind: %s" % left)
    t.notes.append("%d saves with a fault armed (+ a follow-up save after each hit), %d of %d sweeps completed "
                   "within the %d s budget; %s"
                   % (counters["runs"], done, len(cases), budget,
                      "quick subset: 10 sweeps covering every op, errno, mode, style and variant" if quick
                      else "tracker/dcp x write,fsync,rename x EIO,ENOSPC,EACCES x once/sticky, then variants "
                      "slowfsync (fsync 20 ms), nolink (no hard links), nodirect (ACKPT_DIRECT=0) on subsets, "
                      "then ACKPT_IO=pool over everything"))
    clean = {}
    for (style, op, err, mode, variant), v in sorted(per_case.items()):
        if v:
            clean.setdefault((style, variant or "default"), set()).add(v[1])
    for (style, variant), counts in sorted(clean.items()):
        t.notes.append("%s, %s: a clean save through faultfs makes %s" % (style, variant, "; ".join(sorted(counts))))
    t.notes.append("faultfs counts requests as the FUSE kernel module sends them: one write per helper write "
                   "(256 KiB here), 'fsync' counts file fsyncs and directory fsyncs; N ran from 1 until a save "
                   "did not hit the fault (at most %d)" % NMAX)
    return t


def sweep_loop(t, fs, templates, backing, base, style, op, err, mode, variant, extra, t_end, budget, per_case,
               counters, log):
    """N = 1, 2, ... for one case; per_case[case] = (last N hit, op counts of the clean run) or None."""
    case = (style, op, err, mode, variant)
    per_case[case] = None
    counters["sweeps"] += 1
    n = 1
    while n <= NMAX:
        if time.monotonic() > t_end:
            t.notes.append("time budget (%d s) ran out inside %s/%s/%s/%s/%s at N=%d"
                           % (budget, style, op, err, mode, variant or "default", n))
            break
        counters["runs"] += 1
        name = "%s-%s-%s-%s-%s-%d" % (style, op, err, mode, variant or "default", n)
        shutil.copytree(templates[style], backing / name, symlinks=True)
        out = base / "mnt" / name
        spec = "%s %d %s %s" % (op, n, err, mode)
        what = "faultfs %s [%s%s]" % (spec, style, ", " + variant if variant else "")
        fs.ctl("fault " + spec)
        env = shim_env(out, staging="16M", **extra)
        rc, so, se, secs = save(style, out, 2, env)
        st = fs.stats()
        fs.ctl("reset")
        wait_helpers_gone(env["ACKPT_TEST_MARK"], 10)
        back = backing / name
        if rc is None:
            t.trials += 1
            t.injected += st["hits"] > 0
            t.hangs += 1
            t.fail("%s: hang (> %d s)" % (what, SWEEP_TIMEOUT))
            break
        lines = ackpt_lines(se)
        err_lines = [ln for ln in lines if "error" in ln]
        told = program_told(rc, so, lines)
        if st["hits"] == 0:
            # the sweep ends here: this run must be a complete, committed save
            if not (rc == 0 and "OK" in so and committed(style, back, 2) and data_ok(back, 2)
                    and not err_lines):
                t.fail("%s: fault not hit but save 2 incomplete or failed (rc %s, %r)\n%s"
                       % (what, rc, so, se))
                t.bytes_lost += 2 << 20
            per_case[case] = (n - 1, "%d writes, %d fsyncs, %d renames"
                              % (st["writes"], st["fsyncs"], st["renames"]))
            if not temporaries(back):
                shutil.rmtree(back, ignore_errors=True)
            break
        t.trials += 1
        t.injected += 1
        if told:
            t.surfaced += 1
        else:
            t.fail("%s: faultfs failed %d call(s) but the program was not told (rc %s, stdout %r, "
                   "stderr %r)" % (what, st["hits"], rc, so, se))
        if committed(style, back, 2):
            t.commits_after_error += 1
            t.fail("%s: metadata of save 2 committed although the save failed (rc %s, stdout %r, "
                   "stderr %r)" % (what, rc, so.strip(), lines))
            if not data_ok(back, 2):
                t.torn += 1
                t.fail("%s: save 2 committed with torn data files" % what)
        tracker = back / "latest_checkpointed_iteration.txt"
        if style == "tracker" and (not tracker.exists() or tracker.read_text() not in ("1", "2")):
            t.torn += 1
            t.fail("%s: the tracker holds %r (the previous pointer '1' is gone)"
                   % (what, tracker.read_text() if tracker.exists() else None))
        if not (data_ok(back, 1) and (style == "tracker" or committed(style, back, 1))):
            t.torn += 1
            t.fail("%s: previous checkpoint damaged" % what)
        left = temporaries(back)
        if left:
            t.fail("%s: temporaries left behind: %s" % (what, left))
        env3 = shim_env(out, staging="16M", **extra)
        rc2, so2, se2, _ = save(style, out, 3, env3)
        wait_helpers_gone(env3["ACKPT_TEST_MARK"], 10)
        if rc2 is None:
            t.hangs += 1
            t.fail("%s: follow-up save hung" % what)
        elif not (rc2 == 0 and committed(style, back, 3) and data_ok(back, 3)):
            t.fail("%s: follow-up save without the fault failed (rc %s): %s" % (what, rc2, se2))
        log("  s8b %-44s hits=%d rc=%s told=%s %s" % (what, st["hits"], rc, told,
                                                     so.strip().splitlines()[-1:] or ""))
        shutil.rmtree(back, ignore_errors=True)
        n += 1
    else:
        t.fail("%s/%s/%s/%s/%s: still hitting the fault at N=%d" % (style, op, err, mode, variant, NMAX))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="8,8b")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ackpt-bp-", dir="/tmp"))
    os.chmod(work, 0o755)
    print("backpressure.py: %s, work dir %s" % ("quick" if a.quick else "full", work), flush=True)

    def log(msg):
        if a.verbose:
            print(msg, flush=True)

    tallies = []
    ok = True
    try:
        for num, fn in (("8", scenario_backpressure), ("8b", scenario_fusefaults)):
            if num not in a.only.split(","):
                continue
            t0 = time.monotonic()
            t = fn(work, log, quick=a.quick)
            t.seconds = time.monotonic() - t0
            tallies.append(t)
            res = "SKIP (%s)" % t.skipped if t.skipped else ("ok" if t.ok() else "FAIL")
            print("scenario %-16s %s  trials %d, injected %d, surfaced %d, commits after error %d, torn %d, "
                  "bytes lost %d, hangs %d, %.0f s" % (t.name, res, t.trials, t.injected, t.surfaced,
                                                      t.commits_after_error, t.torn, t.bytes_lost, t.hangs,
                                                      t.seconds), flush=True)
            for n in t.notes:
                print("    " + n)
            for f in t.failures[:20]:
                print("    FAIL " + f[:3000])
            ok = ok and (t.ok() or bool(t.skipped))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print("work dir kept: %s" % work)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
