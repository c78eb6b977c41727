"""Reductions over non-batch dimensions: sum and mean are linear; logsumexp is convex and gets
its own two planes (used to bound the cross-entropy loss itself, "loss fusion")."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import BoundOp, LinearOp, const
from .registry import UnsupportedOperation, register_op


def _dims(op, x, args, kwargs) -> tuple[tuple[int, ...], bool]:
    dim = args[0] if args else kwargs.get("dim")
    keepdim = bool(const(args[1]) if len(args) > 1 else kwargs.get("keepdim", False))
    nd = x.value.dim()
    if dim is None:
        raise UnsupportedOperation(f"{op.node.name}: a reduction over every dimension (batch included) "
                                   "has no bound rule; pass dim=")
    dims = tuple(sorted(int(d) % nd for d in (dim if isinstance(dim, (tuple, list)) else (dim,))))
    if 0 in dims:
        raise UnsupportedOperation(f"{op.node.name}: reduction over the batch dimension has no bound rule")
    return dims, keepdim


def _expand_back(A: Tensor, in_shape, dims, keepdim) -> Tensor:
    """Adjoint of a reduction: each reduced output coefficient is copied to every input element."""
    if not keepdim:
        for d in dims:
            A = A.unsqueeze(d + 1)
    return A.expand(*A.shape[:2], *in_shape)


@register_op("Sum")
class BoundSum(LinearOp):
    ibp_operands = "unary"  # _dims()/_scale(): x.value.dim()/shape
    targets = (torch.sum, "method:sum", torch.mean, "method:mean")

    @property
    def is_mean(self) -> bool:
        return self.node.target in (torch.mean, "mean")

    def _scale(self, x, dims):
        n = 1
        for d in dims:
            n *= x.value.shape[d]
        return 1.0 / n if self.is_mean else 1.0

    def ibp(self, x, *args, **kwargs):
        dims, keep = _dims(self, x, args, kwargs)
        l, u = x.bounds
        s = self._scale(x, dims)
        return l.sum(dims, keepdim=keep) * s, u.sum(dims, keepdim=keep) * s

    def backward_one(self, A, x, *args, **kwargs):
        dims, keep = _dims(self, x, args, kwargs)
        nA = _expand_back(A, x.value.shape[1:], dims, keep) * self._scale(x, dims)
        return [(x, nA)], 0


@register_op("LogSumExp")
class BoundLogSumExp(BoundOp):
    """f(m) = log sum_j exp(m_j) over one dimension.

    Lower plane: f is convex, so its tangent plane at the clean point p is below it:
    f(m) >= f(p) + softmax(p) . (m - p).
    Upper plane (composition, as auto_LiRPA's loss fusion, made overflow-free by a shift): with
    c = max_j u_j, each exp(m_j - c) <= its chord on [l_j - c, u_j - c] (convexity), so
    sum_j exp(m_j - c) <= S(m), an affine function in [s_l, s_u]; log is concave, so
    log S <= log s0 + (S - s0) / s0 for any s0 > 0.  Hence f(m) <= c + log s0 - 1 + S(m) / s0.
    """
    ibp_operands = "unary"  # _dim(): x.value.dim()
    targets = (torch.logsumexp, "method:logsumexp")
    relaxed_inputs = (0,)

    def _dim(self, x, args, kwargs):
        dims, keep = _dims(self, x, args, kwargs)
        if len(dims) != 1 or x.value.dim() != 2:
            raise UnsupportedOperation(f"{self.node.name}: logsumexp has a bound rule for (batch, K) "
                                       "inputs reduced over dim 1")
        return keep

    def ibp(self, x, *args, **kwargs):
        keep = self._dim(x, args, kwargs)
        l, u = x.bounds
        return torch.logsumexp(l, 1, keepdim=keep), torch.logsumexp(u, 1, keepdim=keep)

    def planes(self, x):
        l, u = x.bounds
        p = x.value.detach().clamp(min=l, max=u)
        sm = torch.softmax(p, 1)
        lower_d, lower_b = sm, torch.logsumexp(p, 1) - (sm * p).sum(1)
        c = u.max(1, keepdim=True).values
        ls, us = l - c, u - c
        el, eu = torch.exp(ls), torch.exp(us)
        width = us - ls
        flat = width <= 0
        a = torch.where(flat, eu, (eu - el) / torch.where(flat, torch.ones_like(width), width))
        # Tangent point of log: the chord sum at the clean point (inside [s_l, s_u]).
        s0 = (el + a * (p - l)).sum(1, keepdim=True).clamp(min=torch.finfo(l.dtype).tiny)
        upper_d = a / s0
        upper_b = (c + torch.log(s0) - 1).squeeze(1) + ((el - a * l) / s0).sum(1)
        return lower_d, lower_b, upper_d, upper_b

    def backward(self, lA, uA, x, *args, **kwargs):
        self._dim(x, args, kwargs)
        ld, lb, ud, ub = self.planes(x)

        def side(A, d_pos, b_pos, d_neg, b_neg):
            if A is None:
                return None, 0
            alpha = A.reshape(A.shape[0], A.shape[1])  # one coefficient per row
            pos, neg = alpha.clamp(min=0), alpha.clamp(max=0)
            nA = pos.unsqueeze(-1) * d_pos.unsqueeze(1) + neg.unsqueeze(-1) * d_neg.unsqueeze(1)
            return nA, pos * b_pos.unsqueeze(1) + neg * b_neg.unsqueeze(1)

        nl, lbias = side(lA, ld, lb, ud, ub)
        nu, ubias = side(uA, ud, ub, ld, lb)
        return [(x, nl, nu)], lbias, ubias
