"""Convolution-shaped linear bounds ("patches").

During CROWN a linear bound on the neurons of a conv-shaped node (C, H, W) is a matrix with one
row per bounded neuron.  Back-propagated through convolutions, each row is non-zero only on the
neuron's receptive field, a small window.  `Patches` stores just that window per row, so memory
grows with the receptive field instead of with C*H*W (Xu et al. 2020, auto_LiRPA, Sec. 3.3).

Layout: ``patches`` is (B, N, C, kh, kw) for N rows; row n covers rows
``offsets[n,0] .. offsets[n,0]+kh-1`` and columns ``offsets[n,1] .. +kw-1`` of a node of shape
``(C, H, W)``.  Offsets may be negative or run past H/W; entries outside the node are kept at zero
(an invariant every operation below preserves), so sums and norms over a window are exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Patches:
    patches: Tensor  # (B, N, C, kh, kw)
    offsets: Tensor  # (N, 2) long, top-left corner of each row's window in node coordinates
    shape: tuple  # (C, H, W) of the node the rows act on

    @property
    def batch(self) -> int:
        return self.patches.shape[0]

    @property
    def n_rows(self) -> int:
        return self.patches.shape[1]

    @property
    def kernel(self) -> tuple:
        return tuple(self.patches.shape[-2:])

    def with_patches(self, patches: Tensor) -> "Patches":
        return Patches(patches, self.offsets, self.shape)

    @staticmethod
    def identity(batch: int, shape: tuple, rows: Tensor, dtype, device) -> "Patches":
        """Rows of the identity on a (C,H,W) node; ``rows`` holds flat indices into C*H*W."""
        C, H, W = shape
        c, h, w = rows // (H * W), (rows // W) % H, rows % W
        p = torch.zeros(batch, rows.numel(), C, 1, 1, dtype=dtype, device=device)
        p[:, torch.arange(rows.numel(), device=device), c, 0, 0] = 1.0
        return Patches(p, torch.stack([h, w], 1), tuple(shape))

    def _index(self):
        """Row/column indices of every window entry, shifted into a padded frame, and the padding."""
        kh, kw = self.kernel
        H, W = self.shape[1:]
        dev = self.offsets.device
        r = self.offsets[:, :1] + torch.arange(kh, device=dev)  # (N, kh)
        c = self.offsets[:, 1:] + torch.arange(kw, device=dev)  # (N, kw)
        pt, pl = max(0, -int(r.min())), max(0, -int(c.min()))
        pb, pr = max(0, int(r.max()) + 1 - H), max(0, int(c.max()) + 1 - W)
        return r + pt, c + pl, (pl, pr, pt, pb)

    def inside_mask(self) -> Tensor:
        """(N, 1, kh, kw) mask of window entries that lie inside the node."""
        kh, kw = self.kernel
        H, W = self.shape[1:]
        dev = self.offsets.device
        r = self.offsets[:, :1] + torch.arange(kh, device=dev)
        c = self.offsets[:, 1:] + torch.arange(kw, device=dev)
        mr = (r >= 0) & (r < H)
        mc = (c >= 0) & (c < W)
        return (mr[:, :, None] & mc[:, None, :])[:, None].to(self.patches.dtype)

    def extract(self, t: Tensor) -> Tensor:
        """Windows of a node-shaped tensor t (B or 1, C or 1, H, W) -> (B', N, C', kh, kw), zero outside."""
        rows, cols, pad = self._index()
        if any(pad):
            t = F.pad(t, pad)
        Wp = t.shape[-1]
        # One flat gather along the spatial axis (much faster than 2-D advanced indexing).
        idx = (rows[:, :, None] * Wp + cols[:, None, :]).flatten()
        out = t.flatten(2).index_select(2, idx)
        return out.view(*t.shape[:2], *rows.shape, cols.shape[1]).transpose(1, 2)

    def extract_rows(self, t: Tensor) -> Tensor:
        """Row n's window of t[:, n] for a per-row node-shaped tensor t (B', N, C', H, W) ->
        (B', N, C', kh, kw), zero outside the node (α-CROWN's per-row relaxation parameters)."""
        rows, cols, pad = self._index()
        if any(pad):
            t = F.pad(t, pad)
        Wp = t.shape[-1]
        idx = (rows[:, :, None] * Wp + cols[:, None, :]).flatten(1)  # (N, kh*kw)
        flat = t.flatten(3)
        out = flat.gather(3, idx[None, :, None, :].expand(*flat.shape[:3], idx.shape[1]))
        return out.view(*t.shape[:3], *self.kernel)

    def extract_groups(self, t: Tensor, group: Tensor) -> Tensor:
        """Row n's window of t[:, group[n]] for a tensor t (B', G, C', H, W) with one node-shaped
        slice per group of rows -> (B', N, C', kh, kw), zero outside the node."""
        rows, cols, pad = self._index()
        if any(pad):
            t = F.pad(t, pad)
        B_, G, C_, Hp, Wp = t.shape
        spatial = (rows[:, :, None] * Wp + cols[:, None, :]).flatten(1)  # (N, kh*kw)
        idx = (group.to(spatial.device)[:, None] * (Hp * Wp) + spatial).flatten()
        out = t.transpose(1, 2).reshape(B_, C_, G * Hp * Wp).index_select(2, idx)
        return out.view(B_, C_, -1, *self.kernel).transpose(1, 2)

    def dot(self, t: Tensor) -> Tensor:
        """Row-wise inner product with a node-shaped tensor t: (B, N)."""
        return (self.patches * self.extract(t)).sum((2, 3, 4))

    def to_dense(self) -> Tensor:
        """The full (B, N, C, H, W) matrix."""
        B, N, C, kh, kw = self.patches.shape
        H, W = self.shape[1:]
        rows, cols, (pl, pr, pt, pb) = self._index()
        dense = self.patches.new_zeros(N, H + pt + pb, W + pl + pr, B, C)
        n = torch.arange(N, device=rows.device)[:, None, None]
        dense[n, rows[:, :, None], cols[:, None, :]] = self.patches.permute(1, 3, 4, 0, 2)
        dense = dense[:, pt:pt + H, pl:pl + W]
        return dense.permute(3, 0, 4, 1, 2)

    def __add__(self, other: "LinearA") -> "LinearA":
        if isinstance(other, Tensor):
            return self.to_dense() + other
        if other.kernel == self.kernel and torch.equal(other.offsets, self.offsets):
            return self.with_patches(self.patches + other.patches)
        # Windows of different sizes: align them when the shift is the same for every row
        # (true for the branches of residual blocks), else fall back to dense.
        shift = other.offsets - self.offsets
        if (shift == shift[:1]).all():
            dr, dc = (int(v) for v in shift[0])
            top, left = min(0, dr), min(0, dc)
            bottom = max(self.kernel[0], dr + other.kernel[0])
            right = max(self.kernel[1], dc + other.kernel[1])
            kh, kw = bottom - top, right - left
            kh0, kw0 = self.kernel
            kh1, kw1 = other.kernel
            a = F.pad(self.patches, (-left, kw - kw0 + left, -top, kh - kh0 + top))
            b = F.pad(other.patches, (dc - left, kw - kw1 - dc + left, dr - top, kh - kh1 - dr + top))
            off = self.offsets + torch.tensor([top, left], device=self.offsets.device)
            return Patches(a + b, off, self.shape)
        return self.to_dense() + other.to_dense()

    __radd__ = __add__


LinearA = Union[Tensor, Patches]
"""A linear bound's coefficients: a dense (B, N, *node_shape) tensor or `Patches`."""


def a_dot(A: LinearA, t: Tensor) -> Tensor:
    """sum over the node's elements of A * t, per row: (B, N). t is node-shaped with batch (or broadcastable)."""
    if isinstance(A, Patches):
        return A.dot(t)
    t = t.expand(A.shape[0], *A.shape[2:]) if t.dim() == A.dim() - 1 else t
    return torch.bmm(A.flatten(2), t.reshape(A.shape[0], -1, 1)).squeeze(-1)


def a_map(A: LinearA, fn) -> LinearA:
    """Apply an elementwise function to the coefficients."""
    return A.with_patches(fn(A.patches)) if isinstance(A, Patches) else fn(A)


def a_scale(A: LinearA, t: Tensor) -> LinearA:
    """Multiply the coefficients elementwise by a node-shaped tensor (B or 1, *node_shape)."""
    if isinstance(A, Patches):
        return A.with_patches(A.patches * A.extract(t))
    return A * t.unsqueeze(1)


def a_flat(A: LinearA) -> Tensor:
    """(B, N, K) view of the coefficients, for norms."""
    return A.patches.flatten(2) if isinstance(A, Patches) else A.flatten(2)


def to_dense(A: LinearA) -> Tensor:
    return A.to_dense() if isinstance(A, Patches) else A
