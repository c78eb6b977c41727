"""The vector-Jacobian product of a 2-D convolution with one row dimension: the gradient graph's
image of nn.Conv2d / F.conv2d (`certtrain.bounds.gradient_graph`).

``conv2d_input_grad(g, w, ...)`` maps upstream gradients g (N, rows, C_out, H, W) to gradients on
the conv input (N, rows, C_in, H_in, W_in): the transposed convolution of each row.  The rows are
folded into the channels and the kernel repeated per row with ``groups * rows`` groups, so the
batch dimension stays first (the engine's requirement).  The map is linear; its adjoint, used by
backward, is the convolution itself.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import CenterRadius, LinearOp, const
from .registry import register_op


def _out_padding(in_hw, out_hw, w, stride, padding, dilation):
    return tuple(i - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
                 for i, o, k, s, p, d in zip(in_hw, out_hw, w.shape[-2:], stride, padding, dilation))


def conv2d_input_grad(g: Tensor, w: Tensor, stride: tuple, padding: tuple, dilation: tuple, groups: int,
                      in_hw: tuple) -> Tensor:
    """Gradient of sum(g * conv2d(x, w)) with respect to x, per row of g."""
    N, m, co, h, wd = g.shape
    wr = w.repeat(m, 1, 1, 1)
    out = F.conv_transpose2d(g.reshape(N, m * co, h, wd), wr, None, stride, padding,
                             _out_padding(in_hw, (h, wd), w, stride, padding, dilation), groups * m, dilation)
    return out.reshape(N, m, -1, *in_hw)


@register_op("Conv2dInputGrad")
class BoundConv2dInputGrad(LinearOp):
    targets = (conv2d_input_grad,)
    ibp_operands = "unary"
    ibp_exact_on_box = True

    def ibp(self, g, w, stride, padding, dilation, groups, in_hw):
        w = const(w)
        c, r = g.center_radius
        return CenterRadius(conv2d_input_grad(c, w, stride, padding, dilation, groups, in_hw),
                            conv2d_input_grad(r, w.abs(), stride, padding, dilation, groups, in_hw))

    def backward_one(self, A, g, w, stride, padding, dilation, groups, in_hw):
        w = const(w)
        B, R, m = A.shape[:3]
        wr = w.repeat(m, 1, 1, 1)
        out = F.conv2d(A.reshape(B * R, m * A.shape[3], *A.shape[4:]), wr, None, stride, padding, dilation, groups * m)
        return [(g, out.reshape(B, R, *g.value.shape[1:]))], 0
