"""In-place ops in a traced graph, made out-of-place so that the bound engine never mutates a
caller's tensor (or a clean value it still needs).

An in-place op ``y = op_(x)`` changes ``x`` for every later reader.  fx records the call but
keeps the later readers of ``x`` pointing at the node ``x``; rewriting the op to its out-of-place
form and pointing every later reader of ``x`` at ``y`` keeps the model's semantics exactly, as
long as no other tensor shares memory with ``x`` (a view), which is refused with a clear error.

* ``x.relu_()``, ``torch.relu_(x)``, ``F.relu_(x)``: the same name without ``_``;
* ``x += y`` (``operator.iadd`` and friends): ``x + y``;
* ``F.relu(x, inplace=True)`` (any function with an ``inplace`` argument): ``inplace=False``;
* ``nn.ReLU(inplace=True)`` and other modules with an ``inplace`` flag stay as they are (their
  bound rule is found by module type) and the engine calls them on a copy of their input
  (`call_module_safely`); the readers are rewired as above.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub,
                      operator.imul: operator.mul, operator.itruediv: operator.truediv,
                      operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
                      operator.ipow: operator.pow, operator.imatmul: operator.matmul,
                      operator.iand: operator.and_, operator.ior: operator.or_,
                      operator.ixor: operator.xor}

# Ops whose output may share memory with their (first) input.
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze",
                 "unsqueeze", "transpose", "permute", "t", "expand", "expand_as", "narrow", "select",
                 "contiguous", "detach", "chunk", "split", "unbind", "as_strided", "diagonal",
                 "movedim", "swapaxes", "swapdims", "unfold", "__getitem__", "to", "type", "type_as",
                 "float", "double", "half", "bfloat16", "data", "real", "imag"}
_VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                   torch.transpose, torch.permute, torch.t, torch.narrow, torch.select, torch.chunk,
                   torch.split, torch.unbind, torch.detach, torch.movedim, torch.swapaxes,
                   torch.diagonal, torch.as_strided, F.dropout}
_VIEW_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                 nn.Dropout3d, nn.AlphaDropout)


class InPlaceError(RuntimeError):
    """An in-place op that cannot be made out-of-place without changing the model's meaning."""


def _where(node: fx.Node) -> str:
    from .ops.registry import source_line  # late import: ops imports graph helpers
    return f"graph node '{node.name}' ({source_line(node)})"


def _is_view(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _VIEW_MODULES)
    return False


def _out_of_place_function(fn: Callable) -> Optional[Callable]:
    name = getattr(fn, "__name__", "")
    if not name.endswith("_") or name.startswith("_"):
        return None
    for space in (torch, F, torch.special):
        if getattr(space, name, None) is fn:
            other = getattr(space, name[:-1], None)
            return other if callable(other) else None
    return None


def _inplace_flag(node: fx.Node) -> Optional[bool]:
    """The ``inplace`` argument of a call_function node, if its function has one."""
    if "inplace" in node.kwargs:
        return bool(node.kwargs["inplace"])
    try:
        params = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):
        return None
    if "inplace" not in params:
        return None
    i = params.index("inplace")
    return bool(node.args[i]) if len(node.args) > i else False


def _rewrite(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Turn ``node`` into its out-of-place form; True if it was in-place (mutating args[0])."""
    t = node.target
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(t), "inplace", False))
    if node.op == "call_method":
        if not (isinstance(t, str) and t.endswith("_") and not t.startswith("_")):
            return False
        base = t[:-1]
        if not callable(getattr(Tensor, base, None)):
            raise InPlaceError(f"the in-place tensor method .{t}() at {_where(node)} has no out-of-place "
                               "form the bound engine can use; write the model without it")
        node.target = base
        return True
    if node.op != "call_function":
        return False
    if t is operator.setitem:
        raise InPlaceError(f"item assignment (x[...] = v) at {_where(node)} mutates a tensor in place, "
                           "which the bound engine cannot follow; build the tensor out of place "
                           "(torch.cat, torch.where, F.pad, ...)")
    if t in _INPLACE_OPERATORS:
        node.target = _INPLACE_OPERATORS[t]
        return True
    other = _out_of_place_function(t)
    if other is not None:
        node.target = other
        return True
    if _inplace_flag(node):
        params = list(inspect.signature(t).parameters)
        i = params.index("inplace")
        if len(node.args) > i:
            node.args = tuple(node.args[:i]) + (False,) + tuple(node.args[i + 1:])
        else:
            node.kwargs = {**node.kwargs, "inplace": False}
        return True
    return False


def _aliases(x: fx.Node, gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that may share memory with ``x`` (through view-like ops, both directions)."""
    seen, todo = {x}, [x]
    while todo:
        n = todo.pop()
        nbrs = []
        if _is_view(n, gm) and n.args and isinstance(n.args[0], fx.Node):
            nbrs.append(n.args[0])
        nbrs += [u for u in n.users if _is_view(u, gm) and u.args and u.args[0] is n]
        for m in nbrs:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def functionalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the in-place ops of ``gm`` (in place on the graph, which the engine owns)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_method", "call_function"):
            continue
        x = node.args[0] if node.args else None
        if not _rewrite(node, gm) or not isinstance(x, fx.Node):
            continue
        if x.op == "get_attr":
            raise InPlaceError(f"in-place update of the parameter/buffer '{x.target}' at {_where(node)}: "
                               "a model's forward must not change its own state for bounds to hold")
        here = order[node]
        for other in _aliases(x, gm) - {x}:
            if any(order[u] > here for u in other.users):
                raise InPlaceError(
                    f"in-place op at {_where(node)} changes a tensor that shares memory with "
                    f"'{other.name}' (a view), which is read later; use the out-of-place op "
                    "(e.g. torch.relu(x) instead of x.relu_(), nn.ReLU() without inplace=True)")
        # Every later reader of x reads the updated value: point it at this node.
        for u in list(x.users):
            if u is not node and order[u] > here:
                u.replace_input_with(x, node)
    gm.recompile()
    return gm


def call_module_safely(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Call a leaf module; one with ``inplace=True`` gets a copy of its input, so no value the
    engine (or the caller) holds is overwritten."""
    if getattr(module, "inplace", False) and args and isinstance(args[0], Tensor):
        args = (args[0].clone(), *args[1:])
    return module(*args, **kwargs)
