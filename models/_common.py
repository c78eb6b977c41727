"""Small helpers shared by the model zoo (shape bookkeeping, the common wrapper)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["FeatureClassifier", "as_shape", "as_int_tuple", "conv_out", "norm2d", "norm1d"]


def as_shape(in_shape: Iterable[int]) -> tuple[int, int, int]:
    """Validate ``in_shape`` as (C, H, W) and return it as a tuple of ints.

    Accepts any iterable (e.g. a list or an OmegaConf ``ListConfig`` coming from Hydra).
    """
    shape = tuple(int(v) for v in in_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"in_shape must be (C, H, W) with positive entries, got {tuple(in_shape)!r}")
    return shape  # type: ignore[return-value]


def as_int_tuple(values: Iterable[int] | int, name: str) -> tuple[int, ...]:
    """Turn an int or an iterable of ints (list, tuple, ListConfig) into a tuple of ints."""
    if isinstance(values, int):
        return (values,)
    out = tuple(int(v) for v in values)
    if any(v < 0 for v in out):
        raise ValueError(f"{name} must be non-negative, got {out!r}")
    return out


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Spatial output size of a convolution / pooling window along one axis."""
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(
            f"input of size {size} is too small for kernel={kernel}, stride={stride}, padding={padding}"
        )
    return out


def norm2d(channels: int, bn: bool) -> nn.Module:
    """``BatchNorm2d(channels)`` or ``Identity`` when batch norm is disabled."""
    return nn.BatchNorm2d(channels) if bn else nn.Identity()


def norm1d(features: int, bn: bool) -> nn.Module:
    """``BatchNorm1d(features)`` or ``Identity`` when batch norm is disabled."""
    return nn.BatchNorm1d(features) if bn else nn.Identity()


class FeatureClassifier(nn.Module):
    """``classifier(torch.flatten(features(x), 1))`` — the skeleton shared by every model.

    ``features`` maps (B, C, H, W) to a 4-d tensor (or is empty for an MLP), ``classifier``
    maps the flattened features to logits. ``in_shape`` and ``num_classes`` are kept as plain
    attributes for the caller's convenience.
    """

    def __init__(
        self,
        features: nn.Module,
        classifier: nn.Module,
        in_shape: tuple[int, int, int],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.in_shape = tuple(in_shape)
        self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)
