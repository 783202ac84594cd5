"""Scenarios 1 and 2: SIGKILL of the trainer / of its helper at a random time
during a loop of saves (Megatron-style torch.save + tracker, and single-rank DCP)."""
import os
import shutil
import signal
import time
from pathlib import Path

from common import (PROGS, VENV_PY, Proc, Tally, ackpt_lines, check_trees, helper_pids, new_mark,
                    plain_env, run, rng_for, shim_env, shm_leftovers, shm_snapshot, wait_helpers_gone)

ITERS = 5
MIB = 4
FLAVORS = ("megatron", "dcp")
READY_TIMEOUT = 90      # torch import on a loaded 2-CPU box
RUN_TIMEOUT = 180       # a whole loop of saves; overstaying it is a hang
HELPER_TIMEOUT = 60     # the helper finishing after the trainer was killed


def reference(work, flavor, durations):
    """A synchronous (no shim) save of every iteration; also times the loop."""
    ref = work / ("ref-" + flavor)
    if not (ref / ".done").exists():
        shutil.rmtree(ref, ignore_errors=True)
        ref.mkdir(parents=True)
        p = Proc([VENV_PY, PROGS / "trainer.py", flavor, ref, 1, ITERS, MIB], plain_env())
        if p.wait_line(lambda ln: ln == "ready", READY_TIMEOUT) is None:
            raise RuntimeError("reference trainer never got ready: %s" % p.stderr[-2000:])
        t0 = time.monotonic()
        rc = p.wait(RUN_TIMEOUT)
        p.drain_pipes(10)
        if rc != 0:
            raise RuntimeError("reference trainer failed (%s): %s" % (rc, p.stderr[-2000:]))
        durations[flavor] = time.monotonic() - t0
        (ref / ".done").write_text("%f\n" % durations[flavor])
    else:
        durations[flavor] = float((ref / ".done").read_text())
    return ref


def _leftovers(t, before):
    left = shm_leftovers(before)
    if left:
        t.fail("/dev/shm leftovers: %s" % left)


def _verify_all(t, pending, refs, log):
    """Batch-check the trees of all trials (one torch import per flavor)."""
    for flavor in FLAVORS:
        items = [x for x in pending if x[0] == flavor]
        results = check_trees(flavor, [str(x[1]) for x in items], refs[flavor], MIB)
        for (fl, out, printed, require_all, error_reported, label) in items:
            res = _verify(t, fl, out, refs[fl], printed, results[str(out)], require_all, error_reported)
            log("  %s committed=%s tracker=%r" % (label, res["committed"], res["tracker"]))
            if not res["bad"] and not res["temporaries"]:
                shutil.rmtree(out, ignore_errors=True)


def _verify(t, flavor, out, ref, printed, res, require_all=False, error_reported=False):
    """Common pass criteria on one trial's tree, after every process of the trial is gone."""
    for b in res["bad"]:
        t.torn += 1
        t.fail("%s: torn/mismatching checkpoint presented as complete: %s" % (out, b))
    t.bytes_lost += res["bytes_bad"]
    committed = set(res["committed"])
    need = set(range(1, (ITERS if require_all else printed) + 1))
    missing = sorted(need - committed)
    if missing:
        # a save that returned to the program must reach storage and be committed
        # (a killed program's helper finishes staged data and pending commits)
        lost = sum(f.stat().st_size for i in missing
                   for f in (ref / (("iter_%07d" if flavor == "megatron" else "step_%07d") % i)).rglob("*")
                   if f.is_file())
        if not error_reported:
            t.bytes_lost += lost  # silently: the program was never told
        t.fail("%s: iterations %s returned to the program but are not committed (tracker %r)%s"
               % (out, missing, res["tracker"], " (reported: exit status 1)" if error_reported else ""))
    if res["temporaries"]:
        t.fail("%s: ackpt temporaries left behind: %s" % (out, res["temporaries"]))
    return res


