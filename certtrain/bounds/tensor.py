"""BoundedTensor: an input tensor that carries its perturbation set."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .perturbations import Perturbation


class BoundedTensor(Tensor):
    """A tensor with a ``ptb`` attribute (auto_LiRPA's name).

    It behaves as the plain tensor in every torch operation (results are plain tensors) and stays
    attached to the autograd graph of the tensor it wraps, so bounds are differentiable w.r.t. it.
    """

    ptb: Optional[Perturbation]

    @staticmethod
    def __new__(cls, x: Tensor, ptb: Optional[Perturbation] = None):
        t = x.as_subclass(cls)
        t.ptb = ptb
        return t

    def __init__(self, x: Tensor, ptb: Optional[Perturbation] = None):
        pass

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    def __repr__(self) -> str:
        return f"BoundedTensor({self.as_subclass(Tensor)!r}, ptb={self.ptb!r})"

    def plain(self) -> Tensor:
        return self.as_subclass(Tensor)
