"""Matrix products ``x @ y`` (``torch.matmul``, ``bmm``, ``@``) with broadcasting batch dims.

One operand constant: linear (IBP x_c @ C, |x_r| @ |C|; backward A @ Cᵀ or Cᵀ @ A).  Both bounded
(attention's Q Kᵀ and P V): IBP by the exact per-term corner products summed over the inner
dimension when that fits ``memory_budget`` (B·N·K·M elements), else the midpoint-radius form
z_c = x_c y_c, z_r = |x_c| y_r + x_r |y_c| + x_r y_r (sound, at most a little looser); CROWN by the
McCormick planes of every term (`bilinear`), written as matrix products so nothing of size
batch × out × in is built:

    A_x = (A⁺α + A⁻(1-α)) y_lᵀ + (A⁺(1-α) + A⁻α) y_uᵀ        (lower-bound rows)
    A_y = x_lᵀ (Aα) + x_uᵀ (A(1-α))
    bias = -Σ A⁺α (x_l y_l) + A⁺(1-α)(x_u y_u) + A⁻α (x_l y_u) + A⁻(1-α)(x_u y_l)

with the interpolation α in [0, 1] per output element and row (α = 1 by default, auto_LiRPA's
planes; α-CROWN optimizes it); the upper-bound rows swap y_l and y_u.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor, fx

from ..patches import to_dense
from .base import BoundOp, CenterRadius, const, is_perturbed, unbroadcast
from .registry import UnsupportedOperation, register_op


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _rows(t: Tensor, z_dim: int) -> Tensor:
    """A constant or bound of the product's operand, aligned with coefficients that have a row dim
    after the batch: tensors whose first dim is the batch (full rank, and the product has batch
    dims: z_dim >= 3) get a row dim; lower-rank ones broadcast over it.  (For a 2-D product the
    batch is the matrix's row dimension and the other operand is a plain matrix.)"""
    return t.unsqueeze(1) if t.dim() == z_dim and z_dim >= 3 else t


@register_op("MatMul")
class BoundMatMul(BoundOp):
    targets = (torch.matmul, operator.matmul, torch.bmm, "method:matmul", "method:bmm", "method:__matmul__")
    ibp_operands = "binary"
    alpha_range = (0.0, 1.0)

    @property
    def relaxed_inputs(self):
        a = self.node.args[:2]
        both = len(a) == 2 and all(isinstance(v, fx.Node) and v.op != "get_attr" for v in a)
        return (0, 1) if both else ()

    def _check(self, x, y):
        if is_perturbed(x) and is_perturbed(y) and const(x).dim() != const(y).dim():
            raise UnsupportedOperation(f"matmul of two bounded tensors of different ranks at node "
                                       f"'{self.node.name}' ({tuple(const(x).shape)} @ {tuple(const(y).shape)}); "
                                       "unsqueeze one of them to the same rank")
        for v in (x, y):
            if const(v).dim() < 2:
                raise UnsupportedOperation(f"matmul with a vector operand at node '{self.node.name}'; "
                                           "use a matrix (unsqueeze) or F.linear")
        # the contraction must not run over the batch: only a 2-D bounded left operand may use its
        # batch as the matrix rows (x @ W), and a bounded right operand needs its own batch dims
        if is_perturbed(y) and const(y).dim() < 3 or is_perturbed(x) and is_perturbed(y) and const(x).dim() < 3:
            raise UnsupportedOperation(f"matmul at node '{self.node.name}' contracts over the batch "
                                       f"dimension ({tuple(const(x).shape)} @ {tuple(const(y).shape)}); keep the "
                                       "batch first and the matrices in the last two dimensions")

    # ------------------------------------------------------------------ IBP
    def ibp(self, x, y, *rest, **kw):
        self._check(x, y)
        if not is_perturbed(y):
            c, r = x.center_radius
            C = const(y)
            return CenterRadius(torch.matmul(c, C), torch.matmul(r, C.abs()))
        if not is_perturbed(x):
            c, r = y.center_radius
            C = const(x)
            return CenterRadius(torch.matmul(C, c), torch.matmul(C.abs(), r))
        xl, xu = x.bounds
        yl, yu = y.bounds
        n, k, m = xl.shape[-2], xl.shape[-1], yl.shape[-1]
        size = max(xl.numel() // (n * k), yl.numel() // (k * m)) * n * k * m
        if size * xl.element_size() * 4 <= self.opts["memory_budget"]:
            # exact interval of each term x_ik y_kj, summed over k
            a, b = xl.unsqueeze(-1), xu.unsqueeze(-1)
            c, d = yl.unsqueeze(-3), yu.unsqueeze(-3)
            p = torch.stack(torch.broadcast_tensors(a * c, a * d, b * c, b * d))
            return p.min(0).values.sum(-2), p.max(0).values.sum(-2)
        xc, xr = x.center_radius
        yc, yr = y.center_radius
        return CenterRadius(torch.matmul(xc, yc),
                            torch.matmul(xc.abs(), yr) + torch.matmul(xr, yc.abs()) + torch.matmul(xr, yr))

    # ------------------------------------------------------------------ backward
    def _linear(self, A, x, y):
        """Coefficients on the one bounded operand."""
        z_dim = A.dim() - 1
        if is_perturbed(x):
            C = _rows(const(y), z_dim)
            return [(x, unbroadcast(torch.matmul(A, _t(C)), x.value.shape[1:]))]
        C = _rows(const(x), z_dim)
        return [(y, unbroadcast(torch.matmul(_t(C), A), y.value.shape[1:]))]

    def _side(self, A, x, y, upper: bool, alpha: Optional[Tensor]):
        z_dim = A.dim() - 1
        xl, xu = (_rows(t, z_dim) for t in x.bounds)
        yl, yu = (_rows(t, z_dim) for t in y.bounds)
        if upper:  # upper-bound rows: the positive part takes the upper planes
            yl, yu = yu, yl
        P, Q = A.clamp(min=0), A.clamp(max=0)
        a = torch.ones_like(A) if alpha is None else (alpha if alpha.dim() == A.dim() else alpha.unsqueeze(1))
        b = 1 - a
        Ax = torch.matmul(P * a + Q * b, _t(yl)) + torch.matmul(P * b + Q * a, _t(yu))
        Ay = torch.matmul(_t(xl), A * a) + torch.matmul(_t(xu), A * b)
        # with yl/yu swapped for upper rows, these four products are the planes' constants
        ll, uu, lu, ul = (torch.matmul(xl, yl), torch.matmul(xu, yu), torch.matmul(xl, yu), torch.matmul(xu, yl))
        bias = -(P * a * ll + P * b * uu + Q * a * lu + Q * b * ul).flatten(2).sum(-1)
        return unbroadcast(Ax, x.value.shape[1:]), unbroadcast(Ay, y.value.shape[1:]), bias

    def _backward(self, lA, uA, x, y, alpha=None):
        self._check(x, y)
        lA = to_dense(lA) if lA is not None else None
        uA = to_dense(uA) if uA is not None else None
        if not (is_perturbed(x) and is_perturbed(y)):
            out: dict[int, list] = {}
            for side, A in enumerate((lA, uA)):
                if A is None:
                    continue
                for v, a in self._linear(A, x, y):
                    out.setdefault(id(v), [v, None, None])[1 + side] = a
            return [tuple(o) for o in out.values()], 0, 0
        res = {"x": [None, None], "y": [None, None]}
        biases = [0, 0]
        for side, A in enumerate((lA, uA)):
            if A is None:
                continue
            ax, ay, bias = self._side(A, x, y, side == 1, None if alpha is None else alpha[side])
            res["x"][side], res["y"][side], biases[side] = ax, ay, bias
        return [(x, *res["x"]), (y, *res["y"])], biases[0], biases[1]

    def backward(self, lA, uA, x, y, *rest, **kw):
        return self._backward(lA, uA, x, y)

    def backward_alpha(self, lA, uA, alpha, x, y, *rest, **kw):
        return self._backward(lA, uA, x, y, alpha)

    # ------------------------------------------------------------------ α
    def _out(self, x, y) -> Tensor:
        return torch.matmul(const(x), const(y))

    def alpha_free(self, x, y, *rest, **kw):
        if not (is_perturbed(x) and is_perturbed(y)):  # linear: nothing to optimize
            return torch.zeros((), dtype=torch.bool)
        xl, xu = x.bounds
        yl, yu = y.bounds
        # an element's planes differ only where some term x_ik y_kj has both factors loose
        loose = ((xu > xl).to(xl.dtype) @ (yu > yl).to(yl.dtype)) > 0
        return loose

    def alpha_start(self, x, y, *rest, **kw):
        return torch.ones_like(self._out(x, y))


