"""Elementwise add, sub, mul, div and neg, where at most one factor of a product is perturbed.

Sums of two perturbed tensors (residual connections) pass each row to both inputs; a constant
operand (a buffer such as a normalization mean, or a number) becomes part of the bias or scales
the rows.  Broadcasting in the forward pass is undone by summing (`unbroadcast`).
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor, fx

from ..patches import Patches, a_dot, a_scale

from . import bilinear
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


def _affine_image(x, scale, shift):
    """The set image of ``x`` through ``x * scale + shift`` (constants), when the result keeps x's
    shape (broadcasting x up would copy coordinates, which a set of independent coordinates cannot
    express: an L0 budget counts each original coordinate once)."""
    if x.image is None:
        return None
    ref = x.value
    scale = torch.as_tensor(scale, dtype=ref.dtype, device=ref.device)
    shift = torch.as_tensor(shift, dtype=ref.dtype, device=ref.device)
    try:
        if torch.broadcast_shapes(ref.shape, scale.shape, shift.shape) != ref.shape:
            return None
    except RuntimeError:
        return None
    return x.image.affine(scale, shift)


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

    def ibp_image(self, a, b, *rest, **kw):
        """x ± c and c ± x keep the set's form (e.g. positional embeddings, a normalization mean)."""
        if is_perturbed(a) == is_perturbed(b) or kw.get("alpha", rest[0] if rest else 1) != 1:
            return None
        if is_perturbed(a):
            return _affine_image(a, 1.0, self.sign * const(b))
        return _affine_image(b, self.sign, const(a))

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

    def ibp_image(self, a, b, *rest, **kw):
        """x * c and x / c keep the set's form (e.g. a normalization's division by std)."""
        if is_perturbed(a) == is_perturbed(b) or (self.divide and is_perturbed(b)):
            return None
        x, c = self._split(a, b)
        c = torch.as_tensor(c, dtype=x.value.dtype, device=x.value.device)
        return _affine_image(x, 1.0 / c if self.divide else c, 0.0)

    def backward_one(self, A, a, b, *rest, **kw):
        x, c = self._split(a, b)
        c = torch.as_tensor(c, dtype=x.value.dtype, device=x.value.device)
        factor = 1.0 / c if self.divide else c
        return [(x, unbroadcast(_scale_rows(A, factor, x.value), x.value.shape[1:]))], 0


@register_op("Mul")
class BoundMul(_Scale):
    """x * c (linear, as `_Scale`) or x * y with both bounded (McCormick planes, `bilinear`; x * x is
    a square: exact IBP, tangent below and chord above)."""

    targets = (operator.mul, torch.mul, "method:mul", operator.imul)
    alpha_range = (0.0, 1.0)

    @property
    def relaxed_inputs(self):  # both operands' bounds, where both may depend on an input
        a = self.node.args[:2]
        both = len(a) == 2 and all(isinstance(v, fx.Node) and v.op != "get_attr" for v in a)
        return (0, 1) if both else ()

    def _both(self, a, b) -> bool:
        return is_perturbed(a) and is_perturbed(b)

    def ibp(self, a, b, *rest, **kw):
        if not self._both(a, b):
            return super().ibp(a, b, *rest, **kw)
        if a is b:
            return bilinear.square_interval(*a.bounds)
        return bilinear.corner_interval(*a.bounds, *b.bounds)

    def _square_lines(self, l, u, t=None):
        """x² on [l, u]: tangent at l + t (u - l) below (t = 1/2: the midpoint), chord above."""
        per_row = t is not None and t.dim() == l.dim() + 1
        lo, up = (l.unsqueeze(1), u.unsqueeze(1)) if per_row else (l, u)
        d = lo + (0.5 if t is None else t) * (up - lo)
        chord_d, chord_b = (l + u), -l * u  # through (l, l²) and (u, u²)
        if per_row:
            chord_d, chord_b = chord_d.unsqueeze(1).expand_as(d), chord_b.unsqueeze(1).expand_as(d)
        return 2 * d, -d * d, chord_d, chord_b

    def _product(self, lA, uA, a, b, alpha=None):
        from ..patches import to_dense
        from .activation import relax_backward

        lA = to_dense(lA) if lA is not None else None
        uA = to_dense(uA) if uA is not None else None
        if a is b:  # a square
            l, u = a.bounds
            nl = nu = None
            lbias = ubias = 0
            if lA is not None:
                nl, lbias, _, _ = relax_backward(lA, None, *self._square_lines(l, u, None if alpha is None else alpha[0]))
            if uA is not None:
                _, _, nu, ubias = relax_backward(None, uA, *self._square_lines(l, u, None if alpha is None else alpha[1]))
            return [(a, nl, nu)], lbias, ubias
        xl, xu = a.bounds
        yl, yu = b.bounds
        out, biases = {"x": [None, None], "y": [None, None]}, [0, 0]
        for side, A in enumerate((lA, uA)):
            if A is None:
                continue
            t = None if alpha is None else alpha[side]
            if t is not None and t.dim() == xl.dim() + 1:  # per-row α: the bounds get a row dim
                lo_, up_ = bilinear.planes(*(v.unsqueeze(1) for v in (xl, xu, yl, yu)), t)
            else:
                lo_, up_ = bilinear.planes(xl, xu, yl, yu, t)
            pos, neg = (lo_, up_) if side == 0 else (up_, lo_)
            Ax, Ay, bias = bilinear.select(A, pos, neg)
            out["x"][side] = unbroadcast(Ax, a.value.shape[1:])
            out["y"][side] = unbroadcast(Ay, b.value.shape[1:])
            biases[side] = bias
        return [(a, *out["x"]), (b, *out["y"])], biases[0], biases[1]

    def backward(self, lA, uA, a, b, *rest, **kw):
        if not self._both(a, b):
            return super().backward(lA, uA, a, b, *rest, **kw)
        return self._product(lA, uA, a, b)

    def _out_like(self, a, b):
        return torch.broadcast_tensors(const(a), const(b))[0]

    def alpha_free(self, a, b, *rest, **kw):
        if not self._both(a, b):  # a linear scaling: nothing to optimize
            return torch.zeros((), dtype=torch.bool)
        if a is b:
            l, u = a.bounds
            return u > l
        xl, xu = a.bounds
        yl, yu = b.bounds
        return (xu > xl) & (yu > yl)  # broadcast to the product's shape

    def alpha_start(self, a, b, *rest, **kw):
        ref = self._out_like(a, b)
        return torch.full_like(ref, 0.5) if a is b else torch.ones_like(ref)

    def backward_alpha(self, lA, uA, alpha, a, b, *rest, **kw):
        if not self._both(a, b):
            return super().backward(lA, uA, a, b, *rest, **kw)
        return self._product(lA, uA, a, b, alpha)


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
