"""Scenario 4: power-loss snapshots.

Power loss without device-mapper: ext4 lives on a loop device whose image file lives on a
reflink-capable XFS (itself on a second loop device over a sparse file in the work dir).
`cp --reflink=always` of the ext4 image is an atomic, instant copy of exactly the writes
ext4 has sent to its device so far (FICLONE flushes and locks the image file), i.e. what
storage would hold after a power loss at that moment.  ext4 is mounted with commit=60, so
its journal never commits on its own timer during a run: what a snapshot holds is what
somebody made durable with an fsync.

progs/powerloss_save.py saves checkpoints in a loop under the shim (tracker style: a
Megatron tracker file; dcp style: a rename of .metadata.tmp to .metadata), paced by the
harness; after each save it learns that the commit is durable (ACKPT_COMMIT=sync, or
ackpt_wait()) and prints "acked i".  Snapshots are taken
  - right after each "acked i" (before the next save starts),
  - when the data of a save has been staged (its metadata not yet written),
  - at random moments from a background thread (mostly while a save is in flight),
  - once after the last run.
Each snapshot is then attached, mounted (ext4 replays its journal) and checked:
  - every checkpoint a loader would trust (the tracker names iteration k / iter_k/.metadata
    exists) has complete, byte-identical data (else: torn);
  - every checkpoint acknowledged before the snapshot was taken is committed with complete
    data; for a tracker, the tracker names it or a later iteration (else: an acknowledged
    commit lost, counted in bytes lost);
  - hidden temporaries (".ackpt." in a name) are counted, not failed (the loader ignores
    them, and a power loss may leave them behind).
Negative control: ACKPT_TEST_SKIP_DIRFSYNC=1 makes the helper skip every directory fsync;
the same procedure must then see violations (the commit's rename sits in an uncommitted
ext4 transaction when the snapshot is taken).  The scenario fails if it does not.

Run standalone (as root): .venv/bin/python tests/faults/powerloss.py [--quick] [--negative-only]
"""
import argparse
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (LIB, PROGS, VENV_PY, Proc, Tally, ackpt_lines, build_problem_or_none,  # noqa: E402
                    shim_env, wait_helpers_gone)
from sweep import expected  # noqa: E402

SAVE_TIMEOUT = 60          # one save (data + commit + acknowledgement); overstaying it is a hang
XFS_SIZE = 2 << 30
EXT4_SIZE = 320 << 20
CKPT_BYTES = 2 << 20       # a.bin + b.bin
KNOB = "ACKPT_TEST_SKIP_DIRFSYNC"
TRACKER = "latest_checkpointed_iteration.txt"
MAX_FAIL_MSGS = 12


def _sh(argv, timeout=120):
    try:
        r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "timed out: %s" % " ".join(map(str, argv))
    except OSError as e:
        return 127, str(e)
    return r.returncode, (r.stdout + r.stderr).strip()


def _need(rc_out, what):
    rc, out = rc_out
    if rc != 0:
        raise StackError("%s failed (%s): %s" % (what, rc, out))
    return out


class StackError(Exception):
    pass


def _attach(img):
    out = _need(_sh(["losetup", "--find", "--show", img]), "losetup %s" % img)
    return out.splitlines()[-1].strip()


def _detach(dev):
    for _ in range(50):
        if _sh(["losetup", "-d", dev])[0] == 0:
            return True
        time.sleep(0.1)
    return False


def _umount(mnt):
    for _ in range(50):
        if _sh(["umount", mnt])[0] == 0:
            return True
        time.sleep(0.1)
    return _sh(["umount", "-l", mnt])[0] == 0


