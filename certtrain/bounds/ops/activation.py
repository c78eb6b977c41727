"""Shared machinery for elementwise nonlinearities bounded by two lines per neuron.

A relaxation gives, for every neuron with input in [l, u], lines
``dl * x + bl <= f(x) <= du * x + bu``.  Backward (CROWN, Zhang et al. 2018, Thm. 3.2): a row's
positive coefficients take the lower line for a lower bound and the upper line for an upper bound;
negative coefficients take the other line.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import Tensor

from ..patches import LinearA, Patches
from .base import BoundOp

Lines = tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]


class RowGroups:
    """A per-row tensor (B, N, *shape) stored once per group of rows: row n is
    ``values[:, group[n]]`` (α-CROWN's parameters shared by the rows of one output channel).
    Ops that declare ``alpha_row_groups`` accept it as α; `relax_backward` takes it as a line."""

    __slots__ = ("values", "group")

    def __init__(self, values: Tensor, group: Tensor):
        self.values, self.group = values, group

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.values.shape[0], self.group.numel(), *self.values.shape[2:]))

    def dim(self) -> int:
        return self.values.dim()

    def dense(self) -> Tensor:
        return self.values.index_select(1, self.group)

    def __getitem__(self, idx) -> "RowGroups":
        """``rg[:, i:j]``: rows i..j-1 (how the walk slices α per chunk of rows)."""
        if not (isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None)):
            raise IndexError("RowGroups supports only [:, rows]")
        return RowGroups(self.values, self.group[idx[1]])

    def map(self, fn) -> "RowGroups":
        return RowGroups(fn(self.values), self.group)


def relax_backward(lA: Optional[LinearA], uA: Optional[LinearA], dl: Tensor, bl: Optional[Tensor],
                   du: Tensor, bu: Optional[Tensor]):
    """Map both sides through the lines; returns (lA', lower bias, uA', upper bias).

    For the lower bound a row's positive entries take the lower line and its negative entries the
    upper line; for the upper bound the reverse."""
    A = lA if lA is not None else uA
    if A is None:
        return None, 0, None, 0
    parts = [dl, du] + [b for b in (bl, bu) if b is not None]
    # A part may carry its own row dimension (B, N, *node): α-CROWN's per-row parameters.
    if isinstance(A, Patches):
        # One gather of all the per-neuron lines into the rows' windows, one of the per-row ones,
        # one of the per-group ones.
        grouped = [i for i, p in enumerate(parts) if isinstance(p, RowGroups)]
        if grouped and any(parts[i].group is not parts[grouped[0]].group for i in grouped):
            parts = [p.dense() if isinstance(p, RowGroups) else p for p in parts]
            grouped = []
        node_dim = 1 + len(A.shape)
        # one row for all rows: a per-neuron part
        parts = [p.squeeze(1) if not isinstance(p, RowGroups) and p.dim() != node_dim and p.shape[1] == 1 else p
                 for p in parts]
        out: list = [None] * len(parts)
        plain = [i for i in range(len(parts)) if i not in grouped]
        for idx, extract, get in (
                ([i for i in plain if parts[i].dim() == node_dim], A.extract, lambda p: p),
                ([i for i in plain if parts[i].dim() != node_dim], A.extract_rows, lambda p: p),
                (grouped, lambda t: A.extract_groups(t, parts[grouped[0]].group), lambda p: p.values)):
            if not idx:
                continue
            shape = torch.broadcast_shapes(*(get(parts[i]).shape for i in idx))
            ext = extract(torch.cat([get(parts[i]).expand(shape) for i in idx], -3))
            for i, e in zip(idx, ext.chunk(len(idx), dim=2)):
                out[i] = e
        parts = out
    else:
        ndim = A.dim()
        parts = [p.dense() if isinstance(p, RowGroups) else p for p in parts]
        parts = [p if p.dim() == ndim else p.unsqueeze(1) for p in parts]
    dl, du = parts[0], parts[1]
    rest = parts[2:]
    bl = rest.pop(0) if bl is not None else None
    bu = rest.pop(0) if bu is not None else None

    def side(A, d_pos, b_pos, d_neg, b_neg):
        if A is None:
            return None, 0
        a = A.patches if isinstance(A, Patches) else A
        pos = a >= 0
        na = torch.where(pos, d_pos, d_neg) * a
        if b_pos is None and b_neg is None:
            bias = 0
        else:
            if b_pos is None:
                b = torch.where(pos, 0.0, b_neg)
            elif b_neg is None:
                b = torch.where(pos, b_pos, 0.0)
            else:
                b = torch.where(pos, b_pos, b_neg)
            bias = (b * a).flatten(2).sum(-1)
        return (A.with_patches(na) if isinstance(A, Patches) else na), bias

    nl, lbias = side(lA, dl, bl, du, bu)
    nu, ubias = side(uA, du, bu, dl, bl)
    return nl, lbias, nu, ubias


def relax_backward_sides(lA: Optional[LinearA], uA: Optional[LinearA], lines, alpha):
    """`relax_backward` with each side's own lines: ``lines(alpha[0])`` for the lower bound's rows,
    ``lines(alpha[1])`` for the upper bound's (α-CROWN optimizes the two separately)."""
    nl, lbias, nu, ubias = None, 0, None, 0
    if lA is not None:
        nl, lbias, _, _ = relax_backward(lA, None, *lines(alpha[0]))
    if uA is not None:
        _, _, nu, ubias = relax_backward(None, uA, *lines(alpha[1]))
    return nl, lbias, nu, ubias


class ElementwiseRelaxOp(BoundOp):
    """Base of monotone non-decreasing elementwise nonlinearities f."""

    supports_patches = True
    relaxed_inputs = (0,)
    monotone_elementwise = True
    ibp_operands = "unary"
    #: Ops whose lower line on unstable neurons is a line through the origin with any slope in
    #: this range (ReLU: [0, 1]) set it; α-CROWN then optimizes that slope (Xu et al. 2021).
    alpha_range: ClassVar[Optional[tuple[float, float]]] = None
    #: `backward_alpha` accepts `RowGroups` α (α-CROWN then never expands per-channel α to one
    #: copy per row); the ReLU-style `backward_alpha` below does, subclasses set it
    alpha_row_groups: ClassVar[bool] = False

    def fn(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def relax(self, l: Tensor, u: Tensor) -> Lines:
        raise NotImplementedError

    def ibp(self, x, *args, **kwargs):
        l, u = x.bounds
        return self.fn(l), self.fn(u)

    def backward(self, lA, uA, x, *args, **kwargs):
        dl, bl, du, bu = self.relax(*x.bounds)
        nl, lbias, nu, ubias = relax_backward(lA, uA, dl, bl, du, bu)
        return [(x, nl, nu)], lbias, ubias

    def alpha_init(self, l: Tensor, u: Tensor) -> Tensor:
        return self.relax(l, u)[0]  # the lower line's slope

    def backward_alpha(self, lA, uA, alpha: tuple[Optional[Tensor], Optional[Tensor]], x, *args, **kwargs):
        """Backward with the lower-line slope of unstable neurons given by ``alpha`` = (slopes for
        the lower bound's rows, slopes for the upper bound's rows), each (B, N or 1, *node_shape)
        in ``alpha_range``: any such slope gives a valid lower line, so every α is sound
        (α-CROWN, Xu et al. 2021, Sec. 3.1)."""
        l, u = x.bounds
        dl, bl, du, bu = self.relax(l, u)
        unst = self.unstable(l, u)

        def slope(a):
            if a is None:
                return dl
            if isinstance(a, RowGroups):  # one slope per neuron and group of rows
                return a.map(lambda v: torch.where(unst.unsqueeze(1), v, dl.unsqueeze(1)))
            if a.shape[1] == 1:  # one slope per neuron, shared by every row (keeps Patches)
                return torch.where(unst, a.squeeze(1), dl)
            return torch.where(unst.unsqueeze(1), a, dl.unsqueeze(1))

        nl, lbias, nu, ubias = None, 0, None, 0
        if lA is not None:
            nl, lbias, _, _ = relax_backward(lA, None, slope(alpha[0]), bl, du, bu)
        if uA is not None:
            _, _, nu, ubias = relax_backward(None, uA, slope(alpha[1]), bl, du, bu)
        return [(x, nl, nu)], lbias, ubias
