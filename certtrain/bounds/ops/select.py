"""Ops that pick elements of one tensor: indexing with slices / integers / None / Ellipsis
(``x[:, 2:5]``, ``x[..., 0]``), ``narrow``, ``select``, ``index_select``, ``gather``, ``expand``,
``flip``, ``roll``, ``repeat``.

Every output element is one input element, so IBP applies the op to both bounds, and the op is
linear: backward is its adjoint, computed by autograd on the rows of the coefficients folded into
the batch (the op never mixes examples, so row (b, n) is example b's).  ``split`` / ``chunk`` /
``unbind`` are rewritten into ``narrow`` / ``select`` at trace time (`certtrain.bounds.decompose`).
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

from ..patches import to_dense
from .base import LinearOp, Value, const, is_perturbed
from .registry import UnsupportedOperation, register_op


def _index_parts(idx) -> tuple:
    return idx if isinstance(idx, tuple) else (idx,)


class SelectOp(LinearOp):
    """Base of element-picking ops; subclasses check the batch dimension is left alone."""

    ibp_operands = "unary"  # check(): the input's shape only
    supports_patches = False

    def check(self, x: Value, args, kwargs) -> None:
        raise NotImplementedError

    def folded_args(self, args, kwargs, rows: int):
        """Arguments for the op applied to ``rows`` rows per example folded into the batch."""
        return args, kwargs

    def ibp(self, x, *args, **kwargs):
        self.check(x, args, kwargs)
        l, u = x.bounds
        return self.apply(l, *args, **kwargs), self.apply(u, *args, **kwargs)

    def backward_one(self, A, x, *args, **kwargs):
        self.check(x, args, kwargs)
        A = to_dense(A)
        B, N = A.shape[:2]
        shape = x.value.shape[1:]
        fargs, fkw = self.folded_args(args, kwargs, N)
        # The adjoint of the (linear) op, row by row: d<A_row, op(X_row)>/dX_row.
        with torch.enable_grad():
            X = torch.zeros(B * N, *shape, dtype=A.dtype, device=A.device, requires_grad=True)
            out = self.apply(X, *fargs, **fkw)
            (g,) = torch.autograd.grad(out, X, A.reshape(B * N, *out.shape[1:]), create_graph=A.requires_grad)
        return [(x, g.view(B, N, *shape))], 0


@register_op("GetItem")
class BoundGetItem(SelectOp):
    targets = (operator.getitem,)

    def check(self, x, args, kwargs):
        if not isinstance(x, Value) or not isinstance(x.value, Tensor):
            raise UnsupportedOperation(f"indexing at node '{self.node.name}' of a non-tensor value")
        parts = _index_parts(const(args[0]))
        if any(isinstance(p, Value) or isinstance(p, Tensor) or isinstance(p, (list, bool)) for p in parts):
            raise UnsupportedOperation(f"indexing with tensors / lists / booleans at node '{self.node.name}' "
                                       "has no bound rule; use index_select or gather")
        first = parts[0] if parts else slice(None)
        if first is Ellipsis:
            if sum(p is not None for p in parts[1:]) >= x.value.dim():  # ... stands for no dims
                first = parts[1]
            else:
                return
        if first is None or first != slice(None):
            raise UnsupportedOperation(f"indexing at node '{self.node.name}' changes the batch dimension "
                                       f"({const(args[0])!r}); bounds need the batch first, whole")


@register_op("Narrow")
class BoundNarrow(SelectOp):
    targets = (torch.narrow, "method:narrow", torch.select, "method:select")

    def check(self, x, args, kwargs):
        dim = const(args[0]) if args else kwargs.get("dim")
        if int(dim) % x.value.dim() == 0:
            raise UnsupportedOperation(f"{self.node.target} along the batch dimension at node '{self.node.name}'")


@register_op("IndexSelect")
class BoundIndexSelect(SelectOp):
    targets = (torch.index_select, "method:index_select")

    def check(self, x, args, kwargs):
        dim = const(args[0]) if args else kwargs.get("dim")
        index = args[1] if len(args) > 1 else kwargs.get("index")
        if is_perturbed(index):
            raise UnsupportedOperation(f"index_select with a perturbed index at node '{self.node.name}'")
        if int(dim) % x.value.dim() == 0:
            raise UnsupportedOperation(f"index_select along the batch dimension at node '{self.node.name}'")


@register_op("Gather")
class BoundGather(SelectOp):
    """``torch.gather(x, dim, index)``: the index has a batch dimension, repeated for the rows."""

    targets = (torch.gather, "method:gather")

    def check(self, x, args, kwargs):
        dim = const(args[0]) if args else kwargs.get("dim")
        index = args[1] if len(args) > 1 else kwargs.get("index")
        if is_perturbed(index):
            raise UnsupportedOperation(f"gather with a perturbed index at node '{self.node.name}'")
        if int(dim) % x.value.dim() == 0:
            raise UnsupportedOperation(f"gather along the batch dimension at node '{self.node.name}'")

    def folded_args(self, args, kwargs, rows):
        args = list(args)
        if len(args) > 1:
            args[1] = const(args[1]).repeat_interleave(rows, dim=0)
        else:
            kwargs = {**kwargs, "index": const(kwargs["index"]).repeat_interleave(rows, dim=0)}
        return tuple(args), kwargs


@register_op("Expand")
class BoundExpand(SelectOp):
    """``expand`` / ``expand_as`` / ``repeat`` / ``flip`` / ``roll`` (per example, batch untouched)."""

    targets = ("method:expand", "method:expand_as", "method:repeat", torch.flip, "method:flip", torch.roll,
               "method:roll")

    def check(self, x, args, kwargs):
        t = self.node.target
        name = t if isinstance(t, str) else t.__name__
        if name in ("expand", "repeat"):
            sizes = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            first = const(sizes[0]) if sizes else 1
            if name == "expand" and first not in (-1, x.value.shape[0]) or name == "repeat" and first != 1:
                raise UnsupportedOperation(f"{name} at node '{self.node.name}' changes the batch dimension")
        elif name == "expand_as":
            if const(args[0]).shape[0] != x.value.shape[0]:
                raise UnsupportedOperation(f"expand_as at node '{self.node.name}' changes the batch dimension")
        else:
            dims = args[0] if name == "flip" else (args[1] if len(args) > 1 else kwargs.get("dims"))
            dims = const(dims)
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            if name == "roll" and not dims or any(int(d) % x.value.dim() == 0 for d in dims):
                raise UnsupportedOperation(f"{name} at node '{self.node.name}' moves the batch dimension")

    def apply(self, first, *args, **kwargs):
        # expand / expand_as keep the batch of ``first`` (the engine also runs them on rows folded
        # into the batch)
        t = self.node.target
        if t == "expand_as":
            return first.expand(first.shape[0], *const(args[0]).shape[1:])
        if t == "expand":
            sizes = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(args)
            sizes = [const(v) for v in sizes]
            return first.expand(first.shape[0], *sizes[1:])
        return super().apply(first, *args, **kwargs)
