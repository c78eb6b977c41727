"""Ops that only move elements: flatten/view/reshape/squeeze/unsqueeze and permute/transpose.

Their IBP applies the same op to both bounds; backward applies the inverse move to each row.
The batch dimension must stay first.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import LinearOp, const
from .registry import UnsupportedOperation, register_op


@register_op("Reshape")
class BoundReshape(LinearOp):
    ibp_operands = "unary"  # _check(): x.value.shape[0]
    targets = (nn.Flatten, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
               "method:view", "method:reshape", "method:flatten", "method:squeeze",
               "method:unsqueeze", "method:contiguous", "method:unflatten", torch.unflatten)

    def _check(self, x, out_shape):
        if out_shape[0] != x.value.shape[0]:
            raise UnsupportedOperation(
                f"reshape at node '{self.node.name}' changes the batch dimension "
                f"({tuple(x.value.shape)} -> {tuple(out_shape)}); bounds need the batch first")

    def ibp(self, x, *args, **kwargs):
        l, u = x.bounds
        lo, up = self.apply(l, *args, **kwargs), self.apply(u, *args, **kwargs)
        self._check(x, lo.shape)
        return lo, up

    def ibp_image(self, x, *args, **kwargs):
        if x.image is None:
            return None
        return x.image.map(lambda t: self.apply(t, *args, **kwargs))

    def backward_one(self, A, x, *args, **kwargs):
        return [(x, A.reshape(*A.shape[:2], *x.value.shape[1:]))], 0


@register_op("Permute")
class BoundPermute(LinearOp):
    ibp_operands = "unary"  # perm(): x.value.dim()
    targets = (torch.permute, torch.transpose, "method:permute", "method:transpose", "method:t")

    def perm(self, x, args, kwargs):
        nd = x.value.dim()
        t = self.node.target
        if t in ("transpose", torch.transpose) or t == "t":
            d0, d1 = (const(a) for a in args[:2]) if t != "t" else (0, 1)
            p = list(range(nd))
            p[d0 % nd], p[d1 % nd] = p[d1 % nd], p[d0 % nd]
        else:
            dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            dims = dims or kwargs.get("dims")
            p = [int(const(d)) % nd for d in dims]
        if p[0] != 0:
            raise UnsupportedOperation(f"permute/transpose at node '{self.node.name}' moves the batch "
                                       "dimension; bounds need the batch first")
        return p

    def ibp(self, x, *args, **kwargs):
        p = self.perm(x, args, kwargs)
        l, u = x.bounds
        return l.permute(p), u.permute(p)

    def backward_one(self, A, x, *args, **kwargs):
        p = self.perm(x, args, kwargs)
        pa = [0, 1] + [d + 1 for d in p[1:]]
        inv = [0] * len(pa)
        for i, d in enumerate(pa):
            inv[d] = i
        return [(x, A.permute(inv))], 0
