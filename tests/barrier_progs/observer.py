"""An observer that is NOT under the shim: it polls what other processes (and
other nodes) would see on disk while a job saves.

  observer.py dcp OUT_JSON DIR DATA_GLOB [--interval-ms 2] [--max-s 120]
      Polls DIR: the sizes of the files matching DATA_GLOB and whether
      DIR/.metadata exists.  Records every change (time.time(), sizes,
      metadata).  The first time .metadata is seen, reads it and the data
      files at once and records their sha256 (what a loader would have
      read at that instant).

  observer.py tracker OUT_JSON ROOT RANKS [--interval-ms 2] [--max-s 120]
      Polls ROOT/latest_checkpointed_iteration.txt.  Every time its
      content changes, records the text and, for iteration N, torch.load's
      ROOT/iter_{N:07d}/mp_rank_{r:02d}/model_optim_rng.pt for every rank
      and checks it against megatron_job.expected(N, r).

Both print "READY" (flushed) once polling runs, and stop when OUT_JSON.stop
exists (or after --max-s), then write OUT_JSON.
"""
import argparse
import glob
import hashlib
import json
import os
import sys
import time


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def sizes(d, pattern):
    out = {}
    for p in glob.glob(os.path.join(d, pattern)):
        try:
            out[os.path.basename(p)] = os.stat(p).st_size
        except OSError:
            pass
    return out


def run_dcp(a):
    meta = os.path.join(a.dir, ".metadata")
    log = []
    first_meta = None
    last = None
    t_end = time.time() + a.max_s
    stop = a.out + ".stop"
    print("READY", flush=True)
    n = 0
    while time.time() < t_end:
        n += 1
        now = time.time()
        s = sizes(a.dir, a.glob)
        m = os.path.exists(meta)
        if m and first_meta is None:
            try:
                with open(meta, "rb") as f:
                    mlen = len(f.read())
                first_meta = {"t": now, "metadata_len": mlen,
                              "sha": {name: sha(os.path.join(a.dir, name)) for name in s},
                              "sizes": s}
            except OSError as e:
                first_meta = {"t": now, "error": str(e)}
        cur = (tuple(sorted(s.items())), m)
        if cur != last:
            log.append({"t": now, "sizes": s, "metadata": m})
            last = cur
        if n % 16 == 0 and os.path.exists(stop):
            break
        time.sleep(a.interval_ms / 1000.0)
    return {"samples": n, "log": log, "first_metadata": first_meta}


def run_tracker(a):
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from megatron_job import expected, file_of

    tracker = os.path.join(a.dir, "latest_checkpointed_iteration.txt")
    seen = []
    last = None
    t_end = time.time() + a.max_s
    stop = a.out + ".stop"
    print("READY", flush=True)
    n = 0
    while time.time() < t_end:
        n += 1
        try:
            with open(tracker) as f:
                text = f.read()
        except FileNotFoundError:
            text = None
        if text != last:
            rec = {"t": time.time(), "text": text, "problems": []}
            last = text
            if text is not None:
                try:
                    it = int(text.strip())
                except ValueError:
                    rec["problems"].append("tracker holds %r, not an iteration" % text)
                    it = None
                if it is not None:
                    for r in range(a.ranks):
                        p = file_of(a.dir, it, r)
                        try:
                            obj = torch.load(p, weights_only=True)
                            want = expected(it, r)
                            if set(obj) != set(want) or any(
                                    not torch.equal(obj[k], want[k]) for k in want):
                                rec["problems"].append("%s: content differs from what was saved" % p)
                        except Exception as e:  # noqa: BLE001
                            rec["problems"].append("%s: %s: %s" % (p, type(e).__name__, e))
            seen.append(rec)
        if n % 16 == 0 and os.path.exists(stop):
            break
        time.sleep(a.interval_ms / 1000.0)
    return {"samples": n, "seen": seen}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["dcp", "tracker"])
    ap.add_argument("out")
    ap.add_argument("dir")
    ap.add_argument("arg")
    ap.add_argument("--interval-ms", type=float, default=2.0)
    ap.add_argument("--max-s", type=float, default=120.0)
    a = ap.parse_args()
    if "LD_PRELOAD" in os.environ:
        sys.exit("observer.py must run without the shim")
    if a.mode == "dcp":
        a.glob = a.arg
        res = run_dcp(a)
    else:
        a.ranks = int(a.arg)
        res = run_tracker(a)
    with open(a.out + ".tmp", "w") as f:
        json.dump(res, f)
    os.rename(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
