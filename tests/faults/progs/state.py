"""The deterministic training state of iteration i (shared by trainer.py and check_ckpt.py)."""
import torch


def state(i, mib):
    torch.manual_seed(i)
    n = int(mib * (1 << 20) / 4)
    # a few tensors of different sizes, like a model + optimizer
    return {"model": {"embed.weight": torch.randn(n // 2), "layer.0.weight": torch.randn(n // 4),
                      "layer.0.bias": torch.randn(1000)},
            "optimizer": {"exp_avg": torch.randn(n // 4 - 1000)},
            "iteration": torch.tensor(i)}
