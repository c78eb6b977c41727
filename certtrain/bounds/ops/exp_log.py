"""exp (convex) and log (concave), both monotone: chord on one side, tangent at the midpoint on
the other (Zhang et al. 2018, Sec. 3.3).  α-CROWN: the tangent may touch f at any d in [l, u]
(every such tangent is sound), d = l + α (u - l) with α in [0, 1] (0.5: CROWN's midpoint)."""
from __future__ import annotations

import torch

from .activation import ElementwiseRelaxOp, relax_backward_sides
from .registry import register_op


def _chord(f, l, u):
    width = u - l
    flat = width <= 0
    fl, fu = f(l), f(u)
    slope = (fu - fl) / torch.where(flat, torch.ones_like(width), width)
    return slope, flat, fl


class _TangentAlpha(ElementwiseRelaxOp):
    """A convex (``lower_tangent``) or concave function: its tangent line's point is α-optimizable."""

    alpha_range = (0.0, 1.0)
    lower_tangent = True

    def tangent(self, d):
        """(slope, intercept) of the tangent at d."""
        raise NotImplementedError

    def unstable(self, l, u):
        return (u > l) & torch.isfinite(u - l)

    def alpha_init(self, l, u):
        return torch.full_like(l, 0.5)  # the midpoint: plain CROWN's tangent

    def backward_alpha(self, lA, uA, alpha, x, *args, **kwargs):
        l, u = x.bounds
        dl, bl, du, bu = self.relax(l, u)
        free = self.unstable(l, u)

        def lines(a):
            if a is None:
                return dl, bl, du, bu
            a = a.clamp(0, 1)
            shared = a.shape[1] == 1
            ins = (lambda t: t) if shared else (lambda t: t.unsqueeze(1))  # noqa: E731
            a = a.squeeze(1) if shared else a
            k, c = self.tangent(ins(l) + a * ins(u - l))
            k0, c0 = (dl, bl) if self.lower_tangent else (du, bu)
            k, c = torch.where(ins(free), k, ins(k0)), torch.where(ins(free), c, ins(c0))
            return (k, c, du, bu) if self.lower_tangent else (dl, bl, k, c)

        nl, lbias, nu, ubias = relax_backward_sides(lA, uA, lines, alpha)
        return [(x, nl, nu)], lbias, ubias


@register_op("Exp")
class BoundExp(_TangentAlpha):
    targets = (torch.exp, "method:exp")

    def fn(self, x):
        return torch.exp(x)

    def tangent(self, d):
        k = torch.exp(d)
        return k, k * (1 - d)

    def relax(self, l, u):
        slope, flat, fl = _chord(torch.exp, l, u)
        m = (l + u) / 2
        tan_d = torch.exp(m)
        du = torch.where(flat, torch.exp(u), slope)
        bu = torch.where(flat, torch.exp(u) * (1 - u), fl - slope * l)
        return tan_d, tan_d * (1 - m), du, bu


@register_op("Log")
class BoundLog(_TangentAlpha):
    needs_domain = True
    lower_tangent = False

    targets = (torch.log, "method:log")

    def fn(self, x):
        return torch.log(x)

    def tangent(self, d):
        return 1 / d, torch.log(d) - 1

    def relax(self, l, u):
        if (l <= 0).any():
            raise ValueError(f"{self.node.name}: log of an input whose lower bound is <= 0 is unbounded")
        slope, flat, fl = _chord(torch.log, l, u)
        m = (l + u) / 2
        tan_d = 1 / m
        dl = torch.where(flat, 1 / u, slope)
        bl = torch.where(flat, torch.log(u) - 1, fl - slope * l)
        return dl, bl, tan_d, torch.log(m) - 1
