"""Input normalisation as a module, so that models take inputs in pixel space [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Normalize"]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with ``mean``/``std`` stored as (1, C, 1, 1) buffers.

    Put it in front of a model (``nn.Sequential(Normalize(mean, std), model)``) so that the data and the
    perturbation set stay in pixel space; a traced graph then shows a ``sub`` and a ``truediv`` by buffers.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self, mean: Sequence[float] | float | torch.Tensor, std: Sequence[float] | float | torch.Tensor
    ) -> None:
        super().__init__()
        mean_t = torch.as_tensor(_to_list(mean), dtype=torch.get_default_dtype()).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(_to_list(std), dtype=torch.get_default_dtype()).reshape(1, -1, 1, 1)
        if mean_t.shape[1] != std_t.shape[1] and 1 not in (mean_t.shape[1], std_t.shape[1]):
            raise ValueError(f"mean has {mean_t.shape[1]} channels but std has {std_t.shape[1]}")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {std_t.flatten().tolist()}")
        channels = max(mean_t.shape[1], std_t.shape[1])
        self.register_buffer("mean", mean_t.expand(1, channels, 1, 1).clone())
        self.register_buffer("std", std_t.expand(1, channels, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _to_list(v: Sequence[float] | float | torch.Tensor) -> list[float]:
    if isinstance(v, torch.Tensor):
        return v.detach().flatten().tolist()
    if isinstance(v, (int, float)):
        return [float(v)]
    return [float(x) for x in v]
