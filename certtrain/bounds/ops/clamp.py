"""Clamping: ``clamp`` / ``clip`` / ``clamp_min`` / ``clamp_max`` with constant limits,
``nn.Hardtanh`` / ``F.hardtanh``, ``nn.ReLU6`` / ``F.relu6``: f(x) = min(max(x, a), b).

Per neuron with input in [l, u] (a = -inf or b = inf allowed):

* entirely below a, above b, or between them: the constant a, the constant b, the identity;
* across a only: f = max(x, a) is convex there: upper chord, lower line a + s (x - a), s in [0, 1];
* across b only: f = min(x, b) is concave there: lower chord, upper line b + t (x - b), t in [0, 1];
* across both: lower a + s (x - a) with s in [0, (b - a)/(u - a)], upper b + t (x - b) with
  t in [0, (b - a)/(b - l)] (the widest slope that stays below f at u, above f at l).

The slopes s, t follow ``bound_opts["hardtanh"]``: "same-slope" (the default, as auto_LiRPA) the
chord's slope over [l, u] (within the range), "adaptive" the largest slope where more of [l, u] lies
on the sloped side and else 0 (CROWN-Ada's rule for ReLU), "zero" always 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from .activation import ElementwiseRelaxOp
from .registry import UnsupportedOperation, register_op


@register_op("Clamp")
class BoundClamp(ElementwiseRelaxOp):
    targets = (torch.clamp, torch.clip, "method:clamp", "method:clip", torch.clamp_min, "method:clamp_min",
               torch.clamp_max, "method:clamp_max", nn.Hardtanh, F.hardtanh, nn.ReLU6, F.relu6)

    def limits(self) -> tuple[float, float]:
        m, n = self.module, self.node
        if isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
            a, b = m.min_val, m.max_val
        elif n.target is F.relu6:
            a, b = 0.0, 6.0
        elif n.target is F.hardtanh:
            a = n.args[1] if len(n.args) > 1 else n.kwargs.get("min_val", -1.0)
            b = n.args[2] if len(n.args) > 2 else n.kwargs.get("max_val", 1.0)
        elif n.target in (torch.clamp_min, "clamp_min"):
            a, b = (n.args[1] if len(n.args) > 1 else n.kwargs.get("min")), None
        elif n.target in (torch.clamp_max, "clamp_max"):
            a, b = None, (n.args[1] if len(n.args) > 1 else n.kwargs.get("max"))
        else:
            a = n.args[1] if len(n.args) > 1 else n.kwargs.get("min")
            b = n.args[2] if len(n.args) > 2 else n.kwargs.get("max")
        for v in (a, b):
            if isinstance(v, fx.Node):
                raise UnsupportedOperation(f"clamp with tensor limits at node '{n.name}' has no bound rule "
                                           "(only constant numbers)")
        a = -math.inf if a is None else float(a)
        b = math.inf if b is None else float(b)
        if a > b:
            raise UnsupportedOperation(f"clamp at node '{n.name}' with min {a} > max {b}")
        return a, b

    def fn(self, x):
        a, b = self.limits()
        return x.clamp(min=None if a == -math.inf else a, max=None if b == math.inf else b)

    def relax(self, l, u):
        a, b = self.limits()
        one, zero = torch.ones_like(l), torch.zeros_like(l)
        A = torch.full_like(l, a) if math.isfinite(a) else torch.full_like(l, -1.0)
        Bt = torch.full_like(l, b) if math.isfinite(b) else torch.full_like(l, 1.0)
        below, above = u <= a, l >= b
        cross_a = (l < a) & (u > a)
        cross_b = (l < b) & (u > b)
        both = cross_a & cross_b
        only_a, only_b = cross_a & ~cross_b, cross_b & ~cross_a
        width = torch.where(u > l, u - l, one)
        mode = self.opts["hardtanh"]

        def pick(s_max, more_sloped, chord):
            if mode == "zero":
                return zero
            if mode == "same-slope":
                return torch.minimum(chord, s_max)
            return torch.where(more_sloped, s_max, zero)

        # across a only: upper chord (l, a) -> (u, u); lower a + s (x - a), s in [0, 1]
        ch_a = (u - A) / width
        s_a = pick(one, u - A > A - l, ch_a)
        # across b only: lower chord (l, l) -> (u, b); upper b + t (x - b), t in [0, 1]
        ch_b = (Bt - l) / width
        t_b = pick(one, Bt - l > u - Bt, ch_b)
        # across both: s in [0, (b-a)/(u-a)], t in [0, (b-a)/(b-l)]
        s_max = (Bt - A) / torch.where(u > A, u - A, one)
        t_max = (Bt - A) / torch.where(Bt > l, Bt - l, one)
        ch = (Bt - A) / width
        s_both = pick(s_max, u - A > A - l, ch)
        t_both = pick(t_max, Bt - l > u - Bt, ch)

        dl = torch.where(below | above, zero, one)
        bl = torch.where(below, A, torch.where(above, Bt, zero))
        du, bu = dl.clone(), bl.clone()
        # across a only
        dl = torch.where(only_a, s_a, dl)
        bl = torch.where(only_a, A - s_a * A, bl)
        du = torch.where(only_a, ch_a, du)
        bu = torch.where(only_a, A - ch_a * l, bu)
        # across b only
        dl = torch.where(only_b, ch_b, dl)
        bl = torch.where(only_b, l - ch_b * l, bl)
        du = torch.where(only_b, t_b, du)
        bu = torch.where(only_b, Bt - t_b * Bt, bu)
        # across both
        dl = torch.where(both, s_both, dl)
        bl = torch.where(both, A - s_both * A, bl)
        du = torch.where(both, t_both, du)
        bu = torch.where(both, Bt - t_both * Bt, bu)
        return dl, bl, du, bu

    def rows_to_refine(self, lower, upper):
        a, b = self.limits()
        return (((lower < a) & (upper > a)) | ((lower < b) & (upper > b))).flatten(1).any(0)
