"""Linear layers: y = x W^T + b (nn.Linear, F.linear)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import CenterRadius, LinearOp, const
from .registry import register_op


@register_op("Linear")
class BoundLinear(LinearOp):
    ibp_operands = "unary"
    ibp_exact_on_box = True
    targets = (nn.Linear, F.linear)

    def params(self, args):
        if self.module is not None:
            return self.module.weight, self.module.bias
        w = const(args[1])
        b = const(args[2]) if len(args) > 2 else None
        return w, b

    def ibp(self, x, *args):
        w, b = self.params((x, *args))
        if x.image is not None:  # the set itself (e.g. the dual norm of an Lp ball), not its box
            out = x.image.linear(w, b)
            if out is not None:
                return out
        # Centre/radius form: W c + b +- |W| r (Gowal et al. 2018, eq. 6); centre = f·c, radius =
        # f·r with f folded into the weights (exact for f = 0.5).
        c, r, f = x.scaled_center_radius()
        if f != 1.0:  # scale the outputs (a weight matrix is usually the larger tensor)
            c = F.linear(c, w) * f
            return CenterRadius(c + b if b is not None else c, F.linear(r, w.abs()) * f)
        return CenterRadius(F.linear(c, w, b), F.linear(r, w.abs()))

    def ibp_spec(self, C, x, *args):
        """IBP of C·y with C folded into the layer (W' = C W, b' = C b): tighter than applying C
        to the interval of y (Gowal et al. 2018, Sec. 3, "elision of the last layer")."""
        w, b = self.params((x, *args))
        if x.value.dim() != 2:
            return None
        w2 = torch.matmul(C, w)  # (B, S, in)
        b2 = torch.matmul(C, b) if b is not None else 0
        if x.image is not None:
            out = x.image.linear(w2, b2 if b is not None else None)
            if out is not None:
                return out
        c, r = x.center_radius
        c = torch.bmm(w2, c.unsqueeze(-1)).squeeze(-1) + b2
        r = torch.bmm(w2.abs(), r.unsqueeze(-1)).squeeze(-1)
        return c - r, c + r

    def backward_one(self, A, x, *args):
        w, b = self.params((x, *args))
        nA = A.matmul(w)
        bias = 0
        if b is not None:
            s = A.sum(dim=tuple(range(2, A.dim() - 1))) if A.dim() > 3 else A
            bias = s.matmul(b)
        return [(x, nA)], bias
