"""``F.unfold`` (im2col): every output element is one input element or padding, so the interval
maps through it and backward is its adjoint ``F.fold``.  Used by Conv2d with a perturbed weight,
which the trace rewrites as ``W_flat @ unfold(x)`` (`certtrain.bounds.substitutes`)."""
from __future__ import annotations

import torch.nn.functional as F

from ..patches import to_dense
from .base import CenterRadius, LinearOp, const
from .registry import register_op


@register_op("Unfold")
class BoundUnfold(LinearOp):
    targets = (F.unfold,)
    ibp_operands = "unary"

    def _kw(self, args, kwargs):
        names = ("kernel_size", "dilation", "padding", "stride")
        defaults = (None, 1, 0, 1)
        return {k: const(args[i]) if len(args) > i else kwargs.get(k, d) for i, (k, d) in enumerate(zip(names, defaults))}

    def ibp(self, x, *args, **kwargs):
        kw = self._kw(args, kwargs)
        c, r = x.center_radius
        return CenterRadius(F.unfold(c, **kw), F.unfold(r, **kw))

    def backward_one(self, A, x, *args, **kwargs):
        kw = self._kw(args, kwargs)
        A = to_dense(A)
        B, N = A.shape[:2]
        shape = x.value.shape[1:]
        nA = F.fold(A.reshape(B * N, *A.shape[2:]), output_size=shape[-2:], **kw)
        return [(x, nA.view(B, N, *shape))], 0
