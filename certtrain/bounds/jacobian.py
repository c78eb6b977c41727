"""Guaranteed bounds on a network's input gradients over a perturbation set: the Jacobian, a
Jacobian-vector product and the L∞ local Lipschitz constant (Shi et al., NeurIPS 2022, "Efficiently
Computing Local Lipschitz Constants of Neural Networks via Bound Propagation").

    bj = BoundedJacobian(model, x0)                      # all outputs; C=... for chosen rows
    x = BoundedTensor(x0, PerturbationLpNorm(norm=float("inf"), eps=2 / 255))
    lb, ub = bj.jacobian(x, method="CROWN")              # (N, rows, *x.shape[1:])
    lb, ub = bj.jvp(x, v, method="CROWN")                # (N, rows)
    lip = bj.lipschitz(x, method="CROWN")                # (N, rows): max over the set of ||dy_i/dx||_1

The bounds come from the gradient graph (`certtrain.bounds.gradient_graph.build_gradient_graph`) bounded by the
engine's methods (IBP, CROWN, α-CROWN); ``forward_method`` first bounds the forward network alone
(e.g. α-CROWN with optimized intermediate layers) and hands its pre-activation bounds to the
gradient graph, so that fewer ReLUs count as unstable.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .bounded_module import BoundedModule
from .gradient_graph import KINDS, check_eval, build_gradient_graph
from .methods import BoundMethod, get_method
from .perturbations import PerturbationLpNorm
from .tensor import BoundedTensor

Method = Union[str, BoundMethod]


class BoundedJacobian:
    """Bounds of d(C y)/dx for a model y = f(x) with one input and one output tensor.

    ``C``: (rows, n_out) spec rows over the flattened output (default: the identity, every
    output); ``bound_opts`` as for `BoundedModule`.  The model must be in eval mode (BatchNorm's
    running statistics and no dropout: the gradient is that of the deployed network)."""

    def __init__(self, model: nn.Module, example_input: Tensor, C: Optional[Tensor] = None,
                 bound_opts: Optional[Mapping[str, Any]] = None):
        if not isinstance(example_input, Tensor):
            raise TypeError("BoundedJacobian needs one example input tensor (a model with one input)")
        check_eval(model)  # before running it: a training-mode BatchNorm would update its statistics
        self.model = model
        example = example_input.detach()
        with torch.no_grad():
            out = model(example)
        if not isinstance(out, Tensor):
            raise TypeError(f"BoundedJacobian needs a model that returns one tensor, got {type(out).__name__}")
        n_out = math.prod(out.shape[1:])
        if C is None:
            C = torch.eye(n_out, dtype=example.dtype, device=example.device)
        C = torch.as_tensor(C, dtype=example.dtype, device=example.device)
        if C.dim() == 1:
            C = C.unsqueeze(0)
        if C.dim() != 2 or C.shape[1] != n_out:
            raise ValueError(f"C must be (rows, {n_out}) over the model's flattened output, got {tuple(C.shape)}")
        self.C = C
        self.example = example
        self.bound_opts = dict(bound_opts or {})
        self._nets: dict[str, BoundedModule] = {}
        self._forward: Optional[BoundedModule] = None

    @property
    def rows(self) -> int:
        return self.C.shape[0]

    def net(self, kind: str) -> BoundedModule:
        """The `BoundedModule` of the gradient graph of ``kind`` (built on first use)."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        if kind not in self._nets:
            gm = build_gradient_graph(self.model, self.example, self.C, kind)
            example = (self.example, torch.zeros_like(self.example)) if kind == "jvp" else self.example
            self._nets[kind] = BoundedModule(gm, example, bound_opts=self.bound_opts)
        return self._nets[kind]

    # ------------------------------------------------------------------ bounds
    def forward_bounds(self, x: BoundedTensor, method: Method = "CROWN") -> dict[str, tuple[Tensor, Tensor]]:
        """Bounds of every node of the forward network over x's set, by ``method`` on the forward
        network alone (α-CROWN optimizes its intermediate layers), keyed by graph node."""
        if self._forward is None:
            self._forward = BoundedModule(self.model, self.example, bound_opts=self.bound_opts)
        with torch.no_grad():
            *_, state = self._forward.compute_bounds(x=(x,), method=method, return_state=True)
        return state.intermediate()

    def _bounds(self, kind: str, inputs: tuple, method: Method, forward_method: Optional[Method]):
        x = inputs[0]
        if not isinstance(x, BoundedTensor) or not isinstance(x.ptb, PerturbationLpNorm):
            raise TypeError("x must be a BoundedTensor with a PerturbationLpNorm (an Lp ball or box around x)")
        m = get_method(method)
        if m.name == "CROWN-IBP":
            raise ValueError("CROWN-IBP is a training method; bound gradients with 'IBP', 'CROWN' or 'alpha-CROWN'")
        net = self.net(kind)
        interm = None
        if forward_method is not None:
            fwd = self.forward_bounds(x, forward_method)
            names = {n.name for n in net.nodes}
            interm = {k: v for k, v in fwd.items() if k in names and k != net.final_name}
        return net.compute_bounds(x=inputs, method=m, intermediate_bounds=interm)

    def jacobian(self, x: BoundedTensor, method: Method = "CROWN", forward_method: Optional[Method] = None):
        """(lower, upper), each (N, rows, *x.shape[1:]): bounds of every entry of d(C y)/dx over the set."""
        lb, ub = self._bounds("jacobian", (x,), method, forward_method)
        shape = (x.shape[0], self.rows, *x.shape[1:])
        return lb.reshape(shape), ub.reshape(shape)

    def jvp(self, x: BoundedTensor, v: Tensor, method: Method = "CROWN", forward_method: Optional[Method] = None):
        """(lower, upper), each (N, rows): bounds of J(x') v over x' in the set (v: x's shape)."""
        v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        if v.shape != x.shape:
            if v.shape == x.shape[1:]:
                v = v.expand_as(x)
            else:
                raise ValueError(f"v must have x's shape {tuple(x.shape)} (or one example's), got {tuple(v.shape)}")
        lb, ub = self._bounds("jvp", (x, v.contiguous()), method, forward_method)
        return lb.reshape(x.shape[0], self.rows), ub.reshape(x.shape[0], self.rows)

    def lipschitz(self, x: BoundedTensor, method: Method = "CROWN", forward_method: Optional[Method] = None) -> Tensor:
        """(N, rows): an upper bound of max over the set of ||d(C y)_i/dx||_1, the local Lipschitz
        constant of (C y)_i in the L∞ norm (|f(a) - f(b)| <= L ||a - b||_∞ for a, b in the set)."""
        _, ub = self._bounds("lipschitz", (x,), method, forward_method)
        return ub.reshape(x.shape[0], self.rows)


def gradient_l1_norms(model: nn.Module, x: Tensor, C: Optional[Tensor] = None) -> Tensor:
    """(N, rows): ||d(C y)_i/dx||_1 at the points x, by autograd (sampled lower bounds of the
    local Lipschitz constant)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = model(x).flatten(1)
        if C is None:
            C = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
        out = []
        for i in range(C.shape[0]):
            (g,) = torch.autograd.grad((y @ C[i]).sum(), x, retain_graph=i + 1 < C.shape[0])
            out.append(g.flatten(1).abs().sum(1))
    return torch.stack(out, 1)
