"""ReLU and LeakyReLU.

Unstable neurons (l < 0 < u) get the chord as upper line; the lower line's slope is chosen by
``bound_opts['relu']``: "adaptive" (CROWN-Ada, Zhang et al. 2018: 1 if u > -l else 0, the
default, as in auto_LiRPA), "same-slope" (the chord's slope) or "zero".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activation import ElementwiseRelaxOp
from .registry import register_op


def _lower_slope(mode: str, l, u, chord, low: float):
    if mode == "adaptive":
        return torch.where(u > -l, torch.ones_like(l), torch.full_like(l, low))
    if mode == "same-slope":
        return chord
    if mode == "zero":
        return torch.full_like(l, low)
    raise ValueError(f"unknown relu lower-slope option {mode!r}: use 'adaptive', 'same-slope' or 'zero'")


@register_op("ReLU")
class BoundReLU(ElementwiseRelaxOp):
    targets = (nn.ReLU, F.relu, torch.relu, "method:relu")
    alpha_range = (0.0, 1.0)
    alpha_row_groups = True

    def fn(self, x):
        return torch.relu(x)

    def relax(self, l, u):
        unstable = (l < 0) & (u > 0)
        active = l >= 0
        one, zero = torch.ones_like(l), torch.zeros_like(l)
        # Chord from (l, 0) to (u, u): slope u / (u - l), intercept -l * slope.
        chord = torch.where(unstable, u / torch.where(unstable, u - l, one), zero)
        du = torch.where(active, one, chord)
        bu = -l * chord
        dl = torch.where(active, one, torch.where(unstable, _lower_slope(
            self.opts["relu"], l, u, chord, 0.0), zero))
        return dl, None, du, bu

    def rows_to_refine(self, lower, upper):
        return ((lower < 0) & (upper > 0)).flatten(1).any(0)


@register_op("LeakyReLU")
class BoundLeakyReLU(ElementwiseRelaxOp):
    targets = (nn.LeakyReLU, F.leaky_relu)
    alpha_row_groups = True

    @property
    def alpha_range(self) -> tuple[float, float]:
        # f(x) = max(x, a x) is convex: a line k x through the origin is below it iff a <= k <= 1.
        return (self.slope, 1.0)

    @property
    def slope(self) -> float:
        if self.module is not None:
            s = self.module.negative_slope
        else:
            s = self.node.args[1] if len(self.node.args) > 1 else self.node.kwargs.get("negative_slope", 0.01)
        if not 0 <= s <= 1:
            raise ValueError(f"LeakyReLU bound rule needs 0 <= negative_slope <= 1, got {s}")
        return s

    def fn(self, x):
        return F.leaky_relu(x, self.slope)

    def relax(self, l, u):
        a = self.slope
        unstable = (l < 0) & (u > 0)
        active = l >= 0
        one = torch.ones_like(l)
        # Chord from (l, a l) to (u, u).
        chord = torch.where(unstable, (u - a * l) / torch.where(unstable, u - l, one), one)
        du = torch.where(active, one, torch.where(unstable, chord, a * one))
        bu = torch.where(unstable, a * l - chord * l, torch.zeros_like(l))
        dl = torch.where(active, one, torch.where(unstable, _lower_slope(
            self.opts["relu"], l, u, chord, a), a * one))
        return dl, None, du, bu

    def rows_to_refine(self, lower, upper):
        return ((lower < 0) & (upper > 0)).flatten(1).any(0)
