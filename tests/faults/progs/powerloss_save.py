"""A loop of checkpoint saves, paced by the harness, for scenario 4 (power-loss snapshots).

argv: STYLE OUTDIR ACK N
Before save i (i = 1..N) it reads one line from stdin ("go"; anything else or EOF ends
the loop).  Save i writes OUTDIR/iter_i/{a,b}.bin (1 MiB each in 256 KiB writes, fsync,
close; the bytes are those of progs/sweep_save.py, i.e. sweep.expected(i, name)),
prints "staged i", then commits like sweep_save.py:
  STYLE tracker: OUTDIR/latest_checkpointed_iteration.txt via open/write/close (no fsync,
                 as Megatron does)
  STYLE dcp:     OUTDIR/iter_i/.metadata.tmp written, fsynced, renamed to .metadata
and then learns that the commit is durable:
  ACK sync: run with ACKPT_COMMIT=sync: the close (tracker) or rename (dcp) that starts the
            commit returned, so the commit is durable
  ACK wait: ackpt_wait() (exported by the preloaded libackpt.so) returned 0
and prints "acked i".  A failed call prints "FAIL <what> <error>" and exits 3.
"""
import ctypes
import errno
import os
import sys

from sweep_save import make_step, write_data, write_metadata

style, out, ack, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
step = make_step(tag="FAIL")

wait = None
if ack == "wait":
    try:
        wait = ctypes.CDLL(None).ackpt_wait
    except AttributeError:
        print("FAIL ackpt_wait not-preloaded", flush=True)
        sys.exit(3)
    wait.argtypes = [ctypes.c_double]
    wait.restype = ctypes.c_int

for it in range(1, n + 1):
    if sys.stdin.readline().strip() != "go":
        break
    write_data(out, it, step)
    print("staged %d" % it, flush=True)
    write_metadata(style, out, it, step)
    if wait is not None:
        r = wait(120.0)
        if r != 0:
            print("FAIL ackpt_wait %s" % errno.errorcode.get(-r, r), flush=True)
            os._exit(3)
    print("acked %d" % it, flush=True)
print("done", flush=True)
