"""Scenario 3: a deterministic crash sweep -- SIGKILL at the k-th rename,
unlink, link, fsync and openat, for every k reached, of the helper and of the
trainer.

The metadata syscalls that ackpt makes outside io_uring (rename, unlink of
backups and temporaries, link of the backup of the previous metadata, file
and directory fsync, openat) are hit with
`strace -e inject=SET:signal=SIGKILL:when=K`; strace delivers the SIGKILL on
entry to the K-th call, so the call itself never runs.  strace 6.1 counts
invocations per tracee (thread) and per syscall number: a set such as
"rename,renameat,renameat2" means "the K-th call of any one of them", and
every thread and forked process starts from 0.  A syscall must be in the
trace set to be injected, so trace= and inject= name the same set.

Two targets, traced separately so that K means one process's K-th call:

* helper: ACKPT_HELPER points at a wrapper that runs the real helper under
  `strace -D -f` (the helper keeps its pid, so the shim's posix_spawn +
  waitpid of the intermediate process and its socket channel are as usual).
  The helper's first process (before its detaching fork; it opens ld.so.cache,
  its libraries and /dev/null) and the detached helper each count from 0, so
  openat K <= that first process's opens kills the helper while it starts.
  Classes: rename, unlink, link, fsync, openat.  Criteria (as scenario 2): the
  trainer finishes synchronously, exits 0 with exactly one ackpt warning
  (the helper died), and every save is complete and committed.

* trainer: the trainer imports torch, then blocks on stdin; `strace -p` (no
  -f: the main thread only, not the helper it spawns) attaches, and the loop
  of saves (progs/trainer.py) starts.  A calibration run (no kill in it)
  records the calls reached; the trainer makes no rename/unlink/link/fsync of
  its own under the shim (all deferred to the helper), so for those classes the
  calibration run (with inject when=1 on them) is the run with no kill.
  openat is swept at every k whose call opens a file of the checkpoint tree.
  Criteria (as scenario 1): the helper finishes what was staged: every save
  that returned is committed and byte-identical; nothing torn.

For every class, K = 1, 2, 3, ... until a run completes with no kill.  Both
targets and every run: directories whose metadata exists load and are
byte-identical to a synchronous reference, no ackpt temporaries or /dev/shm
entries are left, no process overstays its timeout (a hang).
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (HELPER, PROGS, VENV_PY, Proc, Tally, ackpt_lines, check_trees, plain_env,  # noqa: E402
                    shim_env, shm_leftovers, shm_snapshot, wait_helpers_gone)
import faultutil  # noqa: E402  (on the path once common is imported)
import kill  # noqa: E402

ITERS = 3
MIB = 1
FLAVORS = ("megatron", "dcp")
CLASSES = {
    "rename": "rename,renameat,renameat2",
    "unlink": "unlink,unlinkat",
    "link": "link,linkat",          # the backup of the previous metadata during a commit
    "fsync": "fsync,fdatasync",
    "openat": "openat,open",
}
TRACE_EXTRA = "execve,clone,clone3,fork,vfork"  # traced (to tell processes apart), never injected
KMAX = 120              # a bound on any sweep (a class never reaches this many calls here)
READY_TIMEOUT = 90      # torch import on a loaded 2-CPU box
RUN_TIMEOUT = 120       # a whole loop of saves under strace; overstaying it is a hang
HELPER_TIMEOUT = 60     # the helper finishing after the trainer was killed
ATTACH_TIMEOUT = 20

BOOT = r"""
import runpy, sys, warnings
warnings.filterwarnings("ignore")
import torch
if sys.argv[1] == "dcp":
    import torch.distributed.checkpoint
