"""2-D convolutions (nn.Conv2d, F.conv2d) and the convolution algebra that pooling reuses.

Backward (CROWN) through a convolution is its transpose (Zhang et al. 2018, Boopathy et al.
2019): dense bounds use conv_transpose2d on all rows at once; `Patches` rows only carry their
window, which grows to (k-1)*stride + dilation*(kernel-1) + 1 and shifts to offset*stride - pad.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..patches import LinearA, Patches
from .base import CenterRadius, LinearOp, const
from .registry import UnsupportedOperation, register_op


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_ibp(c: Tensor, r: Tensor, w: Tensor, b: Optional[Tensor], stride, padding, dilation, groups):
    """IBP in centre/radius form: conv(c) + b, conv(r) with |W|."""
    return CenterRadius(F.conv2d(c, w, b, stride, padding, dilation, groups),
                        F.conv2d(r, w.abs(), None, stride, padding, dilation, groups))


def conv_backward(A: LinearA, w: Tensor, stride, padding, dilation, groups, in_shape) -> LinearA:
    """Coefficients on the conv input from coefficients on its output (the adjoint map)."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = w.shape[-2:]
    if isinstance(A, Patches):
        B, N, Co, ph, pw = A.patches.shape
        p = F.conv_transpose2d(A.patches.reshape(B * N, Co, ph, pw), w, None, stride, 0, 0,
                               groups, dilation)
        p = p.view(B, N, *p.shape[1:])
        off = A.offsets * torch.tensor(stride, device=A.offsets.device) - torch.tensor(
            padding, device=A.offsets.device)
        out = Patches(p, off, tuple(in_shape))
        # Keep window entries outside the input at zero (they are the conv's zero padding).
        return out.with_patches(p * out.inside_mask().unsqueeze(0))
    B, N = A.shape[:2]
    Co, Ho, Wo = A.shape[2:]
    Hi, Wi = in_shape[-2:]
    out_pad = (Hi - ((Ho - 1) * stride[0] - 2 * padding[0] + dilation[0] * (kh - 1) + 1),
               Wi - ((Wo - 1) * stride[1] - 2 * padding[1] + dilation[1] * (kw - 1) + 1))
    nA = F.conv_transpose2d(A.reshape(B * N, Co, Ho, Wo), w, None, stride, padding, out_pad,
                            groups, dilation)
    return nA.view(B, N, *nA.shape[1:])


def channel_bias(A: LinearA, b: Tensor) -> Tensor:
    """Rows' inner product with a per-channel constant b (C,) broadcast over space: (B, N)."""
    if isinstance(A, Patches):
        return A.patches.sum((3, 4)).matmul(b)  # window entries outside the node are zero
    return A.flatten(3).sum(-1).matmul(b)


@register_op("Conv2d")
class BoundConv2d(LinearOp):
    ibp_operands = "unary"
    ibp_exact_on_box = True
    targets = (nn.Conv2d, F.conv2d)
    supports_patches = True

    def params(self, args, kwargs=None):
        if self.module is not None:
            m = self.module
            if m.padding_mode != "zeros":
                raise UnsupportedOperation(f"Conv2d with padding_mode={m.padding_mode!r} at node "
                                           f"'{self.node.name}': only zero padding has a bound rule")
            return m.weight, m.bias, m.stride, self._padding(m.padding, m.weight, m.dilation), m.dilation, m.groups
        a = list(args) + [None] * (7 - len(args))
        kw = {k: const(v) for k, v in (kwargs or {}).items()}
        w = const(a[1] if a[1] is not None else kw.get("weight"))
        b = const(a[2] if a[2] is not None else kw.get("bias"))
        stride = a[3] or kw.get("stride", 1)
        padding = a[4] if a[4] is not None else kw.get("padding", 0)
        dilation = a[5] or kw.get("dilation", 1)
        groups = a[6] or kw.get("groups", 1)
        return w, b, _pair(stride), self._padding(padding, w, _pair(dilation)), _pair(dilation), groups

    def _padding(self, padding, w, dilation):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            tot = [d * (k - 1) for d, k in zip(dilation, w.shape[-2:])]
            if any(t % 2 for t in tot):
                raise UnsupportedOperation(f"Conv2d padding='same' with an even kernel at node "
                                           f"'{self.node.name}' pads asymmetrically; use explicit padding")
            return tuple(t // 2 for t in tot)
        return _pair(padding)

    def ibp(self, x, *args, **kwargs):
        w, b, s, p, d, g = self.params((x, *args), kwargs)
        if x.image is not None:  # the set itself (e.g. the dual norm of each filter), not its box
            out = x.image.conv(lambda t, w_, b_: F.conv2d(t, w_, b_, s, p, d, g), w, b,
                               lambda t: F.unfold(t, w.shape[-2:], dilation=d, padding=p, stride=s) if g == 1 else None)
            if out is not None:
                return out
        c, r, f = x.scaled_center_radius()
        if f != 1.0:  # centre = f·c, radius = f·r: fold f into the weights (exact for f = 0.5)
            return CenterRadius(F.conv2d(c, w * f, b, s, p, d, g), F.conv2d(r, w.abs() * f, None, s, p, d, g))
        return conv_ibp(c, r, w, b, s, p, d, g)

    def backward_one(self, A, x, *args, **kwargs):
        w, b, s, p, d, g = self.params((x, *args), kwargs)
        nA = conv_backward(A, w, s, p, d, g, x.value.shape[1:])
        return [(x, nA)], (channel_bias(A, b) if b is not None else 0)
