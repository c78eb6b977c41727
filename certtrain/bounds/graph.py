"""Tracing a PyTorch model into the graph the bound engine walks.

We trace with ``torch.fx.symbolic_trace`` rather than ``torch.export``: fx keeps every
``torch.nn`` layer as one node that refers to the user's own module, so a Conv2d or BatchNorm is a
single bound rule with its live parameters (no copies to keep in sync after an optimizer step) and
BatchNorm keeps its train/eval behaviour; tracing takes milliseconds and is shape-agnostic, so one
trace serves every batch size.  ``torch.export`` instead lowers to ATen ops, lifts parameters into
inputs and functionalizes BatchNorm's running-stat updates, which is the right trade-off for a
compiler but not for a bound engine that must mirror the module the user trains.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import fx, nn

from .functionalize import InPlaceError, functionalize
from .ops.base import BoundOp
from .ops.registry import lookup


class TraceError(RuntimeError):
    """The model could not be traced into a static graph."""


class _Tracer(fx.Tracer):
    """fx's tracer, except that layers with a substitute (`certtrain.bounds.substitutes`: layers
    whose own forward fx cannot trace or the engine has no single rule for, such as
    nn.MultiheadAttention or nn.LSTMCell) are traced through that substitute."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def call_module(self, m, forward, args, kwargs):
        from .substitutes import MODULES, with_bounded_parameters
        sub = with_bounded_parameters(m) or MODULES.get(type(m))
        if sub is not None:
            return sub(m, *args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


@dataclass(eq=False)
class BoundNode:
    """A node of the traced graph and, when it can depend on a perturbed input, its bound rule."""

    name: str
    kind: str  # fx op: placeholder, get_attr, call_module, call_function, call_method, output
    fx_node: fx.Node
    module: Optional[nn.Module] = None
    op: Optional[BoundOp] = None
    inputs: list[str] = field(default_factory=list)  # distinct input nodes, first use first

    def arg_name(self, i: int) -> Optional[str]:
        """The node passed as positional argument i (None for a constant there)."""
        args = self.fx_node.args
        return args[i].name if i < len(args) and isinstance(args[i], fx.Node) else None

    @property
    def relaxed_names(self) -> list[str]:
        """The nodes whose bounds this node's relaxation needs (``op.relaxed_inputs`` are argument
        positions; one node may fill several of them, as in ``x * x``)."""
        if self.op is None:
            return []
        out = []
        for i in self.op.relaxed_inputs:
            name = self.arg_name(i)
            if name is not None and name not in out:
                out.append(name)
        return out


_SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "nelement"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}


import torch  # noqa: E402

#: ops whose result depends on a tensor's shape, dtype and device only, never its values
_VALUE_FREE_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like}
_VALUE_FREE_METHODS = {"new_zeros", "new_ones", "new_full", "new_empty"}


def invariant_shift(x, dim: int):
    """A constant shift for a shift-invariant function (softmax): the clean maximum over ``dim``.
    The engine treats it as a constant of the bound computation: the function's value is the same
    for every shift, so the bounds hold for every point of the set (see ops/softmax.py)."""
    return x.detach().amax(dim, keepdim=True)


def per_example(p):
    """A parameter as a graph value with a leading batch dimension of 1; where the parameter is a
    `BoundedParameter`, the engine turns this node into an input of one copy per example (each
    example's bound then holds for every parameter in the set)."""
    return p.unsqueeze(0)


def is_set_constant(node: "BoundNode") -> bool:
    """Whether a node reading a perturbed tensor is a constant of the bound computation: a shape
    query, or an `invariant_shift` (computed from the clean values)."""
    return is_shape_query(node) or (node.kind == "call_function" and node.fx_node.target is invariant_shift)


def is_shape_query(node: "BoundNode") -> bool:
    """Whether a node reads only a tensor's shape, dtype or device (``x.size()``, ``x.shape``,
    ``len(x)``, ``torch.zeros_like(x)`` ...): safe on a perturbed tensor, and its result does not
    depend on the perturbation."""
    t = node.fx_node.target
    if node.kind == "call_method":
        return t in _SHAPE_METHODS or t in _VALUE_FREE_METHODS
    if node.kind == "call_function":
        if t is getattr:
            return len(node.fx_node.args) == 2 and node.fx_node.args[1] in _SHAPE_ATTRS
        return t is len or t in _VALUE_FREE_FUNCTIONS
    return False


def trace(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule) and getattr(model, "_certtrain_traced", False):
        return model  # built by the engine itself (e.g. a gradient graph): keep its nodes as they are
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many types for untraceable code
        raise TraceError(
            f"could not trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}). "
            "The bound engine needs a static graph: avoid Python control flow that depends on tensor "
            "values in forward(), or wrap such a part in a leaf module.") from e
    gm = fx.GraphModule(tracer.root, graph)
    try:
        return functionalize(gm)  # the engine must never mutate a tensor (see functionalize.py)
    except InPlaceError as e:
        raise TraceError(str(e)) from None


def build_nodes(gm: fx.GraphModule) -> list[BoundNode]:
    nodes = []
    for n in gm.graph.nodes:
        module = gm.get_submodule(n.target) if n.op == "call_module" else None
        nodes.append(BoundNode(n.name, n.op, n, module, None, [i.name for i in n.all_input_nodes]))
    return nodes


def attach_op(node: BoundNode, opts: dict) -> BoundOp:
    """Find and instantiate the bound rule of a node (raises UnsupportedOperation)."""
    if node.op is None:
        node.op = lookup(node.fx_node, node.module)(node.fx_node, node.module, opts)
    return node.op


def fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