print("boot", flush=True)
sys.stdin.readline()
sys.argv = [%r] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
""" % str(PROGS / "trainer.py")


def strace_ok():
    if shutil.which("strace") is None:
        return "strace not installed"
    r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=getppid",
                        "-e", "inject=getppid:error=ENOSYS:when=1", "true"], capture_output=True)
    if r.returncode != 0:
        return "strace cannot trace here: %s" % r.stderr.decode(errors="replace").strip()[:200]
    return None


def strace_opts(log, cls_set, k):
    a = ["-q", "-y", "-s", "200", "-o", str(log), "-e", "signal=none",
         "-e", "trace=%s,%s" % (cls_set, TRACE_EXTRA)]
    if k is not None:
        a += ["-e", "inject=%s:signal=SIGKILL:when=%d" % (cls_set, k)]
    return a


_PID = re.compile(r"^(\d+)\s+(.*)$")


def parse_log(path, single=False):
    """Calls in an strace -o log: [(pid, name, text, ret)] in order of entry, with
    <unfinished ...>/resumed pairs joined; ret is "?" for a call that never
    returned (its process was killed on entry: the injected SIGKILL; strace
    does not always get to write its "+++ killed by SIGKILL +++" line).
    single: the log of one tracee (no pid column)."""
    calls, open_ = [], {}
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return calls
    for ln in text.splitlines():
        if single:
            pid, rest = 0, ln
        else:
            m = _PID.match(ln)
            if not m:
                continue
            pid, rest = int(m.group(1)), m.group(2)
        if rest.startswith("+++") or rest.startswith("---"):
            continue
        if rest.startswith("<... "):
            name = rest[5:].split(" ", 1)[0]
            i = open_.pop((pid, name), None)
            if i is not None:
                ret = rest.rsplit(" = ", 1)[1].strip() if " = " in rest else "?"
                calls[i] = (pid, name, calls[i][2] + rest.split("resumed>", 1)[-1], ret)
            continue
        name = rest.split("(", 1)[0]
        if rest.endswith("<unfinished ...>"):
            open_[(pid, name)] = len(calls)
            calls.append((pid, name, rest[:-len("<unfinished ...>")].rstrip(), "?"))
            continue
        ret = rest.rsplit(" = ", 1)[1].strip() if " = " in rest else "?"
        calls.append((pid, name, rest, ret))
    return calls


def killed_calls(calls, names):
    """The calls of the given names that never returned."""
    return [c for c in calls if c[1] in names and c[3] == "?"]


def _norm(call, out):
    """A traced call with the run's own tree, pid-named temporaries and result cut away."""
    call = call.replace(str(out), "<OUT>").replace(" <unfinished ...>", "")
    call = re.sub(r"\.ackpt\.\d+\.", ".ackpt.PID.", call)
    return call.split(") = ")[0]


def reference(work, flavor):
    """A synchronous (no shim) save of every iteration."""
    ref = work / ("ref3-%s-%d-%g" % (flavor, ITERS, MIB))
    if (ref / ".done").exists():
        return ref
    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir(parents=True)
    p = Proc([VENV_PY, PROGS / "trainer.py", flavor, ref, 1, ITERS, MIB], plain_env())
    rc = p.wait(RUN_TIMEOUT + READY_TIMEOUT)
    p.drain_pipes(10)
    if rc != 0:
        raise RuntimeError("reference trainer failed (%s): %s" % (rc, p.stderr[-2000:]))
    (ref / ".done").write_text("ok\n")
    return ref


