"""Rewrites of the traced graph into ops that have bound rules, done once per `BoundedModule`
with the example input's shapes known (so tuple-valued ops can be unpacked).

* ``split`` / ``chunk`` / ``unbind`` read by ``getitem``: each piece becomes ``narrow`` /
  ``select`` of the input (the sizes are fixed by the traced per-example shape);
* ``torch.maximum(a, b)`` / ``torch.max(a, b)``: ``a + relu(b - a)``; ``minimum`` / ``min(a, b)``:
  ``a - relu(a - b)`` (exact identities; the ReLU carries the relaxation).

* ``softmax(x, dim)`` over n <= 4 entries: ``reciprocal(1 + Σ_{j≠i} exp(x_j - x_i))`` (exact IBP,
  a denominator >= 1); over more: ``e = exp(x - c)``, ``e * reciprocal(sum(e, dim))`` with c the
  clean maximum (`graph.invariant_shift`), closed by ``softmax_guard`` (the exact per-element
  interval, ops/softmax.py);
* ``layer_norm(x, shape, w, b, eps)``: ``d = x - mean(x)``, ``d * rsqrt(mean(d * d) + eps) * w + b``
  (``d * d`` is one node used twice: the square rule);
* ``einsum(eq, a, b)`` of two operands (the forms attention uses: ``bhqd,bhkd->bhqk``,
  ``bij,jk->bik`` ...): permutes and reshapes around one ``matmul`` (the output's first index is
  the batch; each index appears once per operand);
* ``a / b`` with ``b`` computed from a model input: ``a * reciprocal(b)`` (the reciprocal rule
  bounds 1/b on a positive or negative domain; the product rule bounds a * (1/b)).

Each rewrite keeps the model's function exactly (up to rounding of the clean values).
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

import torch.nn.functional as F

from .graph import TraceError, fetch_attr, invariant_shift, per_example
from .ops.softmax import positive_reciprocal, softmax_guard

_SPLITS = {torch.split: "split", torch.chunk: "chunk", torch.unbind: "unbind", torch.tensor_split: "tensor_split",
           "split": "split", "chunk": "chunk", "unbind": "unbind", "tensor_split": "tensor_split"}


def _dim_of(node: fx.Node, default: int = 0) -> int:
    kind = _SPLITS[node.target]
    args = node.args
    if kind == "unbind":
        return int(args[1]) if len(args) > 1 else int(node.kwargs.get("dim", 0))
    return int(args[2]) if len(args) > 2 else int(node.kwargs.get("dim", default))


def _unpack_splits(gm: fx.GraphModule) -> bool:
    changed = False
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or node.target not in _SPLITS:
            continue
        meta = node.meta.get("tensor_meta")
        if not isinstance(meta, (tuple, list)):
            continue
        src = node.args[0]
        nd = len(src.meta["tensor_meta"].shape) if "tensor_meta" in getattr(src, "meta", {}) else None
        dim = _dim_of(node)
        if nd is not None:
            dim %= nd
        sizes = [int(m.shape[dim]) if _SPLITS[node.target] != "unbind" else 1 for m in meta]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        users = list(node.users)
        if not users or any(u.op != "call_function" or u.target is not operator.getitem or
                            not isinstance(u.args[1], int) for u in users):
            where = node.meta.get("stack_trace", "").strip().splitlines()[-1:] or [node.name]
            raise TraceError(f"{node.target if isinstance(node.target, str) else node.target.__name__} at graph "
                             f"node '{node.name}' ({where[0].strip()}) is used other than by indexing its pieces "
                             "(t[0], t[1], ...), which the bound engine needs to follow it")
        for u in users:
            i = u.args[1] % len(sizes)
            with gm.graph.inserting_before(u):
                if _SPLITS[node.target] == "unbind":
                    new = gm.graph.call_function(torch.select, (src, dim, i))
                else:
                    new = gm.graph.call_function(torch.narrow, (src, dim, starts[i], sizes[i]))
            new.meta = dict(u.meta)
            u.replace_all_uses_with(new)
            gm.graph.erase_node(u)
        gm.graph.erase_node(node)
        changed = True
    return changed


def _is_tensor_node(a: Any) -> bool:
    return isinstance(a, fx.Node) and hasattr(a.meta.get("tensor_meta"), "shape")


def _rewrite_min_max(gm: fx.GraphModule) -> bool:
    changed = False
    for node in list(gm.graph.nodes):
        t = node.target
        two = len(node.args) == 2 and all(_is_tensor_node(a) for a in node.args)
        if node.op == "call_function" and t in (torch.maximum, torch.minimum, torch.max, torch.min) and two:
            a, b = node.args
        elif node.op == "call_method" and t in ("maximum", "minimum", "max", "min") and two:
            a, b = node.args
        else:
            continue
        is_max = (t in (torch.maximum, torch.max)) or t in ("maximum", "max")
        with gm.graph.inserting_before(node):
            if is_max:  # max(a, b) = a + relu(b - a)
                d = gm.graph.call_function(operator.sub, (b, a))
                r = gm.graph.call_function(torch.relu, (d,))
                new = gm.graph.call_function(operator.add, (a, r))
            else:  # min(a, b) = a - relu(a - b)
                d = gm.graph.call_function(operator.sub, (a, b))
                r = gm.graph.call_function(torch.relu, (d,))
                new = gm.graph.call_function(operator.sub, (a, r))
        for n in (d, r, new):
            n.meta = {"stack_trace": node.meta.get("stack_trace", "")}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    return changed


def _replace(gm: fx.GraphModule, node: fx.Node, fn, *args, **kwargs) -> None:
    """Replace ``node`` by the nodes that ``fn`` records when called on proxies of its arguments."""
    tracer = fx.proxy.GraphAppendingTracer(gm.graph)

    def wrap(a):
        return fx.Proxy(a, tracer) if isinstance(a, fx.Node) else a
    with gm.graph.inserting_before(node):
        out = fn(*[wrap(a) for a in args], **{k: wrap(v) for k, v in kwargs.items()})
    for n in gm.graph.nodes:
        if not n.meta and n is not out.node:
            n.meta = {"stack_trace": node.meta.get("stack_trace", "")}
    out.node.meta = {k: v for k, v in node.meta.items() if k in ("stack_trace", "tensor_meta")}  # same value
    node.replace_all_uses_with(out.node)
    gm.graph.erase_node(node)


def _call(fn, *args):
    """One graph node calling ``fn`` (not traced into)."""
    return args[0].tracer.create_proxy("call_function", fn, args, {})


#: softmax over at most this many entries uses the pairwise form: n (n - 1) exponentials per row,
#: so CROWN bounds n - 1 times the neurons of the shifted form (attention rows are longer)
PAIRWISE_SOFTMAX_MAX = 4


def _softmax_pairwise(x, dim, n, shape):
    """softmax_i = 1 / (1 + Σ_{j≠i} exp(x_j - x_i)): the denominator is >= 1 for every x (no
    shift, nothing to underflow), and its IBP is the exact per-element interval of softmax."""
    d = x.unsqueeze(dim) - x.unsqueeze(dim + 1)          # [..., i, j, ...] = x_j - x_i
    # the n (n - 1) pairs j ≠ i, picked by a constant index (x's device; no mask product, which
    # would turn an overflowed exp into NaN)
    ones = x.new_ones(n, n)
    pairs = (ones.triu(1) + ones.tril(-1)).flatten().nonzero().flatten()
    d = d.flatten(dim, dim + 1).index_select(dim, pairs).unflatten(dim, (n, n - 1))
    s = torch.exp(d).sum(dim + 1) + 1.0
    return torch.reciprocal(s)


def _softmax_parts(x, dim):
    e = torch.exp(x - _call(invariant_shift, x, dim))
    y = e * _call(positive_reciprocal, e.sum(dim, keepdim=True))
    return _call(softmax_guard, y, x, dim)


def _layer_norm_parts(x, shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(shape), 0))
    d = x - x.mean(dims, keepdim=True)
    y = d * torch.rsqrt((d * d).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _prod(xs) -> int:
    out = 1
    for v in xs:
        out *= int(v)
    return out


def _einsum_parts(eq: str, sizes: dict, a, b):
    lhs, out = eq.replace(" ", "").split("->")
    la, lb = lhs.split(",")
    beta = out[0]
    shared = [c for c in out[1:] if c in la and c in lb]
    contract = [c for c in la if c in lb and c not in out]
    fa = [c for c in la if c not in lb and c != beta]
    fb = [c for c in lb if c not in la and c != beta]

    def prep(x, letters, first, last):
        has_b = letters[0] == beta
        order = ([beta] if has_b else []) + shared + first + last
        x = x.permute(*[letters.index(c) for c in order])
        shape = ([-1] if has_b else []) + [sizes[c] for c in shared] + [_prod(sizes[c] for c in first),
                                                                          _prod(sizes[c] for c in last)]
        return x.reshape(*shape)
    z = torch.matmul(prep(a, la, fa, contract), prep(b, lb, contract, fb))
    z = z.reshape(-1, *[sizes[c] for c in shared + fa + fb])
    now = [beta] + shared + fa + fb
    return z.permute(*[now.index(c) for c in out])


def _rewrite_einsum(gm: fx.GraphModule) -> bool:
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.einsum:
            continue
        eq, *ops = node.args
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        if len(ops) != 2 or not all(_is_tensor_node(o) for o in ops) or not isinstance(eq, str):
            continue
        eq_ = eq.replace(" ", "")
        if "->" not in eq_ or "." in eq_:
            raise TraceError(f"einsum at graph node '{node.name}' ({eq!r}): write the output indices "
                             "explicitly ('...->...') and no ellipsis, for the bound engine")
        (la, lb), out = eq_.split("->")[0].split(","), eq_.split("->")[1]
        letters_ok = all(len(set(t)) == len(t) for t in (la, lb, out)) and set(out) <= set(la + lb) \
            and all(c in out for c in la + lb if (c in la) != (c in lb)) and (la[:1] == out[:1] or lb[:1] == out[:1])
        if not letters_ok:
            raise TraceError(f"einsum at graph node '{node.name}' ({eq!r}) has no bound rule: the output's "
                             "first index must be the batch index (first of an operand), each index once per "
                             "operand, and an index of only one operand must appear in the output")
        sizes = {}
        for letters, o in zip((la, lb), ops):
            for c, n in zip(letters, o.meta["tensor_meta"].shape):
                sizes[c] = int(n)
        _replace(gm, node, lambda a, b: _einsum_parts(eq_, sizes, a, b), *ops)
        changed = True
    return changed


_SOFTMAX = (F.softmax, torch.softmax, "softmax")
_LAYER_NORM = (F.layer_norm, torch.layer_norm)


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _rewrite_softmax_layer_norm(gm: fx.GraphModule) -> bool:
    changed = False
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        if node.target in _SOFTMAX:
            dim = _arg(node, 1, "dim")
            if dim is None:
                raise TraceError(f"softmax at graph node '{node.name}' without dim: pass dim= (the bound engine "
                                 "never reduces over the batch)")
            if _arg(node, 3 if node.op == "call_function" else 2, "dtype") is not None:
                raise TraceError(f"softmax at graph node '{node.name}' with dtype=: cast the input instead")
            x = node.args[0]
            nd = len(x.meta["tensor_meta"].shape) if _is_tensor_node(x) else None
            n = int(x.meta["tensor_meta"].shape[int(dim)]) if nd is not None else None
            if n == 1:  # softmax over one entry is 1
                _replace(gm, node, torch.ones_like, x)
            elif n is not None and n <= PAIRWISE_SOFTMAX_MAX:
                d = int(dim) % nd
                shape = [1] * (nd + 1)
                shape[d], shape[d + 1] = n, n
                _replace(gm, node, lambda t: _softmax_pairwise(t, d, n, shape), x)
            else:
                _replace(gm, node, _softmax_parts, x, int(dim))
            changed = True
        elif node.target in _LAYER_NORM:
            ns = _arg(node, 1, "normalized_shape")
            _replace(gm, node, _layer_norm_parts, node.args[0], (ns,) if isinstance(ns, int) else tuple(ns),
                     _arg(node, 2, "weight"), _arg(node, 3, "bias"), float(_arg(node, 4, "eps", 1e-5)))
            changed = True
    return changed


_DIVS = (operator.truediv, torch.div, torch.true_divide, "div", "true_divide", "__truediv__")


def _from_inputs(gm: fx.GraphModule) -> set:
    """Nodes whose value depends on a placeholder (what a perturbation can reach)."""
    seen: set = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in seen for a in node.all_input_nodes):
            seen.add(node)
    return seen


def _rewrite_division(gm: fx.GraphModule) -> bool:
    changed = False
    reach = _from_inputs(gm)
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or node.target not in _DIVS:
            continue
        if len(node.args) != 2 or node.kwargs.get("rounding_mode") is not None:
            continue
        a, b = node.args
        if not (isinstance(b, fx.Node) and b in reach):
            continue
        with gm.graph.inserting_before(node):
            r = gm.graph.call_function(torch.reciprocal, (b,))
            new = gm.graph.call_function(operator.mul, (a, r))
        for n in (r, new):
            n.meta = {"stack_trace": node.meta.get("stack_trace", "")}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    return changed


def lift_parameters(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Turn every ``per_example(p)`` of a `BoundedParameter` p into a graph input (after the
    model's own), fed one copy of p per example: [(input name, parameter name)], in input order."""
    from .tensor import BoundedParameter
    lifted: list[tuple[str, str]] = []
    inputs: dict[str, fx.Node] = {}  # parameter name -> its graph input
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or not isinstance(fetch_attr(gm, node.target), BoundedParameter):
            continue
        users = list(node.users)
        for u in users:
            if not (u.op == "call_function" and u.target is per_example):
                raise TraceError(f"the BoundedParameter '{node.target}' is used by graph node '{u.name}' "
                                 f"({u.target}); only the parameters of nn.Linear, nn.Conv2d and BatchNorm "
                                 "layers can be perturbed")
        ph = inputs.get(node.target)  # another get_attr of the same parameter: its input serves
        if ph is None:
            with gm.graph.inserting_after(last):
                ph = gm.graph.placeholder("param_" + node.target.replace(".", "_"))
            ph.meta = {}
            last = inputs[node.target] = ph
            lifted.append((ph.name, node.target))
        for u in users:  # one input per parameter, whichever layers read it (one set)
            u.replace_all_uses_with(ph)
            gm.graph.erase_node(u)
        gm.graph.erase_node(node)
    if lifted:
        gm.graph.lint()
        gm.recompile()
    return lifted


def decompose(gm: fx.GraphModule, example: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Apply every rewrite above to ``gm`` (in place; the engine owns the graph)."""
    modes = [(m, m.training) for m in gm.modules()]
    gm.eval()
    try:
        with torch.no_grad():
            try:
                ShapeProp(gm).propagate(*[x.clone() for x in example])  # never the caller's tensors
            except RuntimeError as e:  # the model's own error on the example input, unwrapped
                raise (e.__cause__ or e) from None
    finally:
        for m, mode in modes:
            m.training = mode
    changed = _unpack_splits(gm)
    changed = _rewrite_min_max(gm) or changed
    changed = _rewrite_einsum(gm) or changed
    changed = _rewrite_softmax_layer_norm(gm) or changed
    changed = _rewrite_division(gm) or changed
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm
