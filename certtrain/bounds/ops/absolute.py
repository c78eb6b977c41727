"""Absolute value (torch.abs): convex, so the chord is above it on [l, u]; below it any line
through the origin with slope in [-1, 1] (CROWN's adaptive choice: the sign of the larger end;
α-CROWN optimizes the slope)."""
from __future__ import annotations

import torch

from .activation import ElementwiseRelaxOp
from .registry import register_op


@register_op("Abs")
class BoundAbs(ElementwiseRelaxOp):
    targets = (torch.abs, "method:abs")
    monotone_elementwise = False
    alpha_range = (-1.0, 1.0)

    def fn(self, x):
        return x.abs()

    def ibp(self, x, *args, **kwargs):
        l, u = x.bounds
        lo = torch.where((l < 0) & (u > 0), torch.zeros_like(l), torch.minimum(l.abs(), u.abs()))
        return lo, torch.maximum(l.abs(), u.abs())

    def relax(self, l, u):
        one = torch.ones_like(l)
        cross = (l < 0) & (u > 0)
        sign = torch.where(u > -l, one, -one)  # l >= 0: +1 (exact), u <= 0: -1 (exact)
        chord = torch.where(cross, (u + l) / torch.where(cross, u - l, one), sign)
        bu = torch.where(cross, -l - chord * l, torch.zeros_like(l))  # through (l, -l) and (u, u)
        return sign, None, chord, bu

    def rows_to_refine(self, lower, upper):
        return ((lower < 0) & (upper > 0)).flatten(1).any(0)
