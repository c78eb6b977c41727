"""Bound rules for the derivative ops of a gradient graph (`certtrain.bounds.gradient_graph`).

Shi et al. 2022 ("Efficiently Computing Local Lipschitz Constants of Neural Networks via Bound
Propagation", Sec. 3) bound a network's Jacobian by running bound propagation on the graph that
computes it.  Besides linear maps, that graph has two kinds of nonlinear nodes, bounded here:

* ``relu_grad(z, g)`` = g * 1[z > 0] (LeakyReLU: slope a instead of 0): with the pre-activation z
  stable the mask is a constant; for unstable z the output is either a·g or g, so it lies between
  min(g, a g) (concave in g) and max(g, a g) (convex in g), and the chords of these on [gl, gu] are
  its tightest lines in g (Shi et al. 2022, Sec. 3.2).
* the activation derivatives σ'(z) = s (1 - s) (s = σ(z)) and tanh'(z) = 1 - t² (t = tanh(z)),
  which take both the pre-activation z and the activation's output.  Their interval is exact (a
  concave parabola of s).  Lines: where [l, u] lies in one convexity piece of f' as a function of z
  (inflection points ±ln(2 + √3) for σ', ±atanh(1/√3) for tanh'), the chord and a tangent in z
  (tangent above on a concave piece, below on a convex one); elsewhere lines in s (chord below,
  tangent above the parabola, composed with the activation's own relaxation by the walk).  Each
  neuron uses one of the two, so every line is sound.  The product with the upstream gradient is an
  ordinary ``d * g`` (McCormick planes, ops/bilinear.py).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .activation import relax_backward
from .base import BoundOp, is_perturbed
from .registry import register_op


def relu_grad(z: Tensor, g: Tensor, negative_slope: float = 0.0) -> Tensor:
    """The vector-Jacobian product of (leaky) ReLU: g (N, rows, *shape) times the derivative at the
    pre-activation z (N, *shape), broadcast over the rows (autograd's convention: 0 at z = 0)."""
    mask = z.unsqueeze(1) > 0
    return torch.where(mask, g, g * negative_slope)


def sigmoid_derivative(z: Tensor, s: Tensor) -> Tensor:
    """σ'(z), given z and s = σ(z): s (1 - s)."""
    return s * (1 - s)


def tanh_derivative(z: Tensor, t: Tensor) -> Tensor:
    """tanh'(z), given z and t = tanh(z): 1 - t²."""
    return 1 - t * t


@register_op("ReluGrad")
class BoundReluGrad(BoundOp):
    """``relu_grad(z, g, slope)``: lines in g only (see the module docstring); z decides stability."""

    targets = (relu_grad,)
    relaxed_inputs = (0, 1)

    def _slope(self, args) -> float:
        s = args[0] if args else self.node.kwargs.get("negative_slope", 0.0)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"relu_grad needs 0 <= negative_slope <= 1, got {s}")
        return float(s)

    @staticmethod
    def _masks(z):
        zl, zu = (t.unsqueeze(1) for t in z.bounds)
        # z = 0 exactly is unstable: the derivative there is either side's (Clarke's set), so the
        # bounds hold whichever convention a framework uses.
        return zl > 0, zu < 0

    def ibp(self, z, g, *args, **kwargs):
        a = self._slope(args)
        active, inactive = self._masks(z)
        gl, gu = g.bounds
        # unstable: the output is g or a·g
        lo = torch.where(active, gl, torch.where(inactive, a * gl, torch.minimum(gl, a * gl)))
        up = torch.where(active, gu, torch.where(inactive, a * gu, torch.maximum(gu, a * gu)))
        return lo, up

    def lines(self, z, g, a: float):
        """(dl, bl, du, bu): dl g + bl <= relu_grad(z, g) <= du g + bu for every z, g in their bounds."""
        active, inactive = self._masks(z)
        gl, gu = g.bounds
        gl, gu = torch.broadcast_tensors(gl, gu, active)[:2]
        one = torch.ones_like(gl)
        cross = (gl < 0) & (gu > 0)
        width = torch.where(cross, gu - gl, one)
        # max(g, a g): slope a below 0, 1 above; chord through (gl, a gl) and (gu, gu)
        up_chord = torch.where(cross, (gu - a * gl) / width, one)
        du_u = torch.where(gl >= 0, one, torch.where(gu <= 0, a * one, up_chord))
        bu_u = torch.where(cross, a * gl - up_chord * gl, torch.zeros_like(gl))
        # min(g, a g): slope 1 below 0, a above; chord through (gl, gl) and (gu, a gu)
        lo_chord = torch.where(cross, (a * gu - gl) / width, one)
        dl_u = torch.where(gl >= 0, a * one, torch.where(gu <= 0, one, lo_chord))
        bl_u = torch.where(cross, gl - lo_chord * gl, torch.zeros_like(gl))
        fixed = torch.where(active, one, a * one)
        stable = active | inactive
        zero = torch.zeros_like(gl)
        return (torch.where(stable, fixed, dl_u), torch.where(stable, zero, bl_u),
                torch.where(stable, fixed, du_u), torch.where(stable, zero, bu_u))

    def backward(self, lA, uA, z, g, *args, **kwargs):
        dl, bl, du, bu = self.lines(z, g, self._slope(args))
        nl, lbias, nu, ubias = relax_backward(lA, uA, dl, bl, du, bu)
        if not is_perturbed(g):  # a constant upstream gradient: the lines are constants
            gv = g.value.unsqueeze(1)
            if nl is not None:
                lbias = lbias + (nl * gv).flatten(2).sum(-1)
            if nu is not None:
                ubias = ubias + (nu * gv).flatten(2).sum(-1)
            return [], lbias, ubias
        return [(g, nl, nu)], lbias, ubias


