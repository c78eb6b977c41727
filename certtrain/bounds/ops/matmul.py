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
from .base import BoundOp, CenterRadius, ball_radius, const, is_perturbed, unbroadcast
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
            out = CenterRadius(torch.matmul(c, C), torch.matmul(r, C.abs()))
            return self._with_ball(out, x, C, left=True)
        if not is_perturbed(x):
            c, r = y.center_radius
            C = const(x)
            out = CenterRadius(torch.matmul(C, c), torch.matmul(C.abs(), r))
            return self._with_ball(out, y, C, left=False)
        xl, xu = x.bounds
        yl, yu = y.bounds
        n, k, m = xl.shape[-2], xl.shape[-1], yl.shape[-1]
        size = max(xl.numel() // (n * k), yl.numel() // (k * m)) * n * k * m
        if size * xl.element_size() * 4 <= self.opts["memory_budget"]:
            # exact interval of each term x_ik y_kj, summed over k
            a, b = xl.unsqueeze(-1), xu.unsqueeze(-1)
            c, d = yl.unsqueeze(-3), yu.unsqueeze(-3)
            p = torch.stack(torch.broadcast_tensors(a * c, a * d, b * c, b * d))
            out = (p.min(0).values.sum(-2), p.max(0).values.sum(-2))
        else:
            xc, xr = x.center_radius
            yc, yr = y.center_radius
            out = CenterRadius(torch.matmul(xc, yc),
                               torch.matmul(xc.abs(), yr) + torch.matmul(xr, yc.abs()) + torch.matmul(xr, yr))
        return self._both_with_ball(out, x, y)

    @staticmethod
    def _ball(v):
        """(centre, eps (B,) or scalar, q) where v's set is an Lp ball over the whole tensor (a
        perturbed parameter, `set_image.LpImage`), else None."""
        from ..set_image import LpImage
        img = v.image
        if not isinstance(img, LpImage) or img.center.shape != v.value.shape:
            return None
        return img.center, img.eps, img.q

    def _with_ball(self, out, v, C, left: bool):
        """Intersect with the ball's own interval where the bounded operand is an Lp ball (e.g. a
        weight): row i of D C (left) is bounded by ||D_i||_p ||C_:j||_q <= eps ||C_:j||_q."""
        ball = self._ball(v)
        if ball is None:
            return out
        c0, eps, q = ball
        if left:
            z = torch.matmul(c0, C)
            r = C.norm(p=q, dim=-2).unsqueeze(-2)            # (…, 1, m)
        else:
            z = torch.matmul(C, c0)
            r = C.norm(p=q, dim=-1).unsqueeze(-1)            # (…, n, 1)
        r = ball_radius(eps, z.dim()) * r
        return self._intersect(out, z - r, z + r)

    def _both_with_ball(self, out, x, y):
        """Both bounded, one an Lp ball X0 + D: X Y = X0 Y + D Y with X0 Y by interval arithmetic and
        |(D Y)_ij| <= eps ||max|Y_:j| ||_q (and symmetrically), intersected with ``out``."""
        for ball, other, left in ((self._ball(x), y, True), (self._ball(y), x, False)):
            if ball is None:
                continue
            c0, eps, q = ball
            oc, orad = other.center_radius
            mag = torch.maximum(other.lower.abs(), other.upper.abs())
            if left:
                z, zr = torch.matmul(c0, oc), torch.matmul(c0.abs(), orad)
                r = mag.norm(p=q, dim=-2).unsqueeze(-2)
            else:
                z, zr = torch.matmul(oc, c0), torch.matmul(orad, c0.abs())
                r = mag.norm(p=q, dim=-1).unsqueeze(-1)
            r = zr + ball_radius(eps, z.dim()) * r
            out = self._intersect(out, z - r, z + r)
        return out

    @staticmethod
    def _intersect(out, lo, hi):
        if isinstance(out, CenterRadius):
            c, r = out
            out = (c - r, c + r)
        return torch.maximum(out[0], lo), torch.minimum(out[1], hi)

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
        ball_side = self._ball_operand(x, y)
        for side, A in enumerate((lA, uA)):
            if A is None:
                continue
            if ball_side is not None:
                ax, ay, bias = self._ball_plane(A, x, y, side == 1, ball_side)
            else:
                ax, ay, bias = self._side(A, x, y, side == 1, None if alpha is None else alpha[side])
            res["x"][side], res["y"][side], biases[side] = ax, ay, bias
        out = [(v, *res[k]) for k, v in (("x", x), ("y", y)) if res[k] != [None, None]]
        return out, biases[0], biases[1]

    def _ball_operand(self, x, y) -> Optional[str]:
        """"x" or "y" where that operand is an L2 / L1 ball (a perturbed weight): its box (w0 ± eps
        per element) makes McCormick planes loose, so the ball plane serves instead."""
        for name, v in (("x", x), ("y", y)):
            b = self._ball(v)
            if b is not None and b[2] != 1.0:  # dual norm q = 1 is an L∞ ball: its box is exact
                return name
        return None

    def _ball_plane(self, A, x, y, upper: bool, which: str):
        """X Y with X = X0 + D in a ball: X Y = X0 Y + D Y and |(D Y)_ij| <= eps ||max|Y_:j| ||_q
        over Y's box, so X0 Y - eps r <= X Y <= X0 Y + eps r (linear in Y alone, sound for every
        point of the ball and the box); symmetrically for a ball on Y."""
        z_dim = A.dim() - 1
        ball, other = (self._ball(x), y) if which == "x" else (self._ball(y), x)
        c0, eps, q = ball
        mag = torch.maximum(other.lower.abs(), other.upper.abs())
        if which == "x":
            r = mag.norm(p=q, dim=-2).unsqueeze(-2)                  # (B, 1, m)
            coef = unbroadcast(torch.matmul(_t(_rows(c0, z_dim)), A), y.value.shape[1:])
        else:
            r = mag.norm(p=q, dim=-1).unsqueeze(-1)                  # (B, n, 1)
            coef = unbroadcast(torch.matmul(A, _t(_rows(c0, z_dim))), x.value.shape[1:])
        r = _rows(ball_radius(eps, r.dim()) * r, z_dim)
        slack = (A.abs() * r).flatten(2).sum(-1)
        bias = slack if upper else -slack
        return (None, coef, bias) if which == "x" else (coef, None, bias)

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


