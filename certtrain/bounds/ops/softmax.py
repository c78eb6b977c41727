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
from .registry import register_op


def softmax_guard(y: Tensor, x: Tensor, dim: int) -> Tensor:
    """Marks y = softmax(x, dim) (decomposed) for the bound engine; the value is y."""
    return y


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
    ibp_operands = "binary"

    def _dim(self, x, args, kwargs) -> int:
        d = args[0] if args else kwargs["dim"]
        return int(d) % x.value.dim()

    def ibp(self, y, x, *args, **kwargs):
        yl, yu = y.bounds
        if not is_perturbed(x):
            return yl, yu
        lo, hi = closed_form(*x.bounds, self._dim(x, args, kwargs))
        return torch.maximum(yl, lo), torch.minimum(yu, hi)

    def backward(self, lA, uA, y, x, *args, **kwargs):
        return [(y, lA, uA)], 0, 0
