"""Products of two bounded tensors: the maths shared by elementwise ``x * y`` (`BoundMul`) and
matrix products (`BoundMatMul`).

McCormick planes (McCormick 1976; CROWN for products: Shi et al. 2020, "Robustness Verification for
Transformers", Sec. 3.2).  For x in [xl, xu], y in [yl, yu]:

    lower:  z >= yl x + xl y - xl yl   (P1)      z >= yu x + xu y - xu yu   (P2)
    upper:  z <= yu x + xl y - xl yu   (P3)      z <= yl x + xu y - xu yl   (P4)

Each holds on the whole box (e.g. P1: xy - yl x - xl y + xl yl = (x - xl)(y - yl) >= 0), so any
convex combination does too: the lower plane is a P1 + (1 - a) P2 and the upper plane a P3 + (1 - a)
P4 with a in [0, 1].  a = 1 (P1 / P3) is auto_LiRPA's choice and the default; α-CROWN optimizes a
per output element and spec row (one element of one row uses only one of the two planes, picked
by the sign of its coefficient, so one a serves both).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def corner_interval(xl: Tensor, xu: Tensor, yl: Tensor, yu: Tensor) -> tuple[Tensor, Tensor]:
    """Exact interval of x·y over the box: the extreme corner products (broadcasting)."""
    p1, p2, p3, p4 = xl * yl, xl * yu, xu * yl, xu * yu
    return torch.minimum(torch.minimum(p1, p2), torch.minimum(p3, p4)), \
        torch.maximum(torch.maximum(p1, p2), torch.maximum(p3, p4))


def square_interval(l: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Exact interval of x² over [l, u]."""
    ll, uu = l * l, u * u
    lo = torch.where((l <= 0) & (u >= 0), torch.zeros_like(l), torch.minimum(ll, uu))
    return lo, torch.maximum(ll, uu)


def planes(xl: Tensor, xu: Tensor, yl: Tensor, yu: Tensor, a: Optional[Tensor] = None):
    """(lower plane, upper plane), each (coefficient of x, coefficient of y, constant), at
    interpolation ``a`` (None: a = 1, planes P1 and P3)."""
    if a is None:
        return (yl, xl, -xl * yl), (yu, xl, -xl * yu)
    b = 1 - a
    lower = (a * yl + b * yu, a * xl + b * xu, -(a * xl * yl + b * xu * yu))
    upper = (a * yu + b * yl, a * xl + b * xu, -(a * xl * yu + b * xu * yl))
    return lower, upper


def select(A: Tensor, pos_plane, neg_plane):
    """Rows' coefficients on x and y and the rows' constants (B, N) when A's positive entries take
    ``pos_plane`` and its negative ones ``neg_plane`` (each (cx, cy, c), broadcastable to A's
    element shape, optionally with a row dimension)."""
    Ap, An = A.clamp(min=0), A.clamp(max=0)

    def rows(t):  # (B, *shape) -> (B, 1, *shape); a row dim is already there
        return t if t.dim() == A.dim() else t.unsqueeze(1)

    (px, py, pc), (nx, ny, nc) = ([rows(t) for t in pos_plane], [rows(t) for t in neg_plane])
    Ax = Ap * px + An * nx
    Ay = Ap * py + An * ny
    bias = (Ap * pc + An * nc).flatten(2).sum(-1)
    return Ax, Ay, bias
