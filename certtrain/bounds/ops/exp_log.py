"""exp (convex) and log (concave), both monotone: chord on one side, tangent at the midpoint on
the other (Zhang et al. 2018, Sec. 3.3)."""
from __future__ import annotations

import torch

from .activation import ElementwiseRelaxOp
from .registry import register_op


def _chord(f, l, u):
    width = u - l
    flat = width <= 0
    fl, fu = f(l), f(u)
    slope = (fu - fl) / torch.where(flat, torch.ones_like(width), width)
    return slope, flat, fl


@register_op("Exp")
class BoundExp(ElementwiseRelaxOp):
    targets = (torch.exp, "method:exp")

    def fn(self, x):
        return torch.exp(x)

    def relax(self, l, u):
        slope, flat, fl = _chord(torch.exp, l, u)
        m = (l + u) / 2
        tan_d = torch.exp(m)
        du = torch.where(flat, torch.exp(u), slope)
        bu = torch.where(flat, torch.exp(u) * (1 - u), fl - slope * l)
        return tan_d, tan_d * (1 - m), du, bu


@register_op("Log")
class BoundLog(ElementwiseRelaxOp):
    needs_domain = True

    targets = (torch.log, "method:log")

    def fn(self, x):
        return torch.log(x)

    def relax(self, l, u):
        if (l <= 0).any():
            raise ValueError(f"{self.node.name}: log of an input whose lower bound is <= 0 is unbounded")
        slope, flat, fl = _chord(torch.log, l, u)
        m = (l + u) / 2
        tan_d = 1 / m
        dl = torch.where(flat, 1 / u, slope)
        bl = torch.where(flat, torch.log(u) - 1, fl - slope * l)
        return dl, bl, tan_d, torch.log(m) - 1
