"""A Megatron-style torchrun + gloo job: for each iteration every rank
torch.save's iter_{i:07d}/mp_rank_{r:02d}/model_optim_rng.pt, the ranks
barrier, and rank 0 writes latest_checkpointed_iteration.txt with open('w').

  megatron_job.py ROOT ITERS [--kib K]
Progress lines: EVENT <time.time()> rank=<r> <name> [detail] (flushed).
"""
import argparse
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

KIB = 256


def file_of(root, it, rank):
    return os.path.join(root, "iter_%07d" % it, "mp_rank_%02d" % rank, "model_optim_rng.pt")


def expected(it, rank, kib=None):
    kib = kib or int(os.environ.get("MEGATRON_JOB_KIB", KIB))
    g = torch.Generator().manual_seed(it * 1009 + rank)
    return {"model": torch.randn(kib * 256, generator=g),
            "iteration": torch.tensor(it),
            "rank": torch.tensor(rank)}


def event(rank, name, detail=""):
    sys.stdout.write("EVENT %.6f rank=%d %s %s\n" % (time.time(), rank, name, detail))
    sys.stdout.flush()


def main():
    import torch.distributed as dist
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("iters", type=int)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    event(rank, "start", "pid=%d" % os.getpid())
    t0 = time.monotonic()
    for it in range(1, a.iters + 1):
        p = file_of(a.root, it, rank)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        torch.save(expected(it, rank), p)
        dist.barrier()
        if rank == 0:
            with open(os.path.join(a.root, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write(str(it))
        event(rank, "iter", str(it))
    event(rank, "loop_done", "%.3fs" % (time.monotonic() - t0))
    dist.barrier()
    dist.destroy_process_group()
    event(rank, "end")


if __name__ == "__main__":
    main()
