"""Softmax's closed-form interval, kept next to its decomposition.

`certtrain.bounds.decompose` rewrites ``softmax(x, dim)`` as ``e = exp(x - c)``,
``y = e * reciprocal(sum(e, dim))`` (c: the clean maximum, a constant; softmax is shift-invariant,
so the graph computes softmax exactly for every x) and ends it with ``softmax_guard(y, x, dim)``:
the value and the linear bounds are y's (CROWN goes through the decomposition), the interval is y's
intersected with the exact per-element one (Wei et al. 2023 / Shi et al. 2020):

    softmax_i  >=  1 / (1 + Σ_{j≠i} exp(u_j - l_i)),      softmax_i  <=  1 / (1 + Σ_{j≠i} exp(l_j - u_i)).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import BoundOp, is_perturbed
from .power import BoundReciprocal
from .registry import register_op


def softmax_guard(y: Tensor, x: Tensor, dim: int) -> Tensor:
    """Marks y = softmax(x, dim) (decomposed) for the bound engine; the value is y."""
    return y


def positive_reciprocal(s: Tensor) -> Tensor:
    """1 / s for a sum of exponentials (s > 0 for every point, though its lower bound may underflow
    to 0 when the inputs' box is wider than exp's range)."""
    return torch.reciprocal(s)


@register_op("PositiveReciprocal")
class BoundPositiveReciprocal(BoundReciprocal):
    """1 / s with s > 0 known: where s's lower bound underflowed to 0 the upper bound is +inf (and
    the lines constant), instead of an error; the guard then keeps softmax's closed form."""

    targets = (positive_reciprocal,)

    def _check_domain(self, l, p):
        pass

    def ibp(self, x, *args, **kwargs):
        l, u = x.bounds
        return torch.reciprocal(u), torch.where(l > 0, torch.reciprocal(l.clamp(min=torch.finfo(l.dtype).tiny)),
                                                torch.full_like(l, torch.inf))

    def relax(self, l, u):
        ok = l > 0
        if bool(ok.all()):
            return super().relax(l, u)
        safe_l = torch.where(ok, l, u)  # any positive stand-in; replaced below
        dl, bl, du, bu = super().relax(safe_l, u)
        zero = torch.zeros_like(l)
        return (torch.where(ok, dl, zero), torch.where(ok, bl, torch.reciprocal(u)),
                torch.where(ok, du, zero), torch.where(ok, bu, torch.full_like(l, torch.inf)))

    alpha_range = None


def closed_form(l: Tensor, u: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Per-element interval of softmax over [l, u] (the sums over j ≠ i taken directly, without
    a cancelling subtraction)."""
    n = l.shape[dim]
    l, u = l.movedim(dim, -1), u.movedim(dim, -1)
    off = ~torch.eye(n, dtype=torch.bool, device=l.device)
    # d[..., i, j] = u_j - l_i (lower) and l_j - u_i (upper), j ≠ i
    dl = torch.where(off, u.unsqueeze(-2) - l.unsqueeze(-1), -torch.inf)
    du = torch.where(off, l.unsqueeze(-2) - u.unsqueeze(-1), -torch.inf)
    lo = torch.exp(-torch.logsumexp(dl, -1).clamp(min=-1e30).logaddexp(torch.zeros((), dtype=l.dtype)))
    hi = torch.exp(-torch.logsumexp(du, -1).clamp(min=-1e30).logaddexp(torch.zeros((), dtype=l.dtype)))
    return lo.movedim(-1, dim), hi.movedim(-1, dim)


@register_op("SoftmaxGuard")
class BoundSoftmaxGuard(BoundOp):
    targets = (softmax_guard,)
    ibp_operands = "binary"  # backward reads the interval bounds of y and the logits, which every walk has

    def _dim(self, x, args, kwargs) -> int:
        d = args[0] if args else kwargs["dim"]
        return int(d) % x.value.dim()

    def ibp(self, y, x, *args, **kwargs):
        yl, yu = y.bounds
        if not is_perturbed(x):
            return yl, yu
        lo, hi = closed_form(*x.bounds, self._dim(x, args, kwargs))
        return torch.fmax(yl, lo), torch.fmin(yu, hi)  # fmax / fmin: a NaN of the decomposition yields to the closed form

    def backward(self, lA, uA, y, x, *args, **kwargs):
        yl, yu = y.bounds
        if bool(torch.isfinite(yl).all() and torch.isfinite(yu).all()) or not is_perturbed(x):
            return [(y, lA, uA)], 0, 0
        # the decomposition overflowed: the closed-form interval as constant lines
        from ..patches import to_dense
        lo, hi = closed_form(*x.bounds, self._dim(x, args, kwargs))
        lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
        biases = []
        for A, upper in ((lA, False), (uA, True)):
            if A is None:
                biases.append(0)
                continue
            A = to_dense(A)
            pos, neg = A.clamp(min=0), A.clamp(max=0)
            b = pos * hi + neg * lo if upper else pos * lo + neg * hi
            biases.append(b.flatten(2).sum(-1))
        return [], biases[0], biases[1]
