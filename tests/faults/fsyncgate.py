"""Scenario 6b: real writeback EIO, as in fsyncgate.

ext4 on a loop device whose backing file (a sparse 512 MiB image) sits on a
small tmpfs.  The filesystem's own metadata blocks are preallocated in the
image, checkpoint 1 is saved and made durable, then the tmpfs is filled.
The next save's writes land in the page cache (or go O_DIRECT to the loop
device); writeback into the image hits ENOSPC on the tmpfs, which the loop
device returns as a block I/O error, so the kernel fails the write/fsync
(EIO or ENOSPC) and drops the data.

Control without the shim: write succeeds, fsync fails, a second fsync on the
same descriptor returns 0 although the data is gone (fsyncgate), and a
program that retries the fsync commits a checkpoint whose data was lost.

Under the shim, for tracker/DCP commit x helper delay 0/50 ms x program
retries a failed fsync (x O_DIRECT on/off in full mode): the error reaches
the program, no metadata of save 2 exists (live after dropping caches, and
again after umount, a fresh losetup, e2fsck and mount), checkpoint 1 is
byte-identical, no temporaries are left, and the helper never commits after
a failed fsync (its debug log, and strace of the helper's syscalls with the
pwrite pool).

Needs root (mount, losetup); skipped with the reason otherwise.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (PROGS, VENV_PY, Tally, ackpt_lines, plain_env, program_told, run, shim_env,  # noqa: E402
                    wait_helpers_gone)
from sweep import committed, data_ok, expected, save  # noqa: E402

TMPFS_SIZE = "48m"
IMG_SIZE = "512M"
CMD_TIMEOUT = 60

# The control program: write 1 MiB, fsync (must fail), fsync again on the same
# descriptor (fsyncgate: returns 0), close.  Prints one line per call.
CONTROL = r"""
import errno, os, sys
def res(fn, *a):
    try:
        fn(*a)
        return "0"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
