"""Deterministic per-rank state for the barrier test jobs (shared by the job
programs and the checkers, which rebuild the expected state to compare)."""
import torch


def rank_state(rank, mib, seed, ntensors=4):
    """The state dict rank `rank` saves: ntensors float32 tensors summing to
    about `mib` MiB, under keys unique to the rank (so every rank writes data
    of its own), plus a small replicated tensor and a scalar."""
    g = torch.Generator().manual_seed(seed * 1000003 + rank)
    per = max(1, (int(mib * (1 << 20)) // 4) // ntensors)
    sd = {}
    for j in range(ntensors):
        sd["r%d.w%d" % (rank, j)] = torch.randn(per, generator=g)
    sd["r%d.b" % rank] = torch.arange(1000, dtype=torch.int64) * (rank + 1) + seed
    sd["shared.emb"] = torch.ones(256, 64) * seed  # replicated: DCP dedups it
    return sd


def full_state(world, mib, seed, ntensors=4):
    """Everything a world-rank save of rank_state holds (what a single loader
    asks for)."""
    sd = {}
    for r in range(world):
        sd.update(rank_state(r, mib, seed, ntensors))
    return sd


def zeros_like_state(sd):
    return {k: torch.zeros_like(v) for k, v in sd.items()}


def diff_states(want, got):
    """List of keys whose tensors differ (dtype, shape or values)."""
    bad = []
    for k, v in want.items():
        w = got.get(k)
        if w is None or w.dtype != v.dtype or w.shape != v.shape or not torch.equal(v, w):
            bad.append(k)
    return bad
