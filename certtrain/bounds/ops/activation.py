"""Shared machinery for elementwise nonlinearities bounded by two lines per neuron.

A relaxation gives, for every neuron with input in [l, u], lines
``dl * x + bl <= f(x) <= du * x + bu``.  Backward (CROWN, Zhang et al. 2018, Thm. 3.2): a row's
positive coefficients take the lower line for a lower bound and the upper line for an upper bound;
negative coefficients take the other line.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..patches import LinearA, a_dot, a_map, a_scale
from .base import BoundOp

Lines = tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]


def _pos(A):
    return a_map(A, lambda t: t.clamp(min=0))


def _neg(A):
    return a_map(A, lambda t: t.clamp(max=0))


def relax_backward(A: Optional[LinearA], d_pos, b_pos, d_neg, b_neg):
    """Coefficients and constant for one side: positive entries use (d_pos, b_pos), negative
    entries use (d_neg, b_neg)."""
    if A is None:
        return None, 0
    pos, neg = _pos(A), _neg(A)
    nA = a_scale(pos, d_pos) + a_scale(neg, d_neg)
    bias = 0
    if b_pos is not None:
        bias = bias + a_dot(pos, b_pos)
    if b_neg is not None:
        bias = bias + a_dot(neg, b_neg)
    return nA, bias


class ElementwiseRelaxOp(BoundOp):
    """Base of monotone non-decreasing elementwise nonlinearities f."""

    supports_patches = True
    relaxed_inputs = (0,)

    def fn(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def relax(self, l: Tensor, u: Tensor) -> Lines:
        raise NotImplementedError

    def ibp(self, x, *args, **kwargs):
        l, u = x.bounds
        return self.fn(l), self.fn(u)

    def backward(self, lA, uA, x, *args, **kwargs):
        dl, bl, du, bu = self.relax(*x.bounds)
        nl, lbias = relax_backward(lA, dl, bl, du, bu)
        nu, ubias = relax_backward(uA, du, bu, dl, bl)
        return [(x, nl, nu)], lbias, ubias
