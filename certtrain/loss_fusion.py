"""Loss fusion: bound the cross-entropy loss itself instead of the K-1 margins.

CE(z, y) = log sum_j exp(z_j - z_y).  Wrapping the model so that its output is this loss lets
CROWN start its backward pass from one row per example instead of K-1 (Xu et al. 2020, Sec. 3.4),
which is what makes CROWN-IBP affordable with many classes.  The upper bound of the wrapped
output is a guaranteed upper bound of the worst-case loss over the perturbation set.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class CrossEntropyBound(nn.Module):
    """model(x) -> per-example cross-entropy with the labels given as a one-hot tensor, (B, 1)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, onehot: Tensor) -> Tensor:
        z = self.model(x)
        margins = z - (z * onehot).sum(1, keepdim=True)  # z_j - z_y
        return torch.logsumexp(margins, 1, keepdim=True)


def one_hot(y: Tensor, num_classes: int, like: Tensor) -> Tensor:
    return torch.nn.functional.one_hot(y, num_classes).to(like.dtype)
