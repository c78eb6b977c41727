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

from .activation import ElementwiseRelaxOp, RowGroups, relax_backward_sides
from .registry import register_op

_BISECT_STEPS = 30


class SShaped(ElementwiseRelaxOp):
    # α-CROWN (Xu et al. 2021, App.; auto_LiRPA's optimized Sigmoid/Tanh): each tangent line may
    # touch f at any point d of an interval [a, b] where every tangent is sound (the convex piece
    # for the lower line, the concave one for the upper, up to the tangent that passes through the
    # far end of [l, u]).  α = (position of the lower line's d, of the upper line's d) in [0, 1],
    # d = a + α (b - a): every α in the box is sound.  Shape of α: (2, *node_shape) per row.
    alpha_range = (0.0, 1.0)
    alpha_row_groups = True

    def dfn(self, x):
        raise NotImplementedError

    def _tangent(self, d):
        k = self.dfn(d)
        return k, self.fn(d) - k * d

    def _tangent_points(self, l, u):
        """(hi_u, use_chord_u, lo_l, use_chord_l): the bisection ends (on the sound side) of the
        tangent point of the upper line through (l, f(l)) and of the lower line through (u, f(u)),
        and where the chord serves instead."""
        f, df = self.fn, self.dfn
        fl, fu = f(l), f(u)

        # Upper tangent through (l, f(l)): h(d) = f(d) - f(l) - f'(d)(d - l) rises on [0, u].
        def h(d):
            return f(d) - fl - df(d) * (d - l)

        lo, hi = torch.zeros_like(l), u.clamp(min=0)
        for _ in range(_BISECT_STEPS):
            mid = (lo + hi) / 2
            pos = h(mid) >= 0
            hi, lo = torch.where(pos, mid, hi), torch.where(pos, lo, mid)
        hi_u = hi
        use_chord_u = h(u) <= 0

        # Lower tangent through (u, f(u)): g(d) = f(u) - f(d) - f'(d)(u - d) falls on [l, 0].
        def g(d):
            return fu - f(d) - df(d) * (u - d)

        lo, hi = l.clamp(max=0), torch.zeros_like(l)
        for _ in range(_BISECT_STEPS):
            mid = (lo + hi) / 2
            pos = g(mid) >= 0
            lo, hi = torch.where(pos, mid, lo), torch.where(pos, hi, mid)
        return hi_u, use_chord_u, lo, g(l) <= 0

    def _pieces(self, l, u, fixed_points: bool = False):
        """Per neuron: the chord (slope, intercept), and for each of the lower / upper line the
        range [a, b] of sound tangent points, CROWN's point in it, and whether the line is a
        tangent at all (else the chord).  ``fixed_points``: the bisection's points without autograd
        history, computed once per (l, u) (α-CROWN passes through an op many times per step; the
        bisection's gradient is no derivative of the true point anyway)."""
        f, df = self.fn, self.dfn
        fl, fu = f(l), f(u)
        width = u - l
        flat = width <= 0
        chord = torch.where(flat, df(l), (fu - fl) / torch.where(flat, torch.ones_like(width), width))
        chord_b = fl - chord * l
        m = (l + u) / 2
        if fixed_points:
            cache = getattr(self, "_points_cache", None)
            if cache is not None and cache[0] is l and cache[1] is u:
                points = cache[2]
            else:
                with torch.no_grad():
                    points = self._tangent_points(l.detach(), u.detach())
                self._points_cache = (l, u, points)
        else:
            points = self._tangent_points(l, u)
        hi_u, use_chord_u, lo_l, use_chord_l = points

        convex = u <= 0
        concave = l >= 0
        # Lower line: a tangent on the convex piece, at any d in [l, u] (convex) or in [l, lo_l]
        # (across 0: every tangent left of the one through (u, f(u)) stays below f(u)); the
        # bisection end lo_l lies on the safe side.  CROWN's point: the midpoint when it lies in
        # the range (auto_LiRPA's default "smoothness enhancement"), else lo_l.
        tan_l = convex | (~concave & ~use_chord_l)
        b_l = torch.where(convex, u, lo_l)
        d_l = torch.where(convex | (m <= lo_l), m, lo_l)
        # Upper line: mirror image on the concave piece, d in [l, u] or [hi_u, u].
        tan_u = concave | (~convex & ~use_chord_u)
        a_u = torch.where(concave, l, hi_u)
        d_u = torch.where(concave | (m >= hi_u), m, hi_u)
        return (chord, chord_b), (tan_l, l, b_l, d_l), (tan_u, a_u, u, d_u)

    def relax(self, l, u):
        (chord, chord_b), (tan_l, _, _, d_l), (tan_u, _, _, d_u) = self._pieces(l, u)
        kl, cl = self._tangent(d_l)
        ku, cu = self._tangent(d_u)
        dl, bl = torch.where(tan_l, kl, chord), torch.where(tan_l, cl, chord_b)
        du, bu = torch.where(tan_u, ku, chord), torch.where(tan_u, cu, chord_b)
        return dl, bl, du, bu

    # ---------------------------------------------------------------- α-CROWN
    def alpha_free(self, x, *args, **kwargs):
        l, u = x.bounds
        _, (tan_l, a_l, b_l, _), (tan_u, a_u, b_u, _) = self._pieces(l, u, fixed_points=True)
        return torch.stack([tan_l & (b_l > a_l), tan_u & (b_u > a_u)], 1)

    def alpha_start(self, x, *args, **kwargs):
        l, u = x.bounds
        _, (_, a_l, b_l, d_l), (_, a_u, b_u, d_u) = self._pieces(l, u, fixed_points=True)

        def frac(a, b, d):
            w = b - a
            return torch.where(w > 0, ((d - a) / torch.where(w > 0, w, torch.ones_like(w))).clamp(0, 1),
                               torch.zeros_like(w))

        return torch.stack([frac(a_l, b_l, d_l), frac(a_u, b_u, d_u)], 1)

    def backward_alpha(self, lA, uA, alpha, x, *args, **kwargs):
        """Backward with the tangent points given by ``alpha`` = (for the lower bound's rows, for
        the upper bound's rows), each (B, N or 1, 2, *node_shape) in [0, 1] (see `_pieces`)."""
        l, u = x.bounds
        (chord, chord_b), (tan_l, a_l, b_l, d_l), (tan_u, a_u, b_u, d_u) = self._pieces(l, u, fixed_points=True)
        kl, cl = self._tangent(d_l)
        ku, cu = self._tangent(d_u)
        dl, bl = torch.where(tan_l, kl, chord), torch.where(tan_l, cl, chord_b)
        du, bu = torch.where(tan_u, ku, chord), torch.where(tan_u, cu, chord_b)

        def lines(a):
            if a is None:
                return dl, bl, du, bu
            if isinstance(a, RowGroups):  # per group of rows: the lines of each group, once
                return tuple(RowGroups(t, a.group) for t in lines(a.values))
            a = a.clamp(0, 1)
            shared = a.shape[1] == 1
            a = a.squeeze(1) if shared else a
            ax = 1 if shared else 2  # the (lower, upper) axis of α

            def ins(t):  # per-neuron tensor -> broadcastable against the per-row ones
                return t if shared else t.unsqueeze(1)

            out = []
            for i, (tan, lo, hi, d0, k0, c0) in enumerate(((tan_l, a_l, b_l, d_l, dl, bl),
                                                          (tan_u, a_u, b_u, d_u, du, bu))):
                d = ins(lo) + a.select(ax, i) * ins(hi - lo)
                k, c = self._tangent(d)
                free = ins(tan & (hi > lo))
                out += [torch.where(free, k, ins(k0)), torch.where(free, c, ins(c0))]
            return tuple(out)

        nl, lbias, nu, ubias = relax_backward_sides(lA, uA, lines, alpha)
        return [(x, nl, nu)], lbias, ubias


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
