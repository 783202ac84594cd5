"""The work every system is measured on: a transformer-shaped state dict and
the unmodified save calls a careful user writes (save, then fsync every
written file and the directory).

The same functions run without the preload (the synchronous system), under
ackpt-run (ackpt: the script is not changed, only the launcher), and into
/dev/shm without fsync (the floor: the program's own serialization plus one
copy into memory, which no transparent tool can beat).
"""
import os

import torch

FORMATS = ("torch", "safetensors", "dcp1", "dcp2")
FORMAT_LABEL = {
    "torch": "torch.save",
    "safetensors": "safetensors save_file",
    "dcp1": "DCP save, 1 rank",
    "dcp2": "DCP save, 2 ranks",
}
N_LAYERS = 16


def _shape(total_bytes):
    """Hidden size, layers and vocabulary that make a fp32 state dict of
    about total_bytes: two large embedding matrices, then per layer four
    attention projections and two MLP matrices (medium), and many small
    biases and norm weights."""
    d = 256
    while 12 * (2 * d) ** 2 * 4 * N_LAYERS <= 0.75 * total_bytes:
        d *= 2
    layer = 12 * d * d * 4 + 13 * d * 4
    layers = max(1, min(N_LAYERS, int(0.75 * total_bytes // layer)))
    vocab = max(1, int((total_bytes - layers * layer - 2 * d * 4) // (2 * d * 4)))
    return d, layers, vocab


def make_state_dict(total_bytes, rank=0, world=1, seed=0):
    """Deterministic content (identical in every process that asks for the same
    size), filled by copying one random block rather than by a slow RNG per
    element.  With world > 1 each rank gets its own keys (no replication), so
    the ranks together write about total_bytes."""
    per_rank = total_bytes // world
    d, layers, vocab = _shape(per_rank)
    g = torch.Generator().manual_seed(seed + rank)
    block = torch.rand(1 << 22, generator=g)  # 16 MiB of fp32

    def t(*shape):
        x = torch.empty(*shape)
        flat = x.view(-1)
        for off in range(0, flat.numel(), block.numel()):
            n = min(block.numel(), flat.numel() - off)
            flat[off:off + n].copy_(block[:n])
        return x

    p = "r%d." % rank if world > 1 else ""
    sd = {p + "embed.weight": t(vocab, d)}
    for i in range(layers):
        k = "%slayers.%d." % (p, i)
        for name in ("q", "k", "v", "o"):
            sd[k + "attn.%s.weight" % name] = t(d, d)
            sd[k + "attn.%s.bias" % name] = t(d)
        sd[k + "norm1.weight"] = t(d)
        sd[k + "norm1.bias"] = t(d)
        sd[k + "mlp.fc1.weight"] = t(4 * d, d)
        sd[k + "mlp.fc1.bias"] = t(4 * d)
        sd[k + "mlp.fc2.weight"] = t(d, 4 * d)
        sd[k + "mlp.fc2.bias"] = t(d)
        sd[k + "norm2.weight"] = t(d)
        sd[k + "norm2.bias"] = t(d)
    sd[p + "norm.weight"] = t(d)
    sd[p + "lm_head.weight"] = t(vocab, d)
    return sd


def state_bytes(sd):
    return sum(v.numel() * v.element_size() for v in sd.values() if isinstance(v, torch.Tensor))


def touch(sd, step):
    """A training step changed the weights: make this save's bytes differ from
    the last one's without spending a full pass over memory."""
    for v in sd.values():
        v.view(-1)[0] = float(step)


def fsync_path(path, flags=os.O_WRONLY):
    # The file was written by a library that takes a path (safetensors), so
    # the careful user reopens it to fsync.  Under ackpt this reopen (O_WRONLY
    # or O_RDONLY alike) waits until the file's pending writes are done, which
    # makes such a save synchronous: see bench/RESULTS.md.
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_torch(sd, path, durable=True):
    with open(path, "wb") as f:
        torch.save(sd, f)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    if durable:
        fsync_dir(os.path.dirname(path))


def save_safetensors(sd, path, durable=True):
    from safetensors.torch import save_file

    save_file(sd, path)
    if durable:
        fsync_path(path)
        fsync_dir(os.path.dirname(path))


def save_dcp(sd, path, durable=True, process_group=None):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    # DCP fsyncs each data file and .metadata itself (sync_files=True) and
    # renames .metadata.tmp into place; the directory fsync is the user's.
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(path, sync_files=durable),
             process_group=process_group)
    if durable and (not dist.is_initialized() or dist.get_rank() == 0):
        fsync_dir(path)
        fsync_dir(os.path.dirname(path))


def saver(fmt):
    return {"torch": save_torch, "safetensors": save_safetensors,
            "dcp1": save_dcp, "dcp2": save_dcp}[fmt]


def ckpt_name(fmt, step):
    return {"torch": "step%d.pt", "safetensors": "step%d.safetensors"}.get(fmt, "step%d") % step