class _ActivationDerivative(BoundOp):
    """f'(z) of an S-shaped activation f, from (z, y = f(z)): f' = c0 + c1 y - y²."""

    c0: float = 0.0
    c1: float = 0.0
    inflection: float = 0.0  # f' is concave on [-c, c] and convex outside
    relaxed_inputs = (0, 1)
    #: narrower z-intervals use the lines in y (the chord's slope would lose its digits)
    min_width = 1e-5

    def parabola(self, y):
        return self.c0 + self.c1 * y - y * y

    def act(self, z):
        raise NotImplementedError

    def deriv(self, z):
        """f'(z) computed from z."""
        return self.parabola(self.act(z))

    def deriv2(self, z):
        """f''(z) = (c1 - 2 y) f'(z)."""
        y = self.act(z)
        return (self.c1 - 2 * y) * self.parabola(y)

    def ibp(self, z, y, *args, **kwargs):
        l, u = y.bounds
        top = self.parabola(torch.clamp(torch.full_like(l, self.c1 / 2), l, u))  # the vertex, if inside
        return torch.minimum(self.parabola(l), self.parabola(u)), top

    def lines_y(self, l, u):
        # chord through (l, p(l)) and (u, p(u)): slope c1 - (l + u) (no division, exact at l = u)
        dl = self.c1 - (l + u)
        bl = self.parabola(l) - dl * l
        # tangent at the midpoint m: slope c1 - 2m, intercept p(m) - p'(m) m = c0 + m²
        m = (l + u) * 0.5
        return dl, bl, self.c1 - 2 * m, self.c0 + m * m

    def lines_z(self, l, u):
        """Lines in z and where they apply (one convexity piece, wide enough)."""
        c = self.inflection
        width = u - l
        concave = (l >= -c) & (u <= c)
        convex = (l >= c) | (u <= -c)
        use = (concave | convex) & (width > self.min_width)
        one = torch.ones_like(l)
        w = torch.where(use, width, one)
        fl, fu = self.deriv(l), self.deriv(u)
        k = (fu - fl) / w
        chord_b = fl - k * l
        m = (l + u) * 0.5
        t = self.deriv2(m)
        tan_b = self.deriv(m) - t * m
        dl = torch.where(concave, k, t)
        bl = torch.where(concave, chord_b, tan_b)
        du = torch.where(concave, t, k)
        bu = torch.where(concave, tan_b, chord_b)
        return use, dl, bl, du, bu

    def backward(self, lA, uA, z, y, *args, **kwargs):
        use, dlz, blz, duz, buz = self.lines_z(*z.bounds)
        dly, bly, duy, buy = self.lines_y(*y.bounds)
        zero = torch.zeros_like(dlz)

        def only(mask, *t):
            return [torch.where(mask, v, zero) for v in t]

        nlz, lbz, nuz, ubz = relax_backward(lA, uA, *only(use, dlz, blz, duz, buz))
        nly, lby, nuy, uby = relax_backward(lA, uA, *only(~use, dly, bly, duy, buy))
        return [(z, nlz, nuz), (y, nly, nuy)], lbz + lby, ubz + uby


@register_op("SigmoidDerivative")
class BoundSigmoidDerivative(_ActivationDerivative):
    targets = (sigmoid_derivative,)
    c0, c1 = 0.0, 1.0
    inflection = math.log(2 + math.sqrt(3))

    def act(self, z):
        return torch.sigmoid(z)


@register_op("TanhDerivative")
class BoundTanhDerivative(_ActivationDerivative):
    targets = (tanh_derivative,)
    c0, c1 = 1.0, 0.0
    inflection = math.atanh(1 / math.sqrt(3))

    def act(self, z):
        return torch.tanh(z)
