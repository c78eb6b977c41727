"""Sigmoid and Tanh: S-shaped functions, convex for x < 0 and concave for x > 0.

Relaxation (CROWN, Zhang et al. 2018, Sec. 3.3): on a convex piece the chord is above and a
tangent below; on a concave piece the reverse.  For l < 0 < u the upper line is the chord if it
stays above f, else the tangent at d in [0, u] that passes through (l, f(l)); the lower line
mirrors this with the tangent through (u, f(u)) at d in [l, 0].  The tangent point is found by
bisection and the bracket end that keeps the line sound is used, so rounding never makes it cut f.
"""
from __future__ import annotations

import torch
from torch import nn

from .activation import ElementwiseRelaxOp
from .registry import register_op

_BISECT_STEPS = 30


class SShaped(ElementwiseRelaxOp):
    def dfn(self, x):
        raise NotImplementedError

    def relax(self, l, u):
        f, df = self.fn, self.dfn
        fl, fu = f(l), f(u)
        width = u - l
        flat = width <= 0
        chord = torch.where(flat, df(l), (fu - fl) / torch.where(flat, torch.ones_like(width), width))
        chord_b = fl - chord * l
        m = (l + u) / 2
        tan_m, tan_mb = df(m), f(m) - df(m) * m

        # Upper tangent through (l, f(l)): h(d) = f(d) - f(l) - f'(d)(d - l) rises on [0, u].
        def h(d):
            return f(d) - fl - df(d) * (d - l)

        lo, hi = torch.zeros_like(l), u.clamp(min=0)
        for _ in range(_BISECT_STEPS):
            mid = (lo + hi) / 2
            pos = h(mid) >= 0
            hi, lo = torch.where(pos, mid, hi), torch.where(pos, lo, mid)
        hi_u = hi
        du_t, bu_t = df(hi), f(hi) - df(hi) * hi
        use_chord_u = h(u) <= 0

        # Lower tangent through (u, f(u)): g(d) = f(u) - f(d) - f'(d)(u - d) falls on [l, 0].
        def g(d):
            return fu - f(d) - df(d) * (u - d)

        lo, hi = l.clamp(max=0), torch.zeros_like(l)
        for _ in range(_BISECT_STEPS):
            mid = (lo + hi) / 2
            pos = g(mid) >= 0
            lo, hi = torch.where(pos, mid, lo), torch.where(pos, hi, mid)
        dl_t, bl_t = df(lo), f(lo) - df(lo) * lo
        use_chord_l = g(l) <= 0

        # Midpoint tangent (auto_LiRPA's default "smoothness enhancement"): when m lies beyond the
        # tangent point on the same side (m <= d for the lower line, m >= d for the upper), the
        # tangent at m also stays below f(u) (resp. above f(l)), so it is sound and usually
        # tighter over the box.  The bisection ends used (lo <= d_true, hi >= d_true) keep it safe.
        mid_l = ~use_chord_l & (m <= lo)
        mid_u = ~use_chord_u & (m >= hi_u)
        dl_t, bl_t = torch.where(mid_l, tan_m, dl_t), torch.where(mid_l, tan_mb, bl_t)
        du_t, bu_t = torch.where(mid_u, tan_m, du_t), torch.where(mid_u, tan_mb, bu_t)

        convex = u <= 0
        concave = l >= 0
        du = torch.where(convex, chord, torch.where(concave, tan_m, torch.where(use_chord_u, chord, du_t)))
        bu = torch.where(convex, chord_b, torch.where(concave, tan_mb, torch.where(use_chord_u, chord_b, bu_t)))
        dl = torch.where(concave, chord, torch.where(convex, tan_m, torch.where(use_chord_l, chord, dl_t)))
        bl = torch.where(concave, chord_b, torch.where(convex, tan_mb, torch.where(use_chord_l, chord_b, bl_t)))
        return dl, bl, du, bu


@register_op("Sigmoid")
class BoundSigmoid(SShaped):
    targets = (nn.Sigmoid, torch.sigmoid, "method:sigmoid")

    def fn(self, x):
        return torch.sigmoid(x)

    def dfn(self, x):
        s = torch.sigmoid(x)
        return s * (1 - s)


@register_op("Tanh")
class BoundTanh(SShaped):
    targets = (nn.Tanh, torch.tanh, "method:tanh")

    def fn(self, x):
        return torch.tanh(x)

    def dfn(self, x):
        return 1 - torch.tanh(x) ** 2
