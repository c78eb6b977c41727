"""1-D convolutions (nn.Conv1d, F.conv1d) over (B, C, L): IBP in centre/radius form, backward by
the transposed convolution on dense coefficients."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..patches import to_dense
from .base import CenterRadius, LinearOp, const
from .registry import UnsupportedOperation, register_op


def _one(v) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


@register_op("Conv1d")
class BoundConv1d(LinearOp):
    targets = (nn.Conv1d, F.conv1d)
    ibp_operands = "unary"
    ibp_exact_on_box = True

    def params(self, args):
        if self.module is not None:
            m = self.module
            if m.padding_mode != "zeros":
                raise UnsupportedOperation(f"Conv1d with padding_mode={m.padding_mode!r} at node "
                                           f"'{self.node.name}': only zero padding has a bound rule")
            pad = m.padding
            return m.weight, m.bias, _one(m.stride), self._padding(pad, m.weight, _one(m.dilation)), \
                _one(m.dilation), m.groups
        a = list(args) + [None] * (7 - len(args))
        kw = self.node.kwargs
        w = const(a[1])
        b = const(a[2] if a[2] is not None else kw.get("bias"))
        stride = _one(a[3] or kw.get("stride", 1))
        padding = a[4] if a[4] is not None else kw.get("padding", 0)
        dilation = _one(a[5] or kw.get("dilation", 1))
        groups = a[6] or kw.get("groups", 1)
        return w, b, stride, self._padding(padding, w, dilation), dilation, groups

    def _padding(self, padding, w, dilation):
        if padding == "valid":
            return 0
        if padding == "same":
            tot = dilation * (w.shape[-1] - 1)
            if tot % 2:
                raise UnsupportedOperation(f"Conv1d padding='same' with an even kernel at node "
                                           f"'{self.node.name}' pads asymmetrically; use explicit padding")
            return tot // 2
        return _one(padding)

    def ibp(self, x, *args):
        w, b, s, p, d, g = self.params((x, *args))
        if x.image is not None:  # the set itself (e.g. the dual norm of each filter), not its box
            out = x.image.conv(lambda t, w_, b_: F.conv1d(t, w_, b_, s, p, d, g), w, b,
                               lambda t: F.unfold(t.unsqueeze(-2), (1, w.shape[-1]), dilation=(1, d),
                                                  padding=(0, p), stride=(1, s)) if g == 1 else None)
            if out is not None:
                return out
        c, r, f = x.scaled_center_radius()
        w = w * f if f != 1.0 else w
        return CenterRadius(F.conv1d(c, w, b, s, p, d, g), F.conv1d(r, w.abs(), None, s, p, d, g))

    def backward_one(self, A, x, *args):
        w, b, s, p, d, g = self.params((x, *args))
        A = to_dense(A)
        B, N, Co, Lo = A.shape
        Li = x.value.shape[-1]
        out_pad = Li - ((Lo - 1) * s - 2 * p + d * (w.shape[-1] - 1) + 1)
        nA = F.conv_transpose1d(A.reshape(B * N, Co, Lo), w, None, s, p, out_pad, g, d)
        bias = A.sum(-1).matmul(b) if b is not None else 0
        return [(x, nA.view(B, N, *nA.shape[1:]))], bias
