"""Batch normalization as a per-channel affine map.

In eval mode the running statistics are used; in training mode the statistics of the clean batch
(the forward pass) are used and the perturbed inputs do not change them, as certified training
does (Gowal et al. 2018; Shi et al. 2021).
"""
from __future__ import annotations

import torch
from torch import nn

from ..patches import Patches
from .base import CenterRadius, LinearOp
from .conv import channel_bias
from .registry import register_op


@register_op("BatchNorm")
class BoundBatchNorm(LinearOp):
    ibp_operands = "unary"  # affine(): x.value.dtype/dim(); the batch itself with batch statistics
    targets = (nn.BatchNorm1d, nn.BatchNorm2d)
    supports_patches = True

    def ibp_reads_batch(self) -> bool:
        m = self.module
        return m.training or m.running_mean is None

    def affine(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) per channel so that y = scale * x + shift."""
        m = self.module
        v = x.value
        if m.training or m.running_mean is None:
            dims = [0] + list(range(2, v.dim()))
            # Two passes (mean, then the mean square deviation) rather than Tensor.var, whose
            # reduction over (0, 2, 3) is several times slower on CPU; same statistics.
            mean = v.mean(dims, keepdim=True)
            var = (v - mean).square().mean(dims)
            mean = mean.flatten()
        else:
            mean, var = m.running_mean, m.running_var
        scale = torch.rsqrt(var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight
        shift = -mean * scale
        if m.bias is not None:
            shift = shift + m.bias
        return scale.to(v.dtype), shift.to(v.dtype)

    def _bcast(self, t, nd):
        return t.view(1, -1, *([1] * (nd - 2)))

    def ibp(self, x, *args, **kwargs):
        scale, shift = self.affine(x)
        c, r = x.center_radius
        s, t = self._bcast(scale, c.dim()), self._bcast(shift, c.dim())
        return CenterRadius(c * s + t, r * s.abs())

    def ibp_image(self, x):
        if x.image is None:
            return None
        scale, shift = self.affine(x)
        nd = x.value.dim()
        return x.image.affine(self._bcast(scale, nd), self._bcast(shift, nd))

    def backward_one(self, A, x, *args, **kwargs):
        scale, shift = self.affine(x)
        if isinstance(A, Patches):
            return [(x, A.with_patches(A.patches * scale.view(1, 1, -1, 1, 1)))], channel_bias(A, shift)
        nd = A.dim() - 1
        nA = A * scale.view(1, 1, -1, *([1] * (nd - 2)))
        if A.dim() == 3:
            bias = A.matmul(shift)
        else:
            bias = channel_bias(A, shift) if A.dim() > 4 else A.sum(-1).matmul(shift)
        return [(x, nA)], bias
