#!/usr/bin/env python3
"""A small CPU training job that checkpoints the way a careful user does.

Every --every steps it saves the model and optimizer state with torch.save
into --ckpt-dir and fsyncs the file before going on, and measures the wall
time of that save+fsync: the "stall" the training loop pays for the
checkpoint.  Run it plainly for the synchronous baseline, and under
`ackpt-run --dir CKPT_DIR` to see the stall ackpt leaves.

stdout carries only JSON lines (scripts/demo parses them):
  {"step": N, "stall_s": S, "bytes": B}   one per checkpoint
  {"durable_s": D}                        under ackpt: ackpt_wait() after the last save
  {"mean_stall_s": M, "checkpoints": K}   at the end
Progress goes to stderr.
"""
import argparse
import ctypes
import json
import os
import sys
import time

import torch


def build_model(size_mib, width):
    per_layer = width * width + width  # fp32 weight + bias
    layers = max(1, round(size_mib * 2**20 / 4 / per_layer))
    mods = []
    for i in range(layers):
        mods.append(torch.nn.Linear(width, width))
        if i != layers - 1:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def save_checkpoint(model, opt, step, path):
    """torch.save, then fsync: the file is on storage when this returns.

    Returns the file's size.  It comes from tell(), not stat(): under ackpt a
    stat of a file with pending writes waits for them, which would hide the
    overlap this demo shows."""
    state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict()}
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def ackpt_wait(timeout_s):
    """Seconds until everything ackpt staged is durable, or None without ackpt."""
    if not os.environ.get("ACKPT_PATHS"):
        return None
    try:
        fn = ctypes.CDLL(None).ackpt_wait
    except AttributeError:
        return None
    fn.argtypes = [ctypes.c_double]
    fn.restype = ctypes.c_int
    t0 = time.perf_counter()
    rc = fn(timeout_s)
    dt = time.perf_counter() - t0
    if rc != 0:
        print(f"demo_train: ackpt_wait returned {rc}", file=sys.stderr)
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt-dir", required=True)
    ap.add_argument("--size-mib", type=float, default=256.0,
                    help="model parameters in MiB (fp32); Adam adds 2x that to each checkpoint")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--every", type=int, default=3, help="checkpoint every K steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    # Same results in both runs, so their checkpoints can be compared byte for byte.
    torch.use_deterministic_algorithms(True)

    os.makedirs(args.ckpt_dir, exist_ok=True)
    model = build_model(args.size_mib, args.width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"demo_train: {nparams / 1e6:.1f}M parameters ({nparams * 4 / 2**20:.0f} MiB), "
          f"{args.steps} steps, checkpoint every {args.every}", file=sys.stderr)

    gen = torch.Generator().manual_seed(args.seed + 1)
    stalls = []
    t_start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, args.width, generator=gen)
        y = torch.randn(args.batch, args.width, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"demo_train: step {step} loss {loss.item():.5f}", file=sys.stderr)

        if step % args.every == 0:
            path = os.path.join(args.ckpt_dir, f"ckpt-step{step:06d}.pt")
            t0 = time.perf_counter()
            size = save_checkpoint(model, opt, step, path)
            stall = time.perf_counter() - t0
            stalls.append(stall)
            print(json.dumps({"step": step, "stall_s": round(stall, 4),
                              "bytes": size}), flush=True)

    durable = ackpt_wait(600.0)
    if durable is not None:
        print(json.dumps({"durable_s": round(durable, 4)}), flush=True)
    mean = sum(stalls) / len(stalls) if stalls else 0.0
    print(json.dumps({"mean_stall_s": round(mean, 4), "checkpoints": len(stalls),
                      "wall_s": round(time.perf_counter() - t_start, 3)}), flush=True)


if __name__ == "__main__":
    main()