class Stack:
    """XFS (reflink) on a loop device over a sparse file; ext4 on a loop device over a file in it."""

    def __init__(self, base):
        self.base = base
        self.xfs_img = base / "xfs.img"
        self.xfs = base / "xfs"
        self.ext4 = base / "ext4"
        self.img = self.xfs / "ext4.img"
        self.snapmnt = base / "snap"
        self.mounts = []   # mounted points, in mount order
        self.loops = []    # attached loop devices, in attach order

    def up(self):
        for d in (self.xfs, self.ext4, self.snapmnt):
            d.mkdir(parents=True, exist_ok=True)
        with open(self.xfs_img, "wb") as f:
            f.truncate(XFS_SIZE)
        _need(_sh(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", self.xfs_img]), "mkfs.xfs")
        dev = _attach(self.xfs_img)
        self.loops.append(dev)
        _need(_sh(["mount", "-t", "xfs", dev, self.xfs]), "mount xfs")
        self.mounts.append(self.xfs)
        with open(self.img, "wb") as f:
            f.truncate(EXT4_SIZE)
        # no lazy init: nothing but the test writes to the device while it runs
        _need(_sh(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                   self.img]), "mkfs.ext4")
        dev = _attach(self.img)
        self.loops.append(dev)
        # commit=60: the journal does not commit on its own timer; only fsyncs make things durable
        _need(_sh(["mount", "-t", "ext4", "-o", "commit=60", dev, self.ext4]), "mount ext4")
        self.mounts.append(self.ext4)

    def umount_ext4(self):
        if self.ext4 in self.mounts:
            self.mounts.remove(self.ext4)
            _umount(self.ext4)

    def down(self):
        problems = []
        for m in reversed(self.mounts):
            if not _umount(m):
                problems.append("umount %s" % m)
        self.mounts = []
        for dev in reversed(self.loops):
            if not _detach(dev):
                problems.append("losetup -d %s" % dev)
        self.loops = []
        return problems


def _needs_recovery(img):
    """ext4 superblock (offset 1024): s_feature_incompat at +0x60, RECOVER = 0x4."""
    with open(img, "rb") as f:
        f.seek(1024 + 0x60)
        return bool(struct.unpack("<I", f.read(4))[0] & 0x4)


class Snapper:
    """Takes reflink snapshots of the ext4 image; records what was acknowledged before each."""

    def __init__(self, stack, cap):
        self.stack = stack
        self.cap = cap
        self.lock = threading.Lock()
        self.records = []
        self.acked = {}      # run name -> set of acknowledged iterations
        self.styles = {}     # run name -> style
        self.inflight = False
        self.seconds = 0.0
        self.errors = []

    def take(self, kind, just_acked=None, force=False):
        with self.lock:
            if not force and len(self.records) >= self.cap:
                return None
            n = len(self.records)
            path = self.stack.xfs / ("snap%04d" % n)
            rec = dict(n=n, kind=kind, path=path, just_acked=just_acked, inflight=self.inflight,
                       acked={k: set(v) for k, v in self.acked.items()}, styles=dict(self.styles))
            t0 = time.monotonic()
            rc, out = _sh(["cp", "--reflink=always", self.stack.img, path])
            self.seconds += time.monotonic() - t0
            if rc != 0:
                self.errors.append("cp --reflink failed (%s): %s" % (rc, out))
                return None
            self.records.append(rec)
            return rec


class Stats:
    def __init__(self):
        self.saves = 0
        self.acked = 0
        self.hangs = 0
        self.run_failures = []
        self.snapshots = 0
        self.kinds = {}
        self.inflight_random = 0
        self.replays = 0
        self.with_meta = 0
        self.verified = 0          # loader-trusted checkpoints byte-compared
        self.torn = []
        self.lost = []             # (snapshot, run, iteration, why)
        self.ack_snaps = 0
        self.ack_missing = 0       # post-ack snapshots missing the checkpoint just acknowledged
        self.ack_by_style = {}     # style -> [post-ack snapshots, of which missing the checkpoint]
        self.temporaries = 0
        self.snaps_with_temps = 0
        self.temp_names = []
        self.temp_prev = 0         # the helper's ".<name>.ackpt.prev.<pid>" backup links
        self.clean_ok = None
        self.clean_temps = []
        self.fsck_unclean = []
        self.check_errors = []
        self.seconds = 0.0

    def violations(self):
        return len(self.torn) + len(self.lost)


_EXPECTED = {}


def _expected(it, name):
    key = (it, name)
    if key not in _EXPECTED:
        _EXPECTED[key] = expected(it, name)
    return _EXPECTED[key]


def _data_ok(d, it):
    for name in ("a.bin", "b.bin"):
        p = d / ("iter_%d" % it) / name
        try:
            if p.read_bytes() != _expected(it, name):
                return False
        except OSError:
            return False
    return True


def _check_tree(mnt, rec, st):
    """Check one mounted snapshot; appends to st.torn / st.lost."""
    label = "snapshot %d (%s)" % (rec["n"], rec["kind"])
    meta_seen = False
    for run, style in sorted(rec["styles"].items()):
        d = mnt / run
        acked = rec["acked"].get(run, set())
        if not d.is_dir():
            for it in sorted(acked):
                st.lost.append((label, run, it, "run directory missing"))
            continue
        if style == "tracker":
            tr = d / TRACKER
            k = None
            if tr.exists():
                meta_seen = True
                raw = tr.read_bytes()
                try:
                    k = int(raw.decode())
                except ValueError:
                    st.torn.append((label, run, "tracker holds %r" % raw[:40]))
                if k is not None:
                    st.verified += 1
                    if not _data_ok(d, k):
                        st.torn.append((label, run, "tracker names iteration %d whose data is "
                                        "incomplete or wrong" % k))
            if acked and (k is None or k < max(acked)):
                st.lost.append((label, run, max(acked), "tracker %s although iteration %d was "
                                "acknowledged" % ("missing" if not tr.exists() else "names %s" % k,
                                                  max(acked))))
            for it in sorted(acked):
                if not _data_ok(d, it):
                    st.lost.append((label, run, it, "data of acknowledged iteration incomplete"))
        else:
            present = set()
            for sub in d.iterdir():
                if sub.name.startswith("iter_") and (sub / ".metadata").exists():
                    it = int(sub.name[5:])
                    present.add(it)
                    meta_seen = True
                    st.verified += 1
                    if (sub / ".metadata").read_bytes() != b"metadata of %d\n" % it:
                        st.torn.append((label, run, "iter_%d/.metadata holds %r"
                                        % (it, (sub / ".metadata").read_bytes()[:40])))
                    elif not _data_ok(d, it):
                        st.torn.append((label, run, "iter_%d/.metadata exists but its data is "
                                        "incomplete or wrong" % it))
            for it in sorted(acked):
                if it not in present:
                    st.lost.append((label, run, it, "iter_%d/.metadata missing although acknowledged"
                                    % it))
                elif not _data_ok(d, it):
                    st.lost.append((label, run, it, "data of acknowledged iteration incomplete"))
    if meta_seen:
        st.with_meta += 1
    temps = [p for p in mnt.rglob("*") if ".ackpt." in p.name]
    st.temporaries += len(temps)
    st.temp_prev += sum(".ackpt.prev." in p.name for p in temps)
    st.snaps_with_temps += bool(temps)
    if temps:
        st.temp_names.append("%s: %s" % (label, [str(p.relative_to(mnt)) for p in temps]))
    if rec["just_acked"]:
        run, it = rec["just_acked"]
        st.ack_snaps += 1
        by = st.ack_by_style.setdefault(rec["styles"][run], [0, 0])
        by[0] += 1
        if any(x[0] == label and x[1] == run and x[2] == it for x in st.lost):
            st.ack_missing += 1
            by[1] += 1


def check_snapshot(stack, rec, st, fsck, count=True):
    img = rec["path"]
    if count:
        st.snapshots += 1
        st.kinds[rec["kind"]] = st.kinds.get(rec["kind"], 0) + 1
        if rec["kind"] == "random" and rec["inflight"]:
            st.inflight_random += 1
        if _needs_recovery(img):
            st.replays += 1
    dev = None
    mounted = False
    try:
        dev = _attach(img)
        rc, out = _sh(["mount", "-t", "ext4", dev, stack.snapmnt])
        if rc != 0:
            st.check_errors.append("snapshot %d: mount failed: %s" % (rec["n"], out))
            return
        mounted = True
        _check_tree(stack.snapmnt, rec, st)
    except StackError as e:
        st.check_errors.append("snapshot %d: %s" % (rec["n"], e))
    finally:
        if mounted and not _umount(stack.snapmnt):
            st.check_errors.append("snapshot %d: umount failed" % rec["n"])
        if dev:
            if fsck:
                rc, out = _sh(["e2fsck", "-fn", dev])
                if rc != 0:
                    st.fsck_unclean.append("snapshot %d: e2fsck -fn status %d: %s"
                                           % (rec["n"], rc, out[-300:]))
            if not _detach(dev):
                st.check_errors.append("snapshot %d: losetup -d %s failed" % (rec["n"], dev))
        try:
            img.unlink()
        except OSError:
            pass


def _random_snapper(snap, stop, rng, lo, hi):
    while not stop.wait(rng.uniform(lo, hi)):
        snap.take("random")


def run_config(stack, snap, st, cfg, knob, rng, log):
    """One program run: cfg = (style, ack, delay_ms, direct, saves)."""
    style, ack, delay, direct, n = cfg
    name = "%s-%s-d%d-%s" % (style, ack, delay, "direct" if direct else "buffered")
    out = stack.ext4 / name
    out.mkdir()
    env = shim_env(out, staging="16M", ACKPT_COMMIT="sync" if ack == "sync" else None,
                   ACKPT_TEST_DELAY_MS=delay or None, ACKPT_DIRECT=None if direct else "0",
                   **{KNOB: "1" if knob else None})
    with snap.lock:
        snap.acked[name] = set()
        snap.styles[name] = style
    p = Proc([VENV_PY, PROGS / "powerloss_save.py", style, out, ack, n], env, stdin=subprocess.PIPE)
    stop = threading.Event()
    th = threading.Thread(target=_random_snapper, args=(snap, stop, random.Random(rng.random()),
                                                         0.01, 0.05 + delay / 250.0), daemon=True)
    th.start()
    t0 = time.monotonic()
    try:
        for it in range(1, n + 1):
            snap.inflight = True
            st.saves += 1
            try:
                p.p.stdin.write(b"go\n")
                p.p.stdin.flush()
            except OSError:
                st.run_failures.append("%s: program gone before save %d: %s" % (name, it, p.stderr[-1500:]))
                break
            ln = p.wait_line(lambda s: s.startswith(("staged ", "acked ", "FAIL")), SAVE_TIMEOUT)
            if ln == "staged %d" % it:
                snap.take("staged")
                ln = p.wait_line(lambda s: s.startswith(("acked ", "FAIL")), SAVE_TIMEOUT)
            if ln is None and p.p.poll() is None:
                st.hangs += 1
                st.run_failures.append("%s: save %d not acknowledged within %d s (hang)"
                                       % (name, it, SAVE_TIMEOUT))
                break
            if ln != "acked %d" % it:
                st.run_failures.append("%s: save %d: %r instead of an acknowledgement (status %s): %s"
                                       % (name, it, ln, p.p.poll(), p.stderr[-1500:]))
                break
            with snap.lock:
                snap.acked[name].add(it)
                snap.inflight = False
            st.acked += 1
            snap.take("ack", just_acked=(name, it), force=True)
        try:
            p.p.stdin.write(b"quit\n")
            p.p.stdin.flush()
        except OSError:
            pass
        rc = p.wait(SAVE_TIMEOUT)
        if rc is None:
            st.hangs += 1
            st.run_failures.append("%s: program did not exit within %d s" % (name, SAVE_TIMEOUT))
        elif rc != 0:
            st.run_failures.append("%s: exit status %d: %s" % (name, rc, p.stderr[-1500:]))
        extra = [ln for ln in ackpt_lines(p.stderr) if KNOB not in ln]
        if extra:
            st.run_failures.append("%s: unexpected ackpt lines: %s" % (name, extra[:5]))
    finally:
        stop.set()
        th.join(30)
        snap.inflight = False
        if p.p.poll() is None:
            p.killpg()
            p.p.wait()
        if not wait_helpers_gone(env["ACKPT_TEST_MARK"], 60):
            st.hangs += 1
            st.run_failures.append("%s: helper still running 60 s after the program" % name)
        p.drain_pipes(10)
    log("  s4 %-28s %d saves acknowledged in %.1f s, %d snapshots so far%s"
        % (name, len(snap.acked[name]), time.monotonic() - t0, len(snap.records),
           " [%s=1]" % KNOB if knob else ""))


def campaign(base, configs, knob, seed, cap, log, fsck=True):
    """Set up the stack, run the configs, snapshot, check every snapshot, tear down.
    Returns (Stats, reason or "") -- reason non-empty when the stack could not be built."""
    st = Stats()
    t0 = time.monotonic()
    rng = random.Random(seed)
    stack = Stack(base)
    try:
        try:
            stack.up()
        except StackError as e:
            return st, str(e)
        snap = Snapper(stack, cap)
        for cfg in configs:
            run_config(stack, snap, st, cfg, knob, rng, log)
        snap.take("final", force=True)
        st.snap_seconds = snap.seconds
        st.check_errors.extend(snap.errors)
        stack.umount_ext4()
        for rec in snap.records:
            check_snapshot(stack, rec, st, fsck)
        # after a clean unmount: everything acknowledged is there and nothing hidden is left
        clean = dict(n=len(snap.records), kind="clean", path=stack.img, just_acked=None, inflight=False,
                     acked={k: set(v) for k, v in snap.acked.items()}, styles=dict(snap.styles))
        before = (len(st.torn), len(st.lost), len(st.temp_names))
        check_snapshot(stack, clean, st, fsck, count=False)
        st.clean_ok = (len(st.torn), len(st.lost)) == before[:2]
        st.clean_temps = st.temp_names[before[2]:]
    finally:
        problems = stack.down()
        if problems:
            st.check_errors.append("cleanup: %s" % problems)
        shutil.rmtree(base, ignore_errors=True)
    st.seconds = time.monotonic() - t0
    return st, ""


def configs_for(quick, negative=False):
    """(style, acknowledgement, helper delay ms per write, helper O_DIRECT, saves)"""
    cfgs = [("tracker", "sync", 0, 1), ("tracker", "wait", 20, 0), ("dcp", "sync", 20, 1), ("dcp", "wait", 0, 0)]
    if negative:
        n = 2 if quick else 3
    else:
        n = 2 if quick else 13
    return [(s, a, d, o, n) for s, a, d, o in cfgs]


def _can_run():
    if os.geteuid() != 0:
        return "needs root (loop devices and mounts)"
    for tool in ("losetup", "mkfs.xfs", "mkfs.ext4", "e2fsck", "mount", "umount", "cp"):
        if shutil.which(tool) is None:
            return "%s not found (apt-get install xfsprogs e2fsprogs)" % tool
    return ""


def _knob_built():
    """The shim validates the knob and hands it to the helper."""
    try:
        return KNOB.encode() in Path(LIB).read_bytes()
    except OSError:
        return False


def _fmt_lost(x):
    return "%s: %s iteration %d: %s" % x


def scenario_powerloss(work: Path, log, quick: bool = False, negative_only: bool = False,
                       seed=None) -> Tally:
    t = Tally("4-power-loss", "power-loss snapshots: ext4 (commit=60) on a loop device over reflink "
              "XFS, cp --reflink snapshots after each acknowledged commit and at random moments, "
              "journal replay, tracker and DCP-style commits; negative control %s=1" % KNOB)
    why = _can_run()
    if why:
        t.skipped = why
        return t
    seed = int(time.time()) if seed is None else seed
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)

    if not negative_only:
        base = Path(tempfile.mkdtemp(prefix="s4-main-", dir=work))
        st, why = campaign(base, configs_for(quick), False, seed, 80 if quick else 320, log)
        if why:
            t.skipped = "cannot build the loop/XFS/ext4 stack: %s" % why
            return t
        t.trials = st.saves
        t.injected = st.snapshots
        t.surfaced = st.snapshots   # a power loss needs no reporting
        t.torn = len(st.torn)
        t.bytes_lost = len(st.lost) * CKPT_BYTES
        t.hangs = st.hangs
        for x in st.torn[:MAX_FAIL_MSGS]:
            t.fail("%s: %s: %s" % x)
        for x in st.lost[:MAX_FAIL_MSGS]:
            t.fail("acknowledged commit lost: " + _fmt_lost(x))
        if st.violations() > 2 * MAX_FAIL_MSGS:
            t.fail("... %d torn, %d acknowledged-and-lost in all" % (len(st.torn), len(st.lost)))
        for m in st.run_failures + st.check_errors:
            t.fail(m)
        if st.acked != st.saves:
            t.fail("%d of %d saves acknowledged" % (st.acked, st.saves))
        if st.clean_ok is False:
            t.fail("after a clean unmount the live filesystem lacks acknowledged checkpoints or holds "
                   "torn ones (see above)")
        if st.clean_temps:
            t.fail("hidden temporaries left behind after the programs exited and a clean unmount: %s"
                   % st.clean_temps)
        if st.kinds.get("ack", 0) != st.acked:
            t.fail("%d post-ack snapshots for %d acknowledged saves" % (st.kinds.get("ack", 0), st.acked))
        t.notes.append("%d saves (tracker/DCP x ACKPT_COMMIT=sync/ackpt_wait, helper delay 0/20 ms per "
                       "write, helper O_DIRECT on/off), %d snapshots (%d post-ack, %d at data staged, %d random of which %d "
                       "with a save in flight, %d final); %d needed a journal replay; %d held "
                       "committed metadata; %d loader-trusted checkpoints byte-compared; %d post-ack "
                       "snapshots missing the acknowledged checkpoint; %d hidden temporaries in %d "
                       "snapshots, %d of them the helper's .ackpt.prev. backup link of the previous "
                       "metadata (ignored by loaders); %d snapshots not fsck-clean after replay; "
                       "%.0f s (%.1f s in cp --reflink)"
                       % (st.saves, st.snapshots, st.kinds.get("ack", 0), st.kinds.get("staged", 0),
                          st.kinds.get("random", 0), st.inflight_random, st.kinds.get("final", 0),
                          st.replays, st.with_meta, st.verified, st.ack_missing, st.temporaries,
                          st.snaps_with_temps, st.temp_prev, len(st.fsck_unclean), st.seconds,
                          getattr(st, "snap_seconds", 0.0)))
        if st.fsck_unclean:
            t.notes.append("not fsck-clean (an ext4/snapshot-model matter, not counted): %s"
                           % st.fsck_unclean[:3])
        for x in st.temp_names[:6]:
            log("  s4 hidden temporaries in %s" % x)
        log("  s4 normal run: %s" % t.notes[-1])

    # negative control: the helper skips every directory fsync; the procedure must notice
    if not _knob_built():
        t.fail("negative control impossible: %s has no %s knob (rebuild with meson compile -C build)"
               % (LIB, KNOB))
        return t
    base = Path(tempfile.mkdtemp(prefix="s4-neg-", dir=work))
    nst, why = campaign(base, configs_for(quick, negative=True), True, seed + 1, 40, log, fsck=False)
    if why:
        t.fail("negative control: cannot build the stack: %s" % why)
        return t
    caught = nst.violations() > 0
    t.notes.append("negative control (%s=1): %d of %d acknowledged commits missing from the post-ack "
                   "snapshots (%s); %d violations over %d snapshots (%d acknowledged-and-lost, %d torn): %s"
                   % (KNOB, nst.ack_missing, nst.ack_snaps,
                      ", ".join("%s %d/%d" % (k, v[1], v[0]) for k, v in sorted(nst.ack_by_style.items())),
                      nst.violations(), nst.snapshots, len(nst.lost), len(nst.torn),
                      "caught" if caught else "NOT caught"))
    log("  s4 %s" % t.notes[-1])
    for x in nst.lost[:4]:
        log("  s4 negative control: " + _fmt_lost(x))
    if nst.run_failures or nst.check_errors:
        t.fail("negative control run problems: %s" % (nst.run_failures + nst.check_errors)[:5])
    if not caught:
        t.fail("negative control NOT caught: with %s=1 no snapshot showed a lost acknowledged commit or "
               "torn data, so this procedure cannot see a missing directory fsync" % KNOB)
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--negative-only", action="store_true")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args()
    problem = build_problem_or_none()
    if problem:
        print("powerloss: %s" % problem, file=sys.stderr)
        return 2

    def log(msg):
        if not a.quiet:
            print(msg, flush=True)

    # an interrupted run still unmounts and detaches everything (finally blocks)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="ackpt-powerloss-", dir="/tmp"))
    t0 = time.monotonic()
    try:
        t = scenario_powerloss(work, log, quick=a.quick, negative_only=a.negative_only, seed=a.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t.seconds = time.monotonic() - t0
    print("scenario %s %s  trials %d, injected %d, surfaced %d, torn %d, bytes lost %d, hangs %d, %.0fs%s"
          % (t.name, "PASS" if t.ok() else ("SKIP" if t.skipped else "FAIL"), t.trials, t.injected,
             t.surfaced, t.torn, t.bytes_lost, t.hangs, t.seconds,
             (" (%s)" % t.skipped) if t.skipped else ""))
    for n in t.notes:
        print("  note: %s" % n)
    for f in t.failures:
        print("  failure: %s" % f)
    if a.negative_only:
        return 0 if not t.failures else 1
    return 0 if t.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
