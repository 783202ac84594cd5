"""Deferred rename, seen from inside and from a process outside ackpt.

argv: OUTDIR MIB SEED
Writes MIB MiB to OUTDIR/ckpt.tmp, fsyncs, closes, os.replace()s it to
OUTDIR/ckpt.pt, then at once runs an observer WITHOUT the shim (no
LD_PRELOAD, no ACKPT_*) that reports what it sees of both names; only then
checks os.path.exists() of both names itself and reads ckpt.pt back.
Prints one JSON line.
"""
import json
import os
import random
import subprocess
import sys
import time

out, mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tmp, final = os.path.join(out, "ckpt.tmp"), os.path.join(out, "ckpt.pt")
data = random.Random(seed).randbytes(mib << 20)
with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, final)
t0 = time.monotonic()

OBSERVER = r"""
import json, os, sys
def look(p):
    try:
        return os.stat(p).st_size
    except FileNotFoundError:
        return None
print(json.dumps({"final": look(sys.argv[1]), "tmp": look(sys.argv[2])}))
"""
env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("ACKPT_")}
r = subprocess.run([sys.executable, "-S", "-c", OBSERVER, final, tmp], env=env,
                   capture_output=True, text=True)
observer = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr}
t_obs = time.monotonic() - t0
exists_final, exists_tmp = os.path.exists(final), os.path.exists(tmp)
with open(final, "rb") as f:
    got = f.read()
print(json.dumps({"observer": observer, "observer_seconds": t_obs, "exists_final": exists_final,
                  "exists_tmp": exists_tmp, "read_ok": got == data, "read_len": len(got),
                  "read_seconds": time.monotonic() - t0}))
