"""Parameters and multiply-accumulates of a model at an input size."""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int | None = None) -> int:
    """MACs of one forward pass at batch 1 (conv and linear layers, as torch-pruning counts them)."""
    import torch_pruning as tp

    size = input_size or model.cfg.input_size
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    macs, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, size, size, device=device))
    model.train(was_training)
    return int(macs)
