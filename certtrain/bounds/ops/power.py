"""Powers x^p: ``x ** p`` / ``pow`` for a constant p, ``square``, ``sqrt`` (p = 1/2), ``rsqrt``
(p = -1/2), ``reciprocal`` (p = -1).

Shapes of x^p on its domain (Zhang et al. 2018, Sec. 3.3, for convex / concave pieces):

* p an even integer: convex on ℝ, decreasing then increasing;
* p an odd integer >= 3: increasing, concave for x < 0 and convex for x > 0 (the mirror image of
  an S-shaped function, relaxed as one: -(-x)^p is convex-then-concave);
* other p: defined for x >= 0 only (x > 0 for p < 0): convex for p > 1 or p < 0, concave for
  0 < p < 1; increasing for p > 0, decreasing for p < 0.

On a convex piece the chord is above and a tangent (at the midpoint) below; on a concave piece the
reverse.  An input whose bounds leave the domain is a clear error (e.g. reciprocal of an interval
that reaches 0).
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor, fx

from ..patches import a_map
from .activation import ElementwiseRelaxOp
from .registry import UnsupportedOperation, register_op
from .s_shaped import SShaped


def _chord(f, l, u):
    width = u - l
    flat = width <= 0
    fl, fu = f(l), f(u)
    slope = (fu - fl) / torch.where(flat, torch.ones_like(width), width)
    return slope, fl - slope * l, flat


class _OddMirror(SShaped):
    """g(x) = -x^p for odd p: convex for x < 0, concave for x > 0 (the S-shaped machinery)."""

    def __init__(self, p: int):  # no node: only the maths is used
        self.p = p

    def fn(self, x):
        return -(x ** self.p)

    def dfn(self, x):
        return -self.p * x ** (self.p - 1)


class _PowBase(ElementwiseRelaxOp):
    needs_domain = True

    """x^p for a constant exponent (``exponent()``)."""

    # not monotone for even p, but IBP below is the exact range, so the walk needs no CROWN for
    # the output either (what the capability means)
    monotone_elementwise = True

    def exponent(self) -> float:
        """The constant exponent, read from the graph node."""
        raise NotImplementedError

    def _p(self) -> float:
        return float(self.exponent())

    def _integer(self, p) -> bool:
        return float(p).is_integer()

    def _check_domain(self, l: Tensor, p: float) -> None:
        if self._integer(p) and p >= 0:
            return
        if p < 0 and (l <= 0).any():
            raise ValueError(f"{self.node.name}: x^{p:g} of an input whose lower bound is <= 0 is unbounded "
                             "(only a positive domain has a bound rule: keep the base, or a divisor, positive "
                             "over the perturbation, e.g. relu(h) + c, exp(h) or softplus(h) + c)")
        if p > 0 and (l < 0).any():
            raise ValueError(f"{self.node.name}: x^{p:g} of an input whose lower bound is < 0 is undefined "
                             "(only x >= 0 has a bound rule)")

    def fn(self, x):
        p = self._p()
        if p == 0.5:
            return torch.sqrt(x)
        if p == -0.5:
            return torch.rsqrt(x)
        if p == -1:
            return torch.reciprocal(x)
        return torch.pow(x, int(p) if self._integer(p) else p)

    def dfn(self, x):
        p = self._p()
        if p == 0:
            return torch.zeros_like(x)
        return p * torch.pow(x, (int(p) - 1) if self._integer(p) else p - 1)

    def ibp(self, x, *args, **kwargs):
        p = self._p()
        l, u = x.bounds
        self._check_domain(l, p)
        fl, fu = self.fn(l), self.fn(u)
        if self._integer(p) and p > 0 and int(p) % 2 == 0:  # even: the minimum is at 0 if inside
            lo = torch.where((l <= 0) & (u >= 0), torch.zeros_like(l), torch.minimum(fl, fu))
            return lo, torch.maximum(fl, fu)
        return torch.minimum(fl, fu), torch.maximum(fl, fu)

    def relax(self, l, u):
        p = self._p()
        self._check_domain(l, p)
        if p == 0:
            one = torch.ones_like(l)
            return torch.zeros_like(l), one, torch.zeros_like(l), one
        if p == 1:
            one, zero = torch.ones_like(l), torch.zeros_like(l)
            return one, zero, one, zero
        if self._integer(p) and p > 0 and int(p) % 2 == 1:
            # x^p = -g(x) with g S-shaped: lower(f) = -upper(g), upper(f) = -lower(g)
            dl, bl, du, bu = _OddMirror(int(p)).relax(l, u)
            return -du, -bu, -dl, -bl
        convex = (self._integer(p) and p > 0 and int(p) % 2 == 0) or p > 1 or p < 0
        slope, inter, flat = _chord(self.fn, l, u)
        m = (l + u) / 2
        tan_d = self.dfn(m)
        tan_b = self.fn(m) - tan_d * m
        # degenerate intervals (l = u): the constant f(l) is exact on both sides
        zero, fl = torch.zeros_like(l), self.fn(l)
        slope, inter = torch.where(flat, zero, slope), torch.where(flat, fl, inter)
        tan_d, tan_b = torch.where(flat, zero, tan_d), torch.where(flat, fl, tan_b)
        if convex:
            return tan_d, tan_b, slope, inter
        return slope, inter, tan_d, tan_b


    # -------- α-CROWN: the tangent point of a convex / concave piece is free (any point of [l, u]
    # gives a valid tangent line), parameterized as d = l + α (u - l) with α in [0, 1].
    alpha_range = (0.0, 1.0)

    def _pure(self, l: torch.Tensor) -> bool:
        """Whether every neuron is on one convex or concave piece (not an odd power across 0)."""
        p = self._p()
        return p not in (0.0, 1.0) and not (self._integer(p) and p > 0 and int(p) % 2 == 1)

    def _odd(self) -> bool:
        p = self._p()
        return self._integer(p) and p > 1 and int(p) % 2 == 1

    def unstable(self, l, u):
        if not self._pure(l):
            return torch.zeros_like(l, dtype=torch.bool)
        return u > l

    def alpha_init(self, l, u):
        return torch.full_like(l, 0.5)  # the midpoint: plain CROWN's tangent

    # Odd powers x^p = -g(x), g S-shaped: the tangent points of g's two lines (`SShaped`), α of
    # shape (2, *node): (f's lower line = -g's upper line, f's upper line = -g's lower line).
    def alpha_free(self, x, *args, **kwargs):
        if self._odd():
            return _OddMirror(int(self._p())).alpha_free(x).flip(1)
        return super().alpha_free(x, *args, **kwargs)

    def alpha_start(self, x, *args, **kwargs):
        if self._odd():
            return _OddMirror(int(self._p())).alpha_start(x).flip(1)
        return super().alpha_start(x, *args, **kwargs)

    def backward_alpha(self, lA, uA, alpha, x, *args, **kwargs):
        l, u = x.bounds
        if self._odd():  # A f = (-A) g: g's rule with the coefficients negated
            neg = [None if A is None else a_map(A, torch.neg) for A in (lA, uA)]
            return _OddMirror(int(self._p())).backward_alpha(
                *neg, tuple(None if a is None else a.flip(2) for a in alpha), x)
        if not self._pure(l):
            return self.backward(lA, uA, x, *args, **kwargs)
        self._check_domain(l, self._p())
        p = self._p()
        convex = (self._integer(p) and int(p) % 2 == 0) or p > 1 or p < 0
        slope, inter, flat = _chord(self.fn, l, u)
        zero, fl = torch.zeros_like(l), self.fn(l)
        slope, inter = torch.where(flat, zero, slope), torch.where(flat, fl, inter)

        def lines(a):
            if a is None:
                a = torch.full_like(l, 0.5)
            per_row = a.dim() == l.dim() + 1
            lo, up = (l.unsqueeze(1), u.unsqueeze(1)) if per_row else (l, u)
            d = lo + a.clamp(0, 1) * (up - lo)
            td = self.dfn(d)
            tb = self.fn(d) - td * d
            fl_, flat_ = (fl.unsqueeze(1), flat.unsqueeze(1)) if per_row else (fl, flat)
            td, tb = torch.where(flat_, torch.zeros_like(td), td), torch.where(flat_, fl_.expand_as(tb), tb)
            sl, it = (slope.unsqueeze(1).expand_as(td), inter.unsqueeze(1).expand_as(tb)) if per_row else (slope, inter)
            return (td, tb, sl, it) if convex else (sl, it, td, tb)

        from .activation import relax_backward_sides
        nl, lbias, nu, ubias = relax_backward_sides(lA, uA, lines, alpha)
        return [(x, nl, nu)], lbias, ubias


@register_op("Pow")
class BoundPow(_PowBase):
    targets = (torch.pow, operator.pow, "method:pow", "method:__pow__")

    def exponent(self):
        n = self.node
        if n.target in (operator.pow, torch.pow) and n.args and not isinstance(n.args[0], fx.Node):
            raise UnsupportedOperation(f"{n.name}: a constant raised to a perturbed power has no bound rule; "
                                       "use torch.exp(x * log(c))")
        e = n.args[1] if len(n.args) > 1 else n.kwargs.get("exponent")
        if isinstance(e, fx.Node):
            raise UnsupportedOperation(f"{n.name}: a power with a tensor exponent has no bound rule "
                                       "(only a constant number)")
        if not isinstance(e, (int, float)) or isinstance(e, bool):
            raise UnsupportedOperation(f"{n.name}: exponent {e!r} is not a number")
        return float(e)


@register_op("Square")
class BoundSquare(_PowBase):
    targets = (torch.square, "method:square")

    def exponent(self):
        return 2.0


@register_op("Sqrt")
class BoundSqrt(_PowBase):
    targets = (torch.sqrt, "method:sqrt")

    def exponent(self):
        return 0.5


@register_op("Rsqrt")
class BoundRsqrt(_PowBase):
    targets = (torch.rsqrt, "method:rsqrt")

    def exponent(self):
        return -0.5


@register_op("Reciprocal")
class BoundReciprocal(_PowBase):
    targets = (torch.reciprocal, "method:reciprocal")

    def exponent(self):
        return -1.0


