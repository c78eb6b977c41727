"""Ops that return their input unchanged: Identity, Dropout in eval mode, clone."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LinearOp
from .registry import UnsupportedOperation, register_op


@register_op("Identity")
class BoundIdentity(LinearOp):
    ibp_operands = "unary"
    targets = (nn.Identity, nn.Dropout, nn.Dropout2d, F.dropout, torch.clone, "method:clone")
    supports_patches = True

    def _check(self):
        m, n = self.module, self.node
        if isinstance(m, (nn.Dropout, nn.Dropout2d)):
            training = m.training and m.p > 0
        elif n.target is F.dropout:
            training = n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True)
        else:
            training = False
        if training:
            raise UnsupportedOperation(
                f"Dropout at node '{n.name}' is active (training mode); bounds need a "
                "deterministic network: call model.eval() or remove dropout")

    def ibp(self, x, *args, **kwargs):
        self._check()
        return x.bounds

    def backward_one(self, A, x, *args, **kwargs):
        return [(x, A)], 0
