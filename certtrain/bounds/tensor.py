"""BoundedTensor: an input tensor that carries its perturbation set."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

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


class BoundedParameter(nn.Parameter):
    """A parameter that carries a perturbation set (auto_LiRPA's name): the bounds then hold for
    every value of the parameter in the set, e.g. an Lp ball around the trained weight.

        model.fc.weight = BoundedParameter(model.fc.weight.data, PerturbationLpNorm(norm=2, eps=0.01))
        net = BoundedModule(model, x0)          # after the assignment: which parameters are perturbed
                                                # is part of the traced graph
    ``ptb`` is read at every ``compute_bounds`` (its eps may change; ``None``: not perturbed now).
    Supported on the weight and bias of nn.Linear (on (batch, features) inputs) and nn.Conv2d
    (groups=1), and the affine parameters of BatchNorm in eval mode."""

    ptb: Optional[Perturbation]

    def __new__(cls, data: Tensor, ptb: Optional[Perturbation] = None, requires_grad: bool = True):
        t = super().__new__(cls, data, requires_grad)
        t.ptb = ptb
        return t

    def __deepcopy__(self, memo):
        out = BoundedParameter(self.data.clone(memory_format=torch.preserve_format), self.ptb, self.requires_grad)
        memo[id(self)] = out
        return out

    def __repr__(self) -> str:
        return f"BoundedParameter({self.data!r}, ptb={self.ptb!r})"

    def __reduce_ex__(self, proto):  # pickles (checkpoints) as a plain parameter plus its set
        return (BoundedParameter, (self.data, self.ptb, self.requires_grad))
