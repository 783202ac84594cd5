"""Every rank reads back what the job just saved, as real training code does.

  read_your_writes.py DIR dcp|torchsave|remote

dcp: every rank dcp.save()s its shard, dist.barrier(), every rank
dcp.load()s.  torchsave (the DDP tutorial): rank 0 torch.save()s, barrier,
every rank torch.load()s.  Each rank prints one line with what it loaded.
remote: the last rank writes 4 MiB with open/write/close and prints how
many bytes storage held right after close() returned (seen by stat(1)
without the shim: under ackpt with a slow helper, fewer than written, as
close() does not wait for storage); barrier; rank 0 reads the file.
"""
import subprocess
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402


def state(rank):
    g = torch.Generator().manual_seed(1234 + rank)
    return {"w%d" % rank: torch.randn(256, 1024, generator=g), "step": torch.tensor(7)}


def say(line):
    """One write per line: ranks share stdout, and print() writes twice."""
    os.write(1, (line + "\n").encode())


def digest(sd):
    return " ".join("%s=%.6f" % (k, float(v.double().sum())) for k, v in sorted(sd.items()))


def main():
    out, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if mode == "dcp":
        for it in range(2):
            d = os.path.join(out, "step%d" % it)
            sd = state(rank)
            dcp.save(sd, checkpoint_id=d)
            dist.barrier()
            back = {k: torch.zeros_like(v) for k, v in sd.items()}
            dcp.load(back, checkpoint_id=d)
            say("rank %d step %d loaded %s" % (rank, it, digest(back)))
    elif mode == "remote":
        path = os.path.join(out, "remote.bin")
        data = bytes(range(256)) * (4 << 12)
        if rank == dist.get_world_size() - 1:
            with open(path, "wb") as f:
                f.write(data)
            env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
            raw = subprocess.run(["stat", "-c", "%s", path], env=env, capture_output=True,
                                 text=True, check=True).stdout.strip()
            say("writer closed; storage held %s of %d" % (raw, len(data)))
        dist.barrier()
        if rank == 0:
            with open(path, "rb") as f:
                got = f.read()
            say("rank 0 read %d bytes, %s" % (len(got), "same" if got == data else "DIFFERENT"))
    else:
        path = os.path.join(out, "model.pt")
        if rank == 0:
            torch.save(state(0), path)
        dist.barrier()
        back = torch.load(path)
        say("rank %d loaded %s" % (rank, digest(back)))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
