"""Fully-connected ReLU networks."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

from torch import nn

from ._common import FeatureClassifier, as_int_tuple, as_shape

__all__ = ["MLP", "mlp"]


class MLP(FeatureClassifier):
    """Flatten -> [Linear -> activation] * len(hidden) -> Linear."""


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def mlp(
    in_shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    hidden: Sequence[int] = (256, 256),
    activation: str = "relu",
) -> MLP:
    """Fully-connected network: flatten -> (Linear, activation) per ``hidden`` size -> Linear.

    Plain MLP baseline (cf. the MNIST MLPs of Wong & Kolter 2018 / Zhang et al. 2020, CROWN-IBP);
    ``activation``: relu (default), tanh or sigmoid.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    shape = as_shape(in_shape)
    hidden = as_int_tuple(hidden, "hidden")
    layers: list[nn.Module] = []
    width = prod(shape)
    for h in hidden:
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return MLP(nn.Sequential(), nn.Sequential(*layers), shape, num_classes)
