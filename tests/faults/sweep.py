"""Scenario 5: the in-helper fault hook swept SQLite-style.

For op x err x mode x commit style, N = 1, 2, 3, ... : one save under
ACKPT_FAULT=op=OP,nth=N,err=ERR,mode=MODE, until a run completes without the
fault being hit.  A run counts as hit when the program saw an error (a call
failed, or exit status != 0) or any ackpt line on stderr reports an error.
For every hit: the program must have been told (a call failed, or exit status
1 with an error line), no metadata of that save may exist, no temporaries are
left, the previous checkpoint is intact, and the next save without the fault
succeeds.  The run that ends a sweep must be byte-identical and committed.
"""
import random
import shutil

from common import (PROGS, VENV_PY, Tally, ackpt_lines, plain_env, program_told, run, shim_env)

NMAX = 60
TIMEOUT = 60


def expected(it, name):
    return random.Random("%d/%s" % (it, name)).randbytes(1 << 20)


def save(style, out, it, env):
    return run([VENV_PY, PROGS / "sweep_save.py", style, out, it], env, TIMEOUT)


def committed(style, out, it):
    if style == "tracker":
        p = out / "latest_checkpointed_iteration.txt"
        return p.exists() and p.read_text() == str(it)
    return (out / ("iter_%d" % it) / ".metadata").exists()


def data_ok(out, it):
    return all((out / ("iter_%d" % it) / n).exists()
               and (out / ("iter_%d" % it) / n).read_bytes() == expected(it, n) for n in ("a.bin", "b.bin"))


def temporaries(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".ackpt." in p.name)


def scenario_sweep(work, ops, errs, modes, styles, log, followup=True):
    t = Tally("5-fault-sweep", "ACKPT_FAULT swept over op x errno x nth x once/sticky "
              "(data files + tracker or DCP-style rename commit)")
    base = work / "s5"
    templates = {}
    for style in styles:
        tp = base / ("template-" + style)
        tp.mkdir(parents=True)
        rc, so, se, _ = save(style, tp, 1, plain_env())
        if rc != 0:
            t.fail("template save failed: %s" % se)
            return t
        templates[style] = tp
    runs = 0
    absorbed = 0
    for style in styles:
        for op in ops:
            for err in errs:
                for mode in modes:
                    n = 1
                    while n <= NMAX:
                        runs += 1
                        out = base / ("%s-%s-%s-%s-%d" % (style, op, err, mode, n))
                        shutil.copytree(templates[style], out, symlinks=True)
                        spec = "op=%s,nth=%d,err=%s,mode=%s" % (op, n, err, mode)
                        env = shim_env(out, staging="16M", ACKPT_FAULT=spec)
                        rc, so, se, secs = save(style, out, 2, env)
                        what = "%s [%s]" % (spec, style)
                        if rc is None:
                            t.trials += 1
                            t.hangs += 1
                            t.fail("%s: hang (> %ds)" % (what, TIMEOUT))
                            break
                        lines = ackpt_lines(se)
                        err_lines = [ln for ln in lines if "error" in ln]
                        told = program_told(rc, so, lines)
                        hit = told or rc != 0 or bool(err_lines)
                        if not hit:
                            # the sweep ends here: this run must be a complete, committed save
                            if not (rc == 0 and "OK" in so and committed(style, out, 2) and data_ok(out, 2)):
                                t.fail("%s: clean run but save 2 incomplete (rc %s)\n%s" % (what, rc, se))
                                t.bytes_lost += 2 << 20
                            if op == "open" and n == 1:
                                absorbed += 1
                            if not temporaries(out):
                                shutil.rmtree(out, ignore_errors=True)
                            break
                        if op == "open":
                            # the helper's own reopen failing is absorbed by design (fallback to the
                            # program's descriptor); a visible error here is a finding
                            t.fail("%s: reopen fault became visible (rc %s): %s" % (what, rc, lines))
                        t.trials += 1
                        t.injected += 1
                        if told:
                            t.surfaced += 1
                        else:
                            t.fail("%s: fault hit but not reported to the program (rc %s, stdout %r, "
                                   "stderr %r)" % (what, rc, so, se))
                        if committed(style, out, 2):
                            t.commits_after_error += 1
                            t.fail("%s: metadata of save 2 committed although the save failed "
                                   "(rc %s, stdout %r, stderr %r)" % (what, rc, so.strip(), lines))
                        if committed(style, out, 2) and not data_ok(out, 2):
                            t.torn += 1
                            t.fail("%s: save 2 committed with torn data files" % what)
                        tracker = out / "latest_checkpointed_iteration.txt"
                        if style == "tracker" and tracker.read_text() not in ("1", "2"):
                            t.torn += 1
                            t.fail("%s: the tracker holds %r (torn metadata; the previous pointer "
                                   "'1' is gone)" % (what, tracker.read_text()))
                        if not (data_ok(out, 1) and (style == "tracker" or committed(style, out, 1))):
                            t.torn += 1
                            t.fail("%s: previous checkpoint damaged" % what)
                        left = temporaries(out)
                        if left:
                            t.fail("%s: temporaries left behind: %s" % (what, left))
                        if followup:
                            rc2, so2, se2, _ = save(style, out, 3, shim_env(out, staging="16M"))
                            if rc2 is None:
                                t.hangs += 1
                                t.fail("%s: follow-up save hung" % what)
                            elif not (rc2 == 0 and committed(style, out, 3) and data_ok(out, 3)):
                                t.fail("%s: follow-up save without the fault failed (rc %s): %s"
                                       % (what, rc2, se2))
                        log("  s5 %-48s rc=%s told=%s %s" % (what, rc, told,
                                                             so.strip().splitlines()[-1:] or ""))
                        if not t.failures:
                            shutil.rmtree(out, ignore_errors=True)
                        n += 1
                    else:
                        t.fail("%s/%s/%s/%s: still hitting the fault at N=%d" % (style, op, err, mode, NMAX))
    t.notes.append("%d runs (+ a follow-up save after each hit); styles %s; ops %s; errnos %s; modes %s"
                   % (runs, "/".join(styles), ",".join(ops), ",".join(errs), "/".join(modes)))
    if "open" in ops:
        t.notes.append("op=open: the helper's own reopen of the program's file failing is absorbed by "
                       "design (it falls back to the program's descriptor), so it never surfaces; "
                       "%d such sweeps ended at N=1 with a complete, committed save" % absorbed)
    return t