def scenario_trainer_kill(work, trials, seed, log):
    t = Tally("1-trainer-kill", "SIGKILL of the trainer at a random time during a loop of saves "
              "(Megatron torch.save + tracker; single-rank DCP)")
    durations = {}
    refs = {f: reference(work, f, durations) for f in FLAVORS}
    t.notes.append("%d saves of %d MiB per trial; reference loop (sync) %s"
                   % (ITERS, MIB, ", ".join("%s %.1fs" % (f, durations[f]) for f in FLAVORS)))
    kills_during_loop = 0
    pending = []
    for k in range(trials):
        flavor = FLAVORS[k % 2]
        r = rng_for(seed, "s1", k)
        delay = r.choice([0, 0, 5, 20])
        at = r.uniform(0, durations[flavor] * (1.3 if delay else 1.0))
        out = work / "s1" / ("t%03d-%s" % (k, flavor))
        out.mkdir(parents=True)
        env = shim_env(out, staging="64M", ACKPT_TEST_DELAY_MS=delay or None)
        mark = env["ACKPT_TEST_MARK"]
        before = shm_snapshot()
        t.trials += 1
        p = Proc([VENV_PY, PROGS / "trainer.py", flavor, out, 1, ITERS, MIB], env)
        if p.wait_line(lambda ln: ln == "ready", READY_TIMEOUT) is None:
            p.killpg()
            t.hangs += p.p.poll() is None
            t.fail("trial %d: trainer never got ready: %s" % (k, p.stderr[-1500:]))
            wait_helpers_gone(mark, HELPER_TIMEOUT)
            continue
        time.sleep(at)
        alive = p.p.poll() is None
        if alive:
            try:
                os.kill(p.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                alive = False
        rc = p.wait(30)
        if alive:
            kills_during_loop += 1
            t.injected += 1
            t.surfaced += 1  # a SIGKILL needs no reporting; counted so the ratio reads 100%
        if not wait_helpers_gone(mark, HELPER_TIMEOUT):
            t.hangs += 1
            t.fail("trial %d: helper still running %ds after the trainer was killed" % (k, HELPER_TIMEOUT))
        p.drain_pipes(10)
        printed = max([int(ln.split()[1]) for ln in p.out if ln.startswith("saved ")] or [0])
        _leftovers(t, before)
        errs = [ln for ln in ackpt_lines(p.stderr) if "error" in ln]
        if errs:
            t.fail("trial %d: ackpt error lines: %s" % (k, errs))
        label = "s1 trial %3d %-8s delay=%2dms kill@%.2fs rc=%s saved=%d" % (k, flavor, delay, at, rc, printed)
        log("  " + label)
        pending.append((flavor, out, printed, False, False, label))
    _verify_all(t, pending, refs, log)
    t.notes.append("%d of %d kills landed while the loop was still running" % (kills_during_loop, trials))
    return t


def scenario_helper_kill(work, trials, seed, log):
    t = Tally("2-helper-kill", "SIGKILL of the helper at a random time during a loop of saves; "
              "the trainer must finish synchronously")
    durations = {}
    refs = {f: reference(work, f, durations) for f in FLAVORS}
    k = attempts = 0
    pending = []
    # Where to draw the kill from: the synchronous loop's length at first.
    # The shimmed loop is shorter (its saves do not wait for the disk), so
    # every attempt whose kill came after its last save shrinks the window.
    window = dict(durations)
    while k < trials and attempts < trials * 5:
        attempts += 1
        flavor = FLAVORS[k % 2]
        r = rng_for(seed, "s2", attempts)
        delay = r.choice([5, 20])
        at = r.uniform(0, window[flavor])
        out = work / "s2" / ("t%03d-%s" % (attempts, flavor))
        out.mkdir(parents=True)
        env = shim_env(out, staging="64M", ACKPT_TEST_DELAY_MS=delay)
        mark = env["ACKPT_TEST_MARK"]
        before = shm_snapshot()
        p = Proc([VENV_PY, PROGS / "trainer.py", flavor, out, 1, ITERS, MIB], env)
        if p.wait_line(lambda ln: ln == "ready", READY_TIMEOUT) is None:
            p.killpg()
            t.trials += 1
            t.hangs += 1
            t.fail("attempt %d: trainer never got ready: %s" % (attempts, p.stderr[-1500:]))
            wait_helpers_gone(mark, HELPER_TIMEOUT)
            k += 1
            continue
        # the helper starts at the first managed open
        deadline = time.monotonic() + 30
        hp = []
        while not hp and time.monotonic() < deadline and p.p.poll() is None:
            hp = helper_pids(mark)
            time.sleep(0.005)
        time.sleep(at)
        hp = helper_pids(mark)
        if not hp or p.p.poll() is not None:
            # the loop ended first: no fault injected, not a trial
            window[flavor] = max(0.05, min(window[flavor], at) * 0.8)
            p.wait(RUN_TIMEOUT)
            wait_helpers_gone(mark, HELPER_TIMEOUT)
            p.drain_pipes(10)
            log("  s2 attempt %3d: loop ended before the kill; retried" % attempts)
            shutil.rmtree(out, ignore_errors=True)
            continue
        # Stop the trainer around the kill, so that whether its last save had
        # returned is known for sure: a kill after that, landing once its exit
        # drain had found everything durable, is one it rightly never notices.
        os.kill(p.p.pid, signal.SIGSTOP)
        time.sleep(0.1)  # what it printed before the stop reaches p.out
        done_before = any(ln.rstrip("\n") == "saved %d" % ITERS for ln in list(p.out))
        for h in hp:
            os.kill(h, signal.SIGKILL)
        os.kill(p.p.pid, signal.SIGCONT)
        if done_before:
            window[flavor] = max(0.05, min(window[flavor], at) * 0.8)
            p.wait(RUN_TIMEOUT)
            wait_helpers_gone(mark, HELPER_TIMEOUT)
            p.drain_pipes(10)
            log("  s2 attempt %3d: the last save had returned before the kill; retried" % attempts)
            shutil.rmtree(out, ignore_errors=True)
            continue
        rc = p.wait(RUN_TIMEOUT)
        if not wait_helpers_gone(mark, HELPER_TIMEOUT):
            t.hangs += 1
            t.fail("attempt %d: a second helper still running" % attempts)
        p.drain_pipes(10)
        lines = ackpt_lines(p.stderr)
        if rc == 0 and not lines and any(ln.rstrip("\n") == "saved %d" % ITERS for ln in list(p.out)):
            # The stop can land after the last save returned and before it
            # printed so: then the kill found everything durable, and the exit
            # drain had nothing to ask of the helper.  Unnoticed by design,
            # not a trial; its checkpoints are still verified.
            log("  s2 attempt %3d: the kill found everything durable; retried" % attempts)
            window[flavor] = max(0.05, min(window[flavor], at) * 0.8)
            pending.append((flavor, out, ITERS, True, False, "s2 attempt %d (unnoticed)" % attempts))
            continue
        k += 1
        t.trials += 1
        t.injected += 1
        if rc is None:
            t.hangs += 1
            t.fail("trial %d: trainer still running %ds after its helper was killed" % (k, RUN_TIMEOUT))
        warn = [ln for ln in lines if "warning" in ln and any(w in ln for w in ("died", "dead", "lost"))]
        if len(warn) == 1:
            t.surfaced += 1
        if len(warn) != 1 or len(lines) != 1:
            t.fail("trial %d: expected exactly one ackpt warning about the helper dying, got %r "
                   "(exit status %s, killed at %.2fs, last output %r, stderr %r)"
                   % (k, lines, rc, at, list(p.out)[-3:], p.stderr[-600:]))
        if rc not in (0, None):
            t.fail("trial %d: trainer exit status %s after its helper died: %s" % (k, rc, p.stderr[-1500:]))
        _leftovers(t, before)
        label = "s2 trial %3d %-8s delay=%2dms kill@%.2fs rc=%s" % (k, flavor, delay, at, rc)
        log("  " + label)
        pending.append((flavor, out, ITERS, True, rc == 1 and any("error" in ln for ln in lines), label))
    _verify_all(t, pending, refs, log)
    if k < trials:
        t.fail("only %d of %d helper kills landed during the loop (%d attempts)" % (k, trials, attempts))
    return t