print("write", res(os.write, fd, bytes(range(256)) * 4096), flush=True)
print("fsync1", res(os.fsync, fd), flush=True)
print("fsync2", res(os.fsync, fd), flush=True)
print("close", res(os.close, fd), flush=True)
"""


def sh(argv, timeout=CMD_TIMEOUT, check=False):
    """Run a system command; returns (rc or None on timeout, combined output)."""
    try:
        r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timeout after %ds" % timeout
    except OSError as e:
        return 127, str(e)
    out = (r.stdout + r.stderr).strip()
    if check and r.returncode != 0:
        raise RigError("%s: status %s: %s" % (" ".join(map(str, argv)), r.returncode, out))
    return r.returncode, out


class RigError(Exception):
    pass


_TS = re.compile(r"^\[\s*(\d+\.\d+)\]")


def _kmsg():
    rc, out = sh(["dmesg"], timeout=20)
    if rc != 0:
        return None
    res = []
    for ln in out.splitlines():
        m = _TS.match(ln)
        if m:
            res.append((float(m.group(1)), ln))
    return res


def _kmsg_mark():
    """Timestamp of the last kernel log line (None when the log cannot be read)."""
    k = _kmsg()
    if k is None:
        return None
    return k[-1][0] if k else 0.0


def _kmsg_since(mark):
    if mark is None:
        return []
    return [ln for ts, ln in (_kmsg() or []) if ts > mark]


def _drop_caches():
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _mount_opts(mnt):
    try:
        with open("/proc/mounts") as f:
            for ln in f:
                p = ln.split()
                if len(p) > 3 and p[1] == str(mnt):
                    return p[3].split(",")
    except OSError:
        pass
    return None


class Rig:
    """tmpfs -> sparse image -> loop device -> ext4, all under `base`."""

    def __init__(self, base):
        self.base = base
        self.tm = base / "tmpfs"
        self.mnt = base / "ext4"
        self.img = self.tm / "img"
        self.filler = self.tm / "filler"
        self.loop = None
        self.tm_mounted = False
        self.ext_mounted = False

    def setup(self):
        self.tm.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        sh(["mount", "-t", "tmpfs", "-o", "size=%s" % TMPFS_SIZE, "tmpfs", self.tm], check=True)
        self.tm_mounted = True
        sh(["truncate", "-s", IMG_SIZE, self.img], check=True)
        sh(["mkfs.ext4", "-q", "-F", "-b", "4096", "-N", "256", "-J", "size=4",
            "-E", "lazy_itable_init=0,lazy_journal_init=0", self.img], check=True)
        self._prealloc_metadata()
        self.attach()
        self.mount()

    def _prealloc_metadata(self):
        """Back every block mkfs marked in use (superblocks, bitmaps, inode tables,
        journal) with tmpfs pages, so only new data and directory blocks can fail."""
        rc, out = sh(["dumpe2fs", self.img], check=True)
        total = int(re.search(r"^Block count:\s+(\d+)", out, re.M).group(1))
        bs = int(re.search(r"^Block size:\s+(\d+)", out, re.M).group(1))
        free = []
        for m in re.finditer(r"^\s+Free blocks: (.*)$", out, re.M):
            for part in m.group(1).split(","):
                part = part.strip()
                if not part:
                    continue
                a, _, b = part.partition("-")
                free.append((int(a), int(b or a)))
        free.sort()
        used, cur = [], 0
        for a, b in free:
            if a > cur:
                used.append((cur, a - 1))
            cur = max(cur, b + 1)
        if cur < total:
            used.append((cur, total - 1))
        for a, b in used:
            sh(["fallocate", "-o", a * bs, "-l", (b - a + 1) * bs, self.img], check=True)

    def attach(self):
        rc, out = sh(["losetup", "--find", "--show", self.img], check=True)
        self.loop = out.splitlines()[-1].strip()

    def detach(self):
        if self.loop:
            sh(["losetup", "-d", self.loop])
            self.loop = None

    def mount(self):
        sh(["mount", "-t", "ext4", "-o", "errors=continue", self.loop, self.mnt], check=True)
        self.ext_mounted = True

    def umount(self):
        if not self.ext_mounted:
            return None
        rc, out = sh(["umount", self.mnt], timeout=120)
        if rc != 0:
            sh(["umount", "-l", self.mnt])
        self.ext_mounted = False
        return rc, out

    def fill(self):
        """Fill the tmpfs to the last page; returns the bytes written."""
        n = 0
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (1 << 20, 4096):
                buf = b"\xff" * chunk
                while True:
                    try:
                        n += os.write(fd, buf)
                    except OSError:
                        break
        finally:
            os.close(fd)
        return n

    def unfill(self):
        try:
            self.filler.unlink()
        except FileNotFoundError:
            pass

    def tmpfs_free(self):
        st = os.statvfs(self.tm)
        return st.f_bavail * st.f_frsize

    def fresh_remount(self):
        """umount the ext4 (the tmpfs still full: what is in the image is what was
        durable), detach the loop device, make room, attach a new loop device,
        e2fsck -fy (journal replay), mount.  Returns (umount rc, fsck rc, fsck output)."""
        urc = self.umount()
        self.detach()
        self.unfill()
        self.attach()
        frc, fout = sh(["e2fsck", "-fy", self.loop], timeout=120)
        self.mount()
        return urc, frc, fout

    def teardown(self):
        if self.ext_mounted:
            self.umount()
        self.detach()
        if self.tm_mounted:
            if sh(["umount", self.tm])[0] != 0:
                sh(["umount", "-l", self.tm])
            self.tm_mounted = False
        shutil.rmtree(self.base, ignore_errors=True)


def _kernel_error_lines(lines, loop):
    dev = os.path.basename(loop or "loop?")
    return [ln for ln in lines if dev in ln and re.search(
        r"I/O error|error|critical space allocation|Aborting journal|read-only", ln, re.I)]


def _bytes_bad(out, it):
    bad = 0
    for n in ("a.bin", "b.bin"):
        p = out / ("iter_%d" % it) / n
        want = expected(it, n)
        try:
            got = p.read_bytes()
        except OSError:
            bad += len(want)
            continue
        bad += sum(1 for x, y in zip(got, want) if x != y) + abs(len(want) - len(got))
    return bad


def _committed(style, d, it, where, unreadable):
    """sweep.committed, but an unreadable directory (a lost directory block fails its
    checksum: EBADMSG) is recorded and counts as not committed: no loader can see it."""
    try:
        return committed(style, d, it)
    except OSError as e:
        unreadable.append("%s %s: %s" % (where, os.path.relpath(e.filename or "?", d), os.strerror(e.errno)))
        return False


def _temporaries(d, where, unreadable):
    found = []

    def onerror(e):
        unreadable.append("%s %s: %s" % (where, os.path.relpath(e.filename or "?", d), os.strerror(e.errno)))
    for root, dirs, files in os.walk(d, onerror=onerror):
        found += [os.path.relpath(os.path.join(root, n), d) for n in dirs + files if ".ackpt." in n]
    return sorted(found)


def _previous_ok(style, d):
    tr = d / "latest_checkpointed_iteration.txt"
    try:
        if style == "tracker":
            return tr.read_text() == "1" and data_ok(d, 1)
        return committed(style, d, 1) and data_ok(d, 1)
    except OSError:
        return False


_ST_CALL = re.compile(r"^(\d+)\s+(fsync|fdatasync|pwrite64|pwritev|pwritev2|rename|renameat|renameat2)"
                      r"\((.*?)(?:\) += (-?\d+)(?: (\w+))?.*| <unfinished \.\.\.>)$")
_ST_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>.*?\) += (-?\d+)(?: (\w+))?.*$")
_ST_PATHS = re.compile(r"<([^>]*)>|\"([^\"]*)\"")


def _strace_calls(path):
    """[(call, [paths], result, errno name)] in order of completion, from strace -f -y output."""
    calls, pending = [], {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return calls
    for ln in text.splitlines():
        m = _ST_CALL.match(ln)
        if m:
            pid, call, args, rc, en = m.groups()
            paths = [x or y for x, y in _ST_PATHS.findall(args)]
            if rc is None:
                pending[pid] = (call, paths)
            else:
                calls.append((call, paths, int(rc), en))
            continue
        m = _ST_RESUMED.match(ln)
        if m and m.group(1) in pending:
            call, paths = pending.pop(m.group(1))
            calls.append((call, paths, int(m.group(3)), m.group(4)))
    return calls


def _strace_verdict(path, metadata_names=("latest_checkpointed_iteration.txt", ".metadata")):
    """(failed fsyncs and pwrites, successful fsyncs of a file whose fsync had failed,
    successful renames onto a metadata name after a failure)."""
    failed, retried_ok, commits = [], [], []
    bad = set()
    for call, paths, rc, en in _strace_calls(path):
        if call.startswith("pwrite"):
            if rc < 0 and paths:
                failed.append("%s %s %s" % (call, os.path.basename(paths[0]), en))
        elif call in ("fsync", "fdatasync") and paths:
            if rc < 0:
                failed.append("%s %s %s" % (call, os.path.basename(paths[0]), en))
                bad.add(paths[0])
            elif paths[0] in bad:
                retried_ok.append("%s %s = 0" % (call, os.path.basename(paths[0])))
        elif call.startswith("rename") and rc == 0 and failed and paths \
                and os.path.basename(paths[-1]) in metadata_names:
            commits.append("%s -> %s" % (os.path.basename(paths[0]), os.path.basename(paths[-1])))
    return failed, retried_ok, commits


def _control(t, work, log):
    """Without the shim: the kernel accepts the write, fails the fsync, then
    reports success to a second fsync; a retrying program commits lost data."""
    rig = Rig(work / "ctl")
    try:
        rig.setup()
        d = rig.mnt / "ckpt"
        d.mkdir()
        rc1, so1, se1, _ = save("tracker", d, 1, plain_env())
        if rc1 != 0:
            raise RigError("plain save 1 failed: %s %s" % (so1, se1))
        os.sync()
        rig.fill()
        prog = work / "ctl-prog.py"
        prog.write_text(CONTROL)
        rc, so, se, _ = run([VENV_PY, prog, rig.mnt / "probe.bin"], plain_env(), CMD_TIMEOUT)
        res = dict(ln.split(None, 1) for ln in so.strip().splitlines() if " " in ln)
        log("  s6b control (no shim): %s" % res)
        if res.get("write") != "0" or res.get("fsync1") in (None, "0"):
            t.fail("control without the shim: expected write 0 then a failed fsync, got %r (rc %s, %s)"
                   % (res, rc, se.strip()[-500:]))
            return False
        t.notes.append("control without the shim: write returned 0, fsync returned %s, a second fsync on the "
                       "same fd returned %s%s" % (res["fsync1"], res["fsync2"],
                                                   " (fsyncgate: the error is reported once, the data is gone)"
                                                   if res["fsync2"] == "0" else ""))
        # the hazard the shim must not reproduce: retry the failed fsync, trust it, commit
        rc2, so2, se2, _ = save("tracker", d, 2, plain_env(SWEEP_RETRY_FSYNC="1"))
        # the space problem was transient: room comes back, the tracker reaches the disk, the
        # data whose writeback failed does not come back
        rig.unfill()
        urc, frc, _ = rig.fresh_remount()
        d = rig.mnt / "ckpt"
        tr = d / "latest_checkpointed_iteration.txt"
        pointer = tr.read_text() if tr.exists() else None
        lost = _bytes_bad(d, 2)
        t.notes.append("control without the shim, program retries the failed fsync: %s, exit %s; after "
                       "remount the tracker says %r%s" % (
                           " ".join(ln for ln in so2.split() if ln in ("RETRIED", "FIRST_ERROR", "OK")) or so2.strip(),
                           rc2, pointer,
                           "; %d bytes of checkpoint 2's 2 MiB are lost (the program exited 0 believing "
                           "checkpoint 2 saved)" % lost))
        log("  s6b control (no shim, retry): rc=%s %r tracker=%r lost=%d" % (rc2, so2.strip(), pointer, lost))
        return True
    finally:
        rig.teardown()


def _case(t, work, idx, case, log, stats):
    style, delay, retry, direct, pause, use_strace, settle = case
    what = "%s delay=%d retry-fsync=%d direct=%d%s%s%s" % (style, delay, retry, direct,
                                                           " pause" if pause else "",
                                                           " strace/pool" if use_strace else "",
                                                           "" if settle else " meta-pending")
    rig = Rig(work / ("c%d" % idx))
    try:
        rig.setup()
        d = rig.mnt / "ckpt"
        d.mkdir()
        rc1, so1, se1, _ = save(style, d, 1, plain_env())
        if rc1 != 0:
            raise RigError("plain save 1 failed: %s %s" % (so1, se1))
        os.sync()
        if settle:
            # umount + mount: checkpoint 1's metadata is written in place and the journal
            # emptied, so only blocks new to save 2 can fail
            rig.umount()
            rig.mount()
            d = rig.mnt / "ckpt"
        rig.fill()
        if rig.tmpfs_free() > 64 << 10:
            raise RigError("tmpfs not full after filling (%d bytes free)" % rig.tmpfs_free())
        mark = _kmsg_mark()
        # with a pause, the program fsyncs each data file again after 0.5 s, when the helper
        # has met the error, so an fsync returns it and SWEEP_RETRY_FSYNC retries that fsync
        env = shim_env(d, staging="16M", ACKPT_LOG="debug", ACKPT_TEST_DELAY_MS=delay or None,
                       SWEEP_RETRY_FSYNC=retry or None, ACKPT_DIRECT=None if direct else "0",
                       ACKPT_IO="pool" if use_strace else None, SWEEP_PAUSE="0.5" if pause else None)
        st_path = work / ("c%d.strace" % idx)
        prog = PROGS / "sweep_save.py"
        argv = [VENV_PY, prog, style, d, 2]
        if use_strace:
            # strace follows the helper (posix_spawn + double fork); the pwrite pool makes
            # every fsync a visible system call
            argv = ["strace", "-f", "-y", "-qq", "-o", st_path, "-e",
                    "trace=fsync,fdatasync,pwrite64,pwritev,pwritev2,rename,renameat,renameat2"] + argv
        rc, so, se, secs = run(argv, env, CMD_TIMEOUT)
        gone = wait_helpers_gone(env["ACKPT_TEST_MARK"], 30)
        t.trials += 1
        if rc is None or not gone:
            t.hangs += 1
            t.fail("%s: %s" % (what, "hang (> %ds)" % CMD_TIMEOUT if rc is None else
                               "helper still running 30 s after the program"))
        lines = ackpt_lines(se)
        err_lines = [ln for ln in lines if ": error: " in ln]
        told = program_told(rc, so, lines, mark=": error: ")
        helper_commits = [ln for ln in lines if "committed" in ln]
        helper_fails = [ln for ln in lines if "failed:" in ln]
        ro = "ro" in (_mount_opts(rig.mnt) or [])
        dev = os.path.basename(rig.loop)
        if any("Aborting journal on device %s" % dev in ln for ln in _kmsg_since(mark)):
            stats["journal_abort_save"] += 1

        # live checks, after dropping the page cache
        dropped = _drop_caches()
        unreadable = []
        live_committed = _committed(style, d, 2, "live", unreadable)
        live_prev = _previous_ok(style, d)
        live_temps = _temporaries(d, "live", unreadable)
        kern = _kernel_error_lines(_kmsg_since(mark), rig.loop)

        # again after umount, a fresh loop device, e2fsck and mount
        urc, frc, fout = rig.fresh_remount()
        d = rig.mnt / "ckpt"
        re_committed = _committed(style, d, 2, "after remount", unreadable)
        re_prev = _previous_ok(style, d)
        re_temps = _temporaries(d, "after remount", unreadable)
        lost2 = _bytes_bad(d, 2)
        lost1 = _bytes_bad(d, 1)
        klines = _kmsg_since(mark)
        kern = _kernel_error_lines(klines, rig.loop) or kern
        if unreadable:
            stats["unreadable"].append("%s: %s" % (what, "; ".join(unreadable[:2])))
        if any("Aborting journal on device %s" % dev in ln for ln in klines):
            stats["journal_abort"] += 1

        # room is back: the next save under the shim must commit
        rc3, so3, se3, _ = save(style, d, 3, shim_env(d, staging="16M"))
        if rc3 is None:
            t.hangs += 1
            t.fail("%s: follow-up save hung" % what)
        elif not (rc3 == 0 and committed(style, d, 3) and data_ok(d, 3)):
            t.fail("%s: follow-up save with room again failed (rc %s): %s" % (what, rc3, se3[-1000:]))

        # the kernel really failed the I/O: its log names our loop device, or the helper
        # (no fault hook set) got an errno from the kernel, and save 2's bytes are not there
        injected = bool(kern) or (bool(helper_fails) and lost2 > 0)
        if not injected:
            stats["not_injected"].append(what)
            t.notes.append("%s: no kernel error and save 2's data intact: not a valid trial (rc %s, %r)"
                           % (what, rc, so.strip()))
        else:
            t.injected += 1
            if told:
                t.surfaced += 1
            else:
                t.fail("%s: real writeback error not reported to the program (rc %s, stdout %r, ackpt %r)"
                       % (what, rc, so.strip(), lines[-6:]))
        if "RETRIED" in so:
            # the shim reports a file's error at every fsync: a retry that
            # returns 0 would let the program trust lost data
            t.fail("%s: a retried fsync returned 0 after the writeback error: %r" % (what, so.strip()))
            stats["retried_ok"].append("%s: %s, exit %s%s" % (what, " ".join(
                ln for ln in so.strip().splitlines() if ln.startswith("RETRIED")), rc,
                " (%s)" % err_lines[-1].split(": error: ", 1)[-1] if err_lines else ""))
        if "RETRY_FAILED" in so:
            stats["retry_failed"] += 1
        if retry and pause and direct and "RETRIED" not in so and "RETRY_FAILED" not in so:
            stats["retry_not_exercised"].append("%s: %r" % (what, so.strip()))
        if live_committed or re_committed or helper_commits:
            t.commits_after_error += 1
            t.fail("%s: save 2 committed after the writeback error (live %s, after remount %s, helper %r)"
                   % (what, live_committed, re_committed, helper_commits))
            if lost2:
                t.torn += 1
                t.fail("%s: committed save 2 has %d wrong bytes after remount" % (what, lost2))
        if not (live_prev and re_prev):
            t.torn += 1
            t.fail("%s: checkpoint 1 damaged (live %s, after remount %s)" % (what, live_prev, re_prev))
        if lost1:
            t.bytes_lost += lost1
            t.fail("%s: %d bytes of checkpoint 1 differ after remount" % (what, lost1))
        if live_temps or re_temps:
            t.fail("%s: temporaries left behind: live %s, after remount %s" % (what, live_temps, re_temps))
        if not dropped:
            stats["no_drop"] += 1
        if use_strace:
            failed, retried_ok, st_commits = _strace_verdict(st_path)
            stats["strace_failed"] += len(failed)
            if not failed:
                t.fail("%s: strace saw no failed pwrite or fsync in the helper" % what)
            if retried_ok:
                stats["strace_retried"].append("%s: %s" % (what, retried_ok[:3]))
            if st_commits:
                stats["strace_commits"] += 1
                t.commits_after_error += 0 if (live_committed or re_committed or helper_commits) else 1
                t.fail("%s: the helper renamed onto a metadata name after a failed fsync%s: %s"
                       % (what, " (after a successful re-fsync %s)" % retried_ok if retried_ok else "",
                          st_commits))
        stats["ro"] += ro
        stats["fsck_fixed"] += bool(frc) and frc not in (0,)
        if frc not in (0, 1) and frc is not None:
            stats["fsck_bad"].append("%s: e2fsck status %s: %s" % (what, frc, fout[-300:]))
        stats["errnos"].update(re.findall(r"FIRST_ERROR \S+ (\w+)", so))
        stats["helper_errnos"].update(m.split("failed:")[-1].strip() for m in helper_fails)
        stats["helper_ops"].update(re.sub(r"^.*?: (?:error|warning|info|debug): (.*?) of .*$", r"\1", m)
                                   for m in helper_fails)
        stats["calls"].update(re.findall(r"FIRST_ERROR (\S+)", so))
        log("  s6b %-44s rc=%s %s kern=%d lost2=%d ro=%s fsck=%s %.1fs" % (
            what, rc, (so.strip().splitlines() or [""])[-1], len(kern), lost2, ro, frc, secs))
    finally:
        rig.teardown()


def scenario_fsyncgate(work, log, quick=False, trials_per_case=None):
    t = Tally("6b-real-eio", "real writeback EIO (fsyncgate): ext4 on a loop device over a full tmpfs; "
              "writes succeed, writeback/fsync fail")
    t0 = time.monotonic()
    work = Path(work) / "s6b"
    work.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        t.skipped = "needs root (mount, losetup)"
        return t
    for tool in ("losetup", "mkfs.ext4", "dumpe2fs", "e2fsck", "fallocate"):
        if not shutil.which(tool):
            t.skipped = "%s not found" % tool
            return t
    try:
        ok = _control(t, work, log)
    except RigError as e:
        t.skipped = "cannot build ext4 on a loop device over tmpfs: %s" % e
        return t
    if not ok:
        t.seconds = time.monotonic() - t0
        return t
    # (style, helper delay ms, program retries a failed fsync, O_DIRECT, pause before a
    #  second fsync, strace the helper with the pwrite pool)
    # (style, helper delay ms, program retries a failed fsync, O_DIRECT, pause before a second
    #  fsync, strace the helper with the pwrite pool, checkpoint 1's metadata settled in place)
    if quick:
        cases = [("tracker", 0, 1, 1, 0, 0, 1), ("dcp", 50, 1, 0, 0, 0, 1), ("dcp", 0, 1, 1, 1, 0, 1),
                 ("tracker", 0, 1, 0, 1, 0, 1), ("dcp", 0, 0, 0, 1, 0, 1), ("tracker", 0, 1, 0, 1, 1, 1),
                 ("dcp", 0, 1, 0, 1, 0, 0)]
    else:
        cases = [(style, delay, retry, direct, 0, 0, 1) for style in ("tracker", "dcp") for delay in (0, 50)
                 for retry in (0, 1) for direct in (1, 0)]
        cases += [(style, 0, retry, direct, 1, 0, 1) for style in ("tracker", "dcp") for retry in (0, 1)
                  for direct in (1, 0)]
        cases += [(style, 0, 1, direct, 1, 1, 1) for style in ("tracker", "dcp") for direct in (1, 0)]
        cases += [(style, 0, 1, direct, 1, 0, 0) for style in ("tracker", "dcp") for direct in (1, 0)]
    cases = cases * (trials_per_case or (1 if quick else 3))
    if not shutil.which("strace"):
        cases = [c[:5] + (0,) + c[6:] for c in cases]
        t.notes.append("strace not installed: the helper's system calls were not traced")
    stats = {"strace_commits": 0, "journal_abort": 0, "journal_abort_save": 0, "unreadable": [],
             "not_injected": [], "no_drop": 0, "strace_failed": 0,
             "strace_retried": [], "ro": 0,
             "fsck_fixed": 0, "fsck_bad": [], "errnos": Counter(), "helper_errnos": Counter(),
             "helper_ops": Counter(), "calls": Counter(), "retried_ok": [], "retry_failed": 0,
             "retry_not_exercised": []}
    for i, case in enumerate(cases):
        try:
            _case(t, work, i, case, log, stats)
        except RigError as e:
            t.fail("case %s: rig failed: %s" % (case, e))
        except Exception as e:  # noqa: BLE001 - one broken case must not hide the others' figures
            t.fail("case %s: %s: %s" % (case, type(e).__name__, e))
    t.notes.append("%d trials%s: tracker/DCP commit x helper delay 0/50 ms x program retries a failed "
                   "fsync x O_DIRECT on/off x a pause before a second fsync (so that an fsync, not the exit "
                   "status, carries the error) x checkpoint 1's metadata settled in place or still pending; "
                   "each on a fresh ext4, checked live after dropping caches and again after umount (tmpfs "
                   "still full), a fresh losetup, e2fsck -fy and mount"
                   % (len(cases), " (a subset, once)" if quick else " (each case %d times)"
                      % (trials_per_case or 3)))
    t.notes.append("first failing call seen by the program: %s; errnos %s; helper's failed ops %s, errnos %s"
                   % (dict(stats["calls"]) or "none (reported at exit)", dict(stats["errnos"]),
                      dict(stats["helper_ops"]), dict(stats["helper_errnos"])))
    t.notes.append("the loop device turns the tmpfs's ENOSPC into BLK_STS_NOSPC, so on this kernel the "
                   "failed writeback reaches write/fsync as ENOSPC rather than EIO")
    if stats["retried_ok"]:
        t.notes.append("a program that retried a failed fsync got 0 on the retry in %d case(s) (a violation: "
                       "the shim must report a file's error at every fsync): %s"
                       % (len(stats["retried_ok"]), "; ".join(stats["retried_ok"][:4])))
    if stats["retry_failed"]:
        t.notes.append("a retried fsync failed again in %d case(s), as it must (unlike the kernel, the shim "
                       "reports a file's error at every fsync)" % stats["retry_failed"])
    if stats["retry_not_exercised"]:
        t.notes.append("retry cases where no fsync returned the error: %s" % "; ".join(stats["retry_not_exercised"]))
    t.notes.append("meta-pending cases: checkpoint 1's metadata not yet written in place when the tmpfs "
                   "fills, so ext4's own metadata writeback fails too and it may abort its journal during "
                   "the save (then open/mkdir fail with a real EIO)")
    if stats["unreadable"]:
        t.notes.append("save 2's directory unreadable (its block never reached the disk; EBADMSG on the "
                       "checksum) in %d case(s), counted as not committed: %s"
                       % (len(stats["unreadable"]), "; ".join(stats["unreadable"][:3])))
    t.notes.append("ext4 aborted its journal during the save in %d case(s); mounted read-only right after "
                   "the save in %d; counting the umount with the tmpfs still full (a metadata write fails "
                   "there), ext4 aborted its journal in %d; e2fsck -fy replayed the journal "
                   "and fixed counters (exit 1) in %d%s; after every case, with room again, a save under "
                   "the shim must commit"
                   % (stats["journal_abort_save"], stats["ro"], stats["journal_abort"], stats["fsck_fixed"],
                      "; " + "; ".join(stats["fsck_bad"]) if stats["fsck_bad"] else ""))
    ns = sum(1 for c in cases if c[5])
    t.notes.append("strace -f of the helper with the pwrite pool (%d case(s)): %d failed pwrite/fsync "
                   "call(s) seen, "
                   "successful fsync of the same file afterwards: %s; rename onto a metadata name after "
                   "a failure: %s" % (ns, stats["strace_failed"], "; ".join(stats["strace_retried"]) or "none",
                                      stats["strace_commits"] or "never"))
    if stats["no_drop"]:
        t.notes.append("could not drop caches in %d case(s)" % stats["no_drop"])
    t.seconds = time.monotonic() - t0
    return t


def main():
    import argparse
    import json
    import tempfile
    ap = argparse.ArgumentParser(description="scenario 6b: real writeback EIO (fsyncgate)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--trials", type=int, default=None, help="trials per case (default: 3, quick 1)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ackpt-6b-", dir="/tmp"))
    os.chmod(work, 0o755)
    try:
        t = scenario_fsyncgate(work, lambda s: print(s, flush=True), quick=a.quick,
                               trials_per_case=a.trials)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    d = dict(t.__dict__)
    print(json.dumps(d, indent=1))
    print("%s: %s in %.0fs" % (t.name, "OK" if t.ok() else ("SKIPPED" if t.skipped else "FAILED"), t.seconds))
    return 0 if t.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
