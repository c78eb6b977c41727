"""The perturbation set as it reaches a node through ops that keep its structure, so that the
first Linear / Conv it meets is bounded over the set itself rather than over an enclosing box.

A perturbation's ``image(x0)`` starts one (None: the box is exact, as for L∞); shape ops carry it
(`map`), elementwise affine ops such as BatchNorm carry it when they can (`affine`), and Linear /
Conv end it (`linear`, `conv`): their interval over the set.  Any other op drops it, and the
interval walk goes on from the node's box, which always contains the set.

* `LpImage`: the ball ``x0 + {d : ||d||_p <= eps}``; a linear row w takes ``w·x0 ± eps ||w||_q``
  (Hölder; auto_LiRPA's IBP for Lp balls).
* `L0Image`: at most k coordinates of x0 changed, each within its domain [lo, hi]; a linear row w
  takes ``w·x0`` plus the sum of its k largest gains ``max(w_j (hi_j - x0_j), w_j (lo_j - x0_j))``
  (the maximum over the set exactly: the gains of distinct coordinates add up).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops.base import ball_radius

ConvFn = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


class SetImage:
    """Base: how the set looks at one node."""

    def map(self, fn: Callable[[Tensor], Tensor]) -> Optional["SetImage"]:
        """The image through a shape op ``fn`` (reshape, flatten, permute ...) applied per tensor."""
        return None

    def affine(self, scale: Tensor, shift: Tensor) -> Optional["SetImage"]:
        """The image through x ↦ x * scale + shift (broadcast per element), if it keeps the form."""
        return None

    def linear(self, w: Tensor, b: Optional[Tensor]) -> Optional[tuple[Tensor, Tensor]]:
        """Interval of x Wᵀ + b over the set; ``w`` is (out, in) or per example (B, out, in)."""
        return None

    def conv(self, conv: ConvFn, w: Tensor, b: Optional[Tensor], unfold: Callable[[Tensor], Tensor]
             ) -> Optional[tuple[Tensor, Tensor]]:
        """Interval of ``conv(x, w, b)`` over the set; ``unfold(t)`` gives t's (B, C·k…, L) windows
        in the conv's layout (for rules that need each output's own inputs)."""
        return None


class LpImage(SetImage):
    def __init__(self, center: Tensor, eps: Tensor, q: float):
        self.center, self.eps, self.q = center, eps, q  # eps: scalar or (B,)

    def map(self, fn):
        return LpImage(fn(self.center), self.eps, self.q)

    def affine(self, scale, shift):
        # ||s * d||_p <= max|s| * ||d||_p: the image of a ball lies inside a ball
        return LpImage(self.center * scale + shift, self.eps * scale.abs().max(), self.q)

    def linear(self, w, b):
        c0 = self.center
        if w.dim() == 3:  # per-example rows (a spec folded into the layer)
            c = torch.bmm(w, c0.unsqueeze(-1)).squeeze(-1) + (b if b is not None else 0)
            r = ball_radius(self.eps, 2) * w.norm(p=self.q, dim=-1)
        else:
            c = F.linear(c0, w, b)
            # ||x_i - x0_i||_p <= ||x - x0||_p for every slice x_i that one output row reads
            r = ball_radius(self.eps, c.dim()) * w.norm(p=self.q, dim=1)
        return c - r, c + r

    def conv(self, conv, w, b, unfold):
        # the dual norm of each whole filter bounds that of its part inside the padded input
        c = conv(self.center, w, b)
        r = ball_radius(self.eps, c.dim()) * w.flatten(1).norm(p=self.q, dim=1).view(1, -1, *[1] * (c.dim() - 2))
        return c - r, c + r


def _topk_sum(g: Tensor, k: int, dim: int = -1) -> Tensor:
    """Sum of the k largest entries along ``dim`` (all of them if there are fewer)."""
    k = min(k, g.shape[dim])
    return g.topk(k, dim=dim).values.sum(dim) if k > 0 else g.sum(dim) * 0


class L0Image(SetImage):
    def __init__(self, x0: Tensor, lo: Tensor, hi: Tensor, k: int, budget: int = 1 << 26):
        self.x0, self.lo, self.hi, self.k, self.budget = x0, lo, hi, k, budget

    def map(self, fn):
        return L0Image(fn(self.x0), fn(self.lo), fn(self.hi), self.k, self.budget)

    def affine(self, scale, shift):
        a, b = self.lo * scale + shift, self.hi * scale + shift
        return L0Image(self.x0 * scale + shift, torch.minimum(a, b), torch.maximum(a, b), self.k, self.budget)

    def _gains(self, w: Tensor, up: Tensor, dn: Tensor) -> tuple[Tensor, Tensor]:
        """(sum of the k largest increases, sum of the k largest decreases) of rows w (…, out, n)
        for per-coordinate moves up = hi - x0 >= 0, dn = lo - x0 <= 0 of shape (…, 1, n)."""
        a, c = w * up, w * dn
        inc, dec = torch.maximum(a, c), torch.minimum(a, c)  # >= 0 and <= 0: staying put is allowed
        return _topk_sum(inc, self.k), -_topk_sum(-dec, self.k)

    def linear(self, w, b):
        x0 = self.x0.flatten(1)
        up, dn = (self.hi.flatten(1) - x0).unsqueeze(1), (self.lo.flatten(1) - x0).unsqueeze(1)
        if w.dim() == 3:
            c = torch.bmm(w, x0.unsqueeze(-1)).squeeze(-1)
        else:
            c = F.linear(x0, w)
        if b is not None:
            c = c + b
        B, n = x0.shape
        out = w.shape[-2]
        rows = max(1, self.budget // max(1, B * n))  # output rows per chunk of (B, rows, n)
        incs, decs = [], []
        for s in range(0, out, rows):
            ws = w[..., s:s + rows, :]
            i, d = self._gains(ws if ws.dim() == 3 else ws.unsqueeze(0), up, dn)
            incs.append(i)
            decs.append(d)
        lo, hi = c + torch.cat(decs, -1), c + torch.cat(incs, -1)
        return lo.view(*self.x0.shape[:1], *c.shape[1:]), hi.view(*self.x0.shape[:1], *c.shape[1:])

    def conv(self, conv, w, b, unfold):
        c = conv(self.x0, w, b)                                # (B, O, *spatial)
        up = unfold(self.hi - self.x0)                         # (B, C·k…, L)
        dn = unfold(self.lo - self.x0)
        wf = w.flatten(1)                                      # (O, C·k…)
        B, n, L = up.shape
        if wf.shape[1] != n:
            return None  # grouped convolutions: the box
        inc = torch.empty(B, wf.shape[0], L, dtype=c.dtype, device=c.device)
        dec = torch.empty_like(inc)
        rows = max(1, self.budget // max(1, B * n * L))
        for s in range(0, wf.shape[0], rows):
            ws = wf[s:s + rows].view(1, -1, n, 1)
            a, d = ws * up.unsqueeze(1), ws * dn.unsqueeze(1)  # (B, rows, n, L)
            inc[:, s:s + rows] = _topk_sum(torch.maximum(a, d), self.k, dim=2)
            dec[:, s:s + rows] = -_topk_sum(-torch.minimum(a, d), self.k, dim=2)
        shape = c.shape
        return c + dec.view(shape), c + inc.view(shape)


class SynonymImage(SetImage):
    """Word substitutions (`PerturbationSynonym`) as they reach a node of shape (B, T, D): x0 and
    each position's moves ``d`` (B, T, K, D) (candidate minus x0; 0 stands for "no candidate").

    A Linear on the last dimension maps each position on its own, so every output element
    depends on one position only and its interval over the set is the min / max over keeping
    the word and each candidate, exact for any budget >= 1 (the box of the candidates is looser:
    it mixes coordinates of different candidates)."""

    def __init__(self, x0: Tensor, moves: Tensor, budget: int):
        self.x0, self.moves, self.budget = x0, moves, budget

    def affine(self, scale, shift):
        if self.x0.dim() != 3:
            return None
        s = torch.broadcast_to(torch.as_tensor(scale, dtype=self.x0.dtype, device=self.x0.device), self.x0.shape)
        return SynonymImage(self.x0 * scale + shift, self.moves * s.unsqueeze(2), self.budget)

    def linear(self, w, b):
        if w.dim() != 2 or self.x0.dim() != 3:
            return None
        c = F.linear(self.x0, w, b)                       # (B, T, O)
        if self.budget == 0:
            return c, c
        g = F.linear(self.moves, w)                       # (B, T, K, O)
        return c + g.min(2).values.clamp(max=0), c + g.max(2).values.clamp(min=0)
