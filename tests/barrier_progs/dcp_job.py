"""A torchrun + gloo job that saves torch.distributed.checkpoint (DCP)
checkpoints.  Runs the same with or without the shim.

  dcp_job.py --save DIR,MIB,SEED [--save ...] [--threads N]
             [--env-rank R NAME=VALUE ...] [--wait-commit] [--linger R SECONDS]

Each --save: every rank saves bstate.rank_state(rank, MIB, SEED) into DIR
with FileSystemWriter(thread_count=N); rank 0 writes DIR/.metadata (DCP's own
.metadata.tmp + rename).  Progress lines go to stdout, flushed:
  EVENT <time.time()> rank=<r> <name> [detail]
--wait-commit: after each save rank 0 stat()s DIR/.metadata -- under the
shim the program's own access waits for the commit -- and prints
"committed<i> ok|errno=N", then all ranks barrier.
--env-rank R NAME=VALUE: rank R sets NAME=VALUE in its environment before its
first managed open, so its ackpt-helper sees it only with ACKPT_EARLY_START=off
(otherwise every rank's helper starts with the program, before this runs; a
fault for one rank's helper is ACKPT_FAULT=...,rank=R for the whole job).
--linger R SECONDS: rank R sleeps after its "end" event.  torchrun stops the
other ranks as soon as one exits non-zero, so a test that needs another
rank's exit message makes the failing rank exit last.
"""
import argparse
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bstate import rank_state  # noqa: E402


def event(rank, name, detail=""):
    sys.stdout.write("EVENT %.6f rank=%d %s %s\n" % (time.time(), rank, name, detail))
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--save", action="append", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--env-rank", nargs=2, action="append", default=[])
    ap.add_argument("--wait-commit", action="store_true",
                    help="after each save rank 0 stat()s DIR/.metadata (under the shim that "
                         "waits for the commit) before the ranks go on")
    ap.add_argument("--linger", nargs=2, type=float, default=(-1, 0))
    a = ap.parse_args()

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for r, kv in a.env_rank:
        if int(r) == rank:
            k, v = kv.split("=", 1)
            os.environ[k] = v
    dist.init_process_group("gloo")
    event(rank, "start", "pid=%d world=%d" % (os.getpid(), dist.get_world_size()))
    for i, spec in enumerate(a.save):
        d, mib, seed = spec.split(",")
        sd = rank_state(rank, float(mib), int(seed))
        event(rank, "saving%d" % i, d)
        t0 = time.monotonic()
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(d, thread_count=a.threads))
        event(rank, "saved%d" % i, "%.3fs" % (time.monotonic() - t0))
        if a.wait_commit:
            if rank == 0:
                try:
                    os.stat(os.path.join(d, ".metadata"))
                    what = "ok"
                except OSError as e:
                    what = "errno=%d" % e.errno
                event(rank, "committed%d" % i, "%s %.3fs" % (what, time.monotonic() - t0))
            dist.barrier()
    dist.barrier()
    dist.destroy_process_group()
    event(rank, "end")
    if rank == int(a.linger[0]):
        time.sleep(a.linger[1])


if __name__ == "__main__":
    main()
