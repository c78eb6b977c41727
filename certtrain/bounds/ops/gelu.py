"""GELU, f(x) = x Φ(x) (exact form): neither monotone nor convex, so a line of slope k is made a
lower (upper) line by the exact minimum (maximum) of g(x) = f(x) - k x over [l, u].

f'' = φ(x) (2 - x²): f' is monotone on (-∞, -√2], [-√2, √2] and [√2, ∞), so on each piece
g' = f' - k has at most one root, found by bisection; g's extremum near a root bracket [a, b] is
within max(|g'(a)|, |g'(b)|)·(b - a) of g(a) (g' is monotone on the bracket), which the offset
adds.  The slope is the chord's (the tangent at l where l = u).  IBP: f decreases up to its
minimiser x* (f'(x*) = 0, x* ≈ -0.7518) and increases after it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activation import ElementwiseRelaxOp
from .registry import UnsupportedOperation, register_op

_SQRT2 = math.sqrt(2.0)
_PIECES = ((-math.inf, -_SQRT2), (-_SQRT2, _SQRT2), (_SQRT2, math.inf))
_BISECT = 60


def _f(x: Tensor) -> Tensor:
    return x * 0.5 * (1 + torch.erf(x / _SQRT2))


def _df(x: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x / _SQRT2)) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _argmin() -> float:
    lo, hi = -_SQRT2, 0.0  # f' increases here, f'(-√2) < 0 < f'(0)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(_df(torch.tensor(mid, dtype=torch.float64))) < 0 else (lo, mid)
    return lo


_XSTAR = _argmin()


def offsets(l: Tensor, u: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """(min, max) of g(x) = gelu(x) - k x over [l, u], outward by the bisection's margin."""
    g = lambda x: _f(x) - k * x  # noqa: E731
    gl, gu = g(l), g(u)
    lo_off, hi_off = torch.minimum(gl, gu), torch.maximum(gl, gu)
    for pa, pb in _PIECES:
        a, b = l.clamp(min=pa), u.clamp(max=pb)
        valid = a < b
        sa, sb = _df(a) - k, _df(b) - k
        root = valid & (sa * sb <= 0)
        if not bool(root.any()):
            continue
        lo, hi = torch.where(root, a, l), torch.where(root, b, l)
        for _ in range(_BISECT):
            mid = 0.5 * (lo + hi)
            same = (_df(mid) - k) * sa > 0  # still on a's side of the root
            lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
        margin = torch.maximum((_df(lo) - k).abs(), (_df(hi) - k).abs()) * (hi - lo)
        gv = g(lo)
        lo_off = torch.where(root, torch.minimum(lo_off, gv - margin), lo_off)
        hi_off = torch.where(root, torch.maximum(hi_off, gv + margin), hi_off)
    return lo_off, hi_off


@register_op("GELU")
class BoundGELU(ElementwiseRelaxOp):
    targets = (nn.GELU, F.gelu)
    monotone_elementwise = False

    def _check(self):
        approx = self.module.approximate if self.module is not None else self.node.kwargs.get("approximate", "none")
        if approx != "none":
            raise UnsupportedOperation(f"{self.node.name}: GELU(approximate={approx!r}) has no bound rule; "
                                       "use the exact form (approximate='none')")

    def fn(self, x):
        return _f(x)

    def ibp(self, x, *args, **kwargs):
        self._check()
        l, u = x.bounds
        lo = _f(torch.minimum(torch.maximum(torch.full_like(l, _XSTAR), l), u))
        return lo, torch.maximum(_f(l), _f(u))

    def relax(self, l, u):
        self._check()
        w = u - l
        flat = w <= 0
        k = torch.where(flat, _df(l), (_f(u) - _f(l)) / torch.where(flat, torch.ones_like(w), w))
        bl, bu = offsets(l, u, k)
        return k, bl, k, bu
