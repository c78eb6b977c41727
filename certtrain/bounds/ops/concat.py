"""torch.cat: each input receives the slice of the rows' coefficients that covers it."""
from __future__ import annotations

import torch

from ..patches import Patches, a_dot
from .base import LinearOp, const, is_perturbed
from .registry import UnsupportedOperation, register_op


@register_op("Cat")
class BoundCat(LinearOp):
    ibp_operands = "list"  # const(tensors[0]).dim()
    targets = (torch.cat, torch.concat)
    supports_patches = True

    def _parts(self, args, kwargs):
        tensors = args[0]
        dim = const(args[1]) if len(args) > 1 else kwargs.get("dim", 0)
        nd = const(tensors[0]).dim()
        dim = dim % nd
        if dim == 0:
            raise UnsupportedOperation(f"torch.cat along the batch dimension at node '{self.node.name}'")
        return tensors, dim

    def ibp(self, *args, **kwargs):
        tensors, dim = self._parts(args, kwargs)
        bounds = [t.bounds if is_perturbed(t) else (const(t), const(t)) for t in tensors]
        return torch.cat([b[0] for b in bounds], dim), torch.cat([b[1] for b in bounds], dim)

    def backward_one(self, A, *args, **kwargs):
        tensors, dim = self._parts(args, kwargs)
        if isinstance(A, Patches) and dim != 1:
            A = A.to_dense()
        out, bias, start = [], 0, 0
        for t in tensors:
            n = const(t).shape[dim]
            if isinstance(A, Patches):
                part = Patches(A.patches[:, :, start:start + n], A.offsets, (n, *A.shape[1:]))
            else:
                part = A.narrow(dim + 1, start, n)
            start += n
            if is_perturbed(t):
                out.append((t, part))
            else:
                c = const(t)
                bias = bias + a_dot(part, c)
        return out, bias