class Sweep:
    def __init__(self, work, log, t):
        self.work, self.log, self.t = work, log, t
        self.base = work / "s3"
        self.base.mkdir(parents=True, exist_ok=True)
        self.pending = []   # (flavor, out, printed, label, data files that must be complete)
        self.n = 0

    def _fresh(self, flavor, what):
        self.n += 1
        label = "r%03d-%s-%s" % (self.n, flavor, what)
        out = self.base / label
        out.mkdir(parents=True)
        return label, out

    def _finish(self, p, env, before, label):
        """Common tail of a run: helpers gone, pipes drained, leftovers checked."""
        t = self.t
        mark = env["ACKPT_TEST_MARK"]
        if not wait_helpers_gone(mark, HELPER_TIMEOUT):
            t.hangs += 1
            t.fail("%s: helper still running %ds after the trainer ended" % (label, HELPER_TIMEOUT))
        if not p.drain_pipes(20):
            # a tracer or helper still holds the trainer's stdout/stderr
            p.killpg()
            faultutil.kill_marked(mark)
            t.hangs += 1
            t.fail("%s: the trainer's output pipes stayed open 20s after it ended" % label)
        left = shm_leftovers(before)
        if left:
            t.fail("%s: /dev/shm leftovers: %s" % (label, left))

    # ------------------------------------------------------------------ helper
    def helper_run(self, flavor, cls, k):
        """One trainer run whose helper runs under strace injecting at the k-th
        call of class cls.  Returns (hit: [(role, call)], the number of calls of
        the class that the detached helper reached)."""
        t = self.t
        label, out = self._fresh(flavor, "h-%s-k%d" % (cls, k))
        slog = self.base / (label + ".strace")
        wrap = self.base / (label + ".sh")
        wrap.write_text("#!/bin/sh\nexec strace -D -f %s \"$@\"\n"
                        % " ".join(shlex.quote(str(a)) for a in strace_opts(slog, CLASSES[cls], k) + [HELPER]))
        wrap.chmod(0o755)
        env = shim_env(out, staging="64M", ACKPT_HELPER=wrap)
        before = shm_snapshot()
        t.trials += 1
        p = Proc([VENV_PY, PROGS / "trainer.py", flavor, out, 1, ITERS, MIB], env)
        rc = p.wait(RUN_TIMEOUT + READY_TIMEOUT)
        if rc is None:
            t.hangs += 1
            t.fail("%s: trainer still running after %ds" % (label, RUN_TIMEOUT + READY_TIMEOUT))
        self._finish(p, env, before, label)
        calls = parse_log(slog)
        names = CLASSES[cls].split(",")
        execs = [c[0] for c in calls if c[1] == "execve" and HELPER.name in c[2]]
        first = execs[0] if execs else None
        hit = [("helper-start" if c[0] == first else "helper", c[2]) for c in killed_calls(calls, names)]
        if cls == "fsync":
            # tell directory fsyncs from file fsyncs by the -y path (the tree is still there)
            hit = [(r + (" dir" if os.path.isdir((re.search(r"\(\d+<(.*?)>", c) or [None, ""])[1]) else " file"), c)
                   for r, c in hit]
        printed = max([int(ln.split()[1]) for ln in p.out if ln.startswith("saved ")] or [0])
        lines = ackpt_lines(p.stderr)
        if len(execs) > 1:
            t.fail("%s: %d helpers were started (one expected): %s" % (label, len(execs), execs))
        if len(hit) > 1:
            t.fail("%s: more than one call was hit: %s" % (label, hit))
        if hit:
            t.injected += 1
            # a helper killed before it detached is reported as not started
            words = ("died", "dead", "lost") + (("did not start",) if hit[0][0] == "helper-start" else ())
            warn = [ln for ln in lines if "warning" in ln and any(w in ln for w in words)]
            if len(warn) == 1:
                t.surfaced += 1
            if len(warn) != 1 or len(lines) != 1:
                t.fail("%s: expected exactly one ackpt warning about the helper dying, got %r" % (label, lines))
        elif lines:
            t.fail("%s: ackpt lines in a run without a kill: %r" % (label, lines))
        if rc not in (0, None):
            t.fail("%s: trainer exit status %s: %s" % (label, rc, p.stderr[-1500:]))
        if rc == 0 and printed != ITERS:
            t.fail("%s: trainer exited 0 after %d of %d saves" % (label, printed, ITERS))
        desc = "; ".join("%s %s" % (r, c[:150]) for r, c in hit) or "no kill"
        self.log("  s3 %-34s rc=%s saved=%d %s" % (label, rc, printed, desc))
        # the trainer must finish every save, whatever happened to its helper
        self.pending.append((flavor, out, ITERS if rc is not None else printed, label + " " + desc, ()))
        ncalls = sum(1 for c in calls if c[1] in names and c[0] != first)
        return hit, ncalls

    # ------------------------------------------------------------------ trainer
    def trainer_run(self, flavor, trace_set, inject_set, k, what, complete=()):
        """One run with strace -p on the trainer's main thread after its imports."""
        t = self.t
        label, out = self._fresh(flavor, what)
        slog = self.base / (label + ".strace")
        env = shim_env(out, staging="64M")
        before = shm_snapshot()
        t.trials += 1
        p = Proc([VENV_PY, "-c", BOOT, flavor, out, 1, ITERS, MIB], env, stdin=subprocess.PIPE)
        st = None
        try:
            if p.wait_line(lambda ln: ln == "boot", READY_TIMEOUT) is None:
                p.killpg()
                t.hangs += p.p.poll() is None
                t.fail("%s: trainer never got ready: %s" % (label, p.stderr[-1500:]))
                self._finish(p, env, before, label)
                return None, [], out
            opts = ["-q", "-y", "-s", "200", "-o", str(slog), "-e", "signal=none", "-e", "trace=" + trace_set]
            if k is not None:
                opts += ["-e", "inject=%s:signal=SIGKILL:when=%d" % (inject_set, k)]
            st = subprocess.Popen(["strace"] + opts + ["-p", str(p.p.pid)], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            deadline = time.monotonic() + ATTACH_TIMEOUT
            attached = False
            while time.monotonic() < deadline and st.poll() is None:
                try:
                    s = Path("/proc/%d/status" % p.p.pid).read_text()
                    if int(re.search(r"TracerPid:\s*(\d+)", s).group(1)) == st.pid:
                        attached = True
                        break
                except (OSError, AttributeError):
                    pass
                time.sleep(0.01)
            if not attached:
                p.killpg()
                t.fail("%s: strace could not attach: %s" % (label, st.stderr.read().decode(errors="replace")
                                                              if st.poll() is not None else "timeout"))
                self._finish(p, env, before, label)
                return None, [], out
            time.sleep(0.2)  # strace interrupts and restarts the tracee right after seizing it
            p.p.stdin.write(b"go\n")
            p.p.stdin.flush()
            p.p.stdin.close()
            rc = p.wait(RUN_TIMEOUT)
            if rc is None:
                t.hangs += 1
                t.fail("%s: trainer still running after %ds" % (label, RUN_TIMEOUT))
            try:
                st.wait(30)
            except subprocess.TimeoutExpired:
                st.kill()
                st.wait()
                t.fail("%s: strace still running 30s after the trainer ended" % label)
        finally:
            if st is not None and st.poll() is None:
                st.kill()
                st.wait()
        self._finish(p, env, before, label)
        calls = parse_log(slog, single=True)
        killed = killed_calls(calls, inject_set.split(",") if k is not None else ())
        printed = max([int(ln.split()[1]) for ln in p.out if ln.startswith("saved ")] or [0])
        lines = ackpt_lines(p.stderr)
        if killed:
            t.injected += 1
            t.surfaced += 1  # a SIGKILL needs no reporting; counted so the ratio reads 100%
            if rc != -9:
                t.fail("%s: strace saw a SIGKILL but the trainer's status is %s" % (label, rc))
        else:
            if rc != 0 or printed != ITERS:
                t.fail("%s: run without a kill: exit status %s after %d of %d saves: %s"
                       % (label, rc, printed, ITERS, p.stderr[-1500:]))
        errs = [ln for ln in lines if "error" in ln or not killed]
        if errs:
            t.fail("%s: ackpt lines: %r" % (label, errs))
        desc = ("trainer " + killed[0][2][:150]) if killed else "no kill"
        if killed and complete:
            desc += " [must be complete: %s]" % ", ".join(complete)
        self.log("  s3 %-34s rc=%s saved=%d %s" % (label, rc, printed, desc))
        self.pending.append((flavor, out, printed, label + " " + desc, complete if killed else ()))
        return (killed[0][2] if killed else None), calls, out

    # ------------------------------------------------------------------ verification
    def verify_all(self, refs):
        t = self.t
        for flavor in FLAVORS:
            items = [x for x in self.pending if x[0] == flavor]
            if not items:
                continue
            results = check_trees(flavor, [str(x[1]) for x in items], refs[flavor], MIB)
            for fl, out, printed, label, complete in items:
                res = kill._verify(t, fl, out, refs[fl], printed, results[str(out)])
                # the trainer was killed: data files it had written and closed before the
                # killed call were staged in full, and the helper must finish them even
                # when their save was not committed yet
                for rel in complete:
                    want = (refs[fl] / rel).read_bytes()
                    try:
                        got = (out / rel).read_bytes()
                    except OSError as e:
                        got = None
                        why = str(e)
                    if got != want:
                        if got is not None:
                            why = "%d bytes, reference %d, differ" % (len(got), len(want))
                        t.bytes_lost += len(want)
                        res["bad"].append(rel)
                        t.fail("%s: %s was written and closed before the trainer was killed, but the "
                               "helper did not finish it: %s" % (out, rel, why))
                self.log("  %s committed=%s tracker=%r" % (label, res["committed"], res["tracker"]))
                if not res["bad"] and not res["temporaries"]:
                    shutil.rmtree(out, ignore_errors=True)


def scenario_crashsweep(work, log, quick=False):
    t = Tally("3-crash-sweep", "strace --inject SIGKILL at the k-th rename, unlink, fsync and openat "
              "of the helper and of the trainer, every k reached (Megatron tracker; single-rank DCP)")
    problem = strace_ok()
    if problem:
        t.skipped = problem
        return t
    work = Path(work)
    flavors = ("megatron",) if quick else FLAVORS
    refs = {f: reference(work, f) for f in flavors}
    sw = Sweep(work, log, t)
    t.notes.append("%d saves of %d MiB per run; %s" % (ITERS, MIB, "quick: Megatron only, first k of each class"
                                                         if quick else "Megatron and DCP"))
    t.notes.append("strace 6.1 counts when=K per tracee and per syscall; 'helper' is the detached helper, "
                   "'helper-start' its first process before the detaching fork (it opens ld.so.cache, its "
                   "libraries and /dev/null, so openat k up to that count kills it while starting, and the "
                   "detached helper's openat calls of those numbers are not reached); 'dir'/'file': what an "
                   "fsync that was hit syncs")
    for flavor in flavors:
        # ---- the helper: every class, k = 1, 2, ... until a run without a kill
        for cls in CLASSES:
            ks = list(range(1, KMAX + 1))
            if quick:
                ks = [1, 8] if cls == "openat" else [1, 2, 3]
            roles = {}
            reached = None
            for k in ks:
                hit, ncalls = sw.helper_run(flavor, cls, k)
                if not hit:
                    reached = ncalls
                    break
                for role, _ in hit:
                    roles[role] = roles.get(role, 0) + 1
            done = ks[:ks.index(k) + 1]
            tried = "k=%d..%d" % (done[0], done[-1]) if done == list(range(done[0], done[-1] + 1)) \
                else "k=" + ",".join(map(str, done))
            t.notes.append("%s helper %s: %s, kills: %s; %s" % (
                flavor, cls, tried, ", ".join("%s %d" % kv for kv in sorted(roles.items())) or "none",
                ("k=%d ran to the end (%d calls reached)" % (k, reached)) if reached is not None
                else ("quick: stopped at k=%d" % k) if quick else "sweep stopped at KMAX before a run without a kill"))
            if reached is None and not quick:
                t.fail("%s helper %s: still killing at k=%d" % (flavor, cls, k))
        # ---- the trainer: calibration (also k=1 of rename/unlink/fsync), then every in-tree openat
        nonopen = ",".join(CLASSES[c] for c in CLASSES if c != "openat")
        killed, calls, cout = sw.trainer_run(flavor, nonopen + "," + CLASSES["openat"], nonopen, 1, "t-calib")
        if killed:
            t.fail("%s: the trainer made a rename/unlink/link/fsync call of its own under the shim: %s"
                   % (flavor, killed[:200]))
            killed, calls, cout = sw.trainer_run(flavor, CLASSES["openat"], None, None, "t-calib2")
        counts = {c: sum(1 for x in calls if x[1] in CLASSES[c].split(",")) for c in CLASSES}
        opens = [x[2] for x in calls if x[1] in ("openat", "open")]
        # the k-th openat of the main thread, for every k that opens a file of the tree
        tree_ks = [i + 1 for i, ln in enumerate(opens) if str(cout) + "/" in ln]
        if quick:
            tree_ks = tree_ks[:2]
        hits = mism = 0
        for k in tree_ks:
            want = _norm(opens[k - 1], cout)
            # data files opened before the k-th openat were written and closed by then
            done = []
            for ln in opens[:k - 1]:
                m = re.search(r'"%s/([^"]+)"' % re.escape(str(cout)), ln)
                if m and m.group(1).endswith((".pt", ".distcp")) and m.group(1) not in done:
                    done.append(m.group(1))
            killed, _, kout = sw.trainer_run(flavor, CLASSES["openat"], CLASSES["openat"], k, "t-openat-k%d" % k,
                                             complete=done)
            if killed:
                hits += 1
                got = _norm(killed, kout)
                if got != want:
                    mism += 1
                    log("  note: trainer openat k=%d hit %r, the calibration run had %r" % (k, got, want))
        t.notes.append("%s trainer: %s calls reached (the calibration run, inject at k=1 on them, ran to "
                       "the end); openat %d in all, %d of them in the checkpoint tree, swept at k=%s: %d kills%s"
                       % (flavor, ", ".join("%s %d" % (c, counts[c]) for c in CLASSES if c != "openat"), len(opens),
                          len(tree_ks), tree_ks if len(tree_ks) < 12 else "%d..%d" % (tree_ks[0], tree_ks[-1]),
                          hits, (" (%d hit another open than the calibration's)" % mism) if mism else ""))
    sw.verify_all(refs)
    return t


def main():
    import argparse
    import tempfile
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every run")
    a = ap.parse_args()
    from common import build_problem_or_none
    problem = build_problem_or_none()
    if problem:
        print("crashsweep: %s" % problem, file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="ackpt-crashsweep-", dir="/tmp"))
    os.chmod(work, 0o755)
    print("crashsweep: %s mode, work dir %s" % ("quick" if a.quick else "full", work), flush=True)
    t0 = time.monotonic()
    t = scenario_crashsweep(work, (lambda m: print(m, flush=True)) if a.verbose else (lambda m: None), a.quick)
    t.seconds = time.monotonic() - t0
    print("scenario %s %s  trials %d, injected %d, surfaced %d, torn %d, bytes lost %d, hangs %d, %.0fs%s"
          % (t.name, "PASS" if t.ok() else ("SKIP" if t.skipped else "FAIL"), t.trials, t.injected, t.surfaced,
             t.torn, t.bytes_lost, t.hangs, t.seconds, (" (%s)" % t.skipped) if t.skipped else ""))
    for n in t.notes:
        print("  note: " + n)
    for f in t.failures:
        print("  FAIL: " + f)
    if a.keep or t.failures:
        print("work dir kept: %s" % work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if t.ok() or t.skipped else 1


if __name__ == "__main__":
    sys.exit(main())
