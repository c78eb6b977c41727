"""Elementwise add, sub, mul, div and neg, where at most one factor of a product is perturbed.

Sums of two perturbed tensors (residual connections) pass each row to both inputs; a constant
operand (a buffer such as a normalization mean, or a number) becomes part of the bias or scales
the rows.  Broadcasting in the forward pass is undone by summing (`unbroadcast`).
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

from ..patches import Patches, a_dot, a_scale
from .base import LinearOp, const, is_perturbed, unbroadcast
from .registry import UnsupportedOperation, register_op


def _node_shape(A) -> tuple:
    return tuple(A.shape) if isinstance(A, Patches) else tuple(A.shape[2:])


def _full(c, A, like: Tensor) -> Tensor:
    """A constant broadcast to the node's per-example shape with a leading batch dim."""
    c = torch.as_tensor(c, dtype=like.dtype, device=like.device)
    shape = _node_shape(A)
    if c.dim() > len(shape):  # constant with a batch dim
        return c.expand(c.shape[0], *shape) if c.shape[0] != 1 else c.expand(1, *shape)
    return c.expand(*shape).unsqueeze(0)


def _scale_rows(A, c, like):
    c = torch.as_tensor(c, dtype=like.dtype, device=like.device)
    if c.dim() == 0:
        return A.with_patches(A.patches * c) if isinstance(A, Patches) else A * c
    return a_scale(A, _full(c, A, like))


class _AddSub(LinearOp):
    ibp_operands = "binary"  # const() of an unperturbed operand
    supports_patches = True
    sign: float = 1.0

    def ibp(self, a, b, *rest, **kw):
        al, au = a.bounds if is_perturbed(a) else (const(a), const(a))
        bl, bu = b.bounds if is_perturbed(b) else (const(b), const(b))
        alpha = kw.get("alpha", rest[0] if rest else 1)
        if alpha != 1:
            raise UnsupportedOperation(f"add/sub with alpha at node '{self.node.name}'")
        if self.sign > 0:
            return al + bl, au + bu
        return al - bu, au - bl

    def backward_one(self, A, a, b, *rest, **kw):
        out, bias = [], 0
        for v, s in ((a, 1.0), (b, self.sign)):
            if is_perturbed(v):
                vA = A if s > 0 else (A.with_patches(-A.patches) if isinstance(A, Patches) else -A)
                out.append((v, unbroadcast(vA, v.value.shape[1:])))
            else:
                ref = a.value if is_perturbed(a) else b.value
                bias = bias + s * a_dot(A, _full(const(v), A, ref))
        return out, bias


@register_op("Add")
class BoundAdd(_AddSub):
    targets = (operator.add, torch.add, "method:add", operator.iadd)
    sign = 1.0


@register_op("Sub")
class BoundSub(_AddSub):
    targets = (operator.sub, torch.sub, "method:sub", operator.isub)
    sign = -1.0


class _Scale(LinearOp):
    """x * c or x / c for a constant c."""
    ibp_operands = "binary"  # const() of the unperturbed factor

    supports_patches = True
    divide = False

    def _split(self, a, b):
        if is_perturbed(a) and is_perturbed(b):
            raise UnsupportedOperation(
                f"{'division' if self.divide else 'product'} of two perturbed tensors at node "
                f"'{self.node.name}' has no bound rule yet (only products with constants)")
        if self.divide and is_perturbed(b):
            raise UnsupportedOperation(f"division by a perturbed tensor at node '{self.node.name}' "
                                       "has no bound rule")
        return (a, const(b)) if is_perturbed(a) else (b, const(a))

    def ibp(self, a, b, *rest, **kw):
        x, c = self._split(a, b)
        l, u = x.bounds
        lo, up = (l / c, u / c) if self.divide else (l * c, u * c)
        return torch.minimum(lo, up), torch.maximum(lo, up)

    def backward_one(self, A, a, b, *rest, **kw):
        x, c = self._split(a, b)
        c = torch.as_tensor(c, dtype=x.value.dtype, device=x.value.device)
        factor = 1.0 / c if self.divide else c
        return [(x, unbroadcast(_scale_rows(A, factor, x.value), x.value.shape[1:]))], 0


@register_op("Mul")
class BoundMul(_Scale):
    targets = (operator.mul, torch.mul, "method:mul", operator.imul)


@register_op("Div")
class BoundDiv(_Scale):
    targets = (operator.truediv, torch.div, torch.true_divide, "method:div", operator.itruediv)
    divide = True


@register_op("Neg")
class BoundNeg(LinearOp):
    ibp_operands = "unary"
    targets = (operator.neg, torch.neg, "method:neg")
    supports_patches = True

    def ibp(self, x, *args, **kwargs):
        l, u = x.bounds
        return -u, -l

    def backward_one(self, A, x, *args, **kwargs):
        return [(x, A.with_patches(-A.patches) if isinstance(A, Patches) else -A)], 0
