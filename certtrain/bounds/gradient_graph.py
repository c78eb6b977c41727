"""The gradient graph of a traced network, derived automatically (Shi et al. 2022, Sec. 3.1).

`build_gradient_graph` copies the network's traced graph and appends, in reverse topological order, the
vector-Jacobian product of every node that depends on the input: one rule per op (`VJP_RULES`,
keyed like the bound rules: module class, function, or ``"method:name"``), as autograd's derivative
formulas are.  Gradients carry one row dimension after the batch, one row per output of interest
(the rows of a spec matrix C), so the graph's output J has shape (N, rows, *input_shape) with
J[n, i] = d (C y)_i / d x at x = x[n].  The result is an ordinary fx graph: the bound engine bounds
it like any network, and the derivative ops have bound rules of their own (ops/derivative.py,
ops/conv_grad.py).  The forward nodes keep their names, so bounds computed on the forward network
can be handed to it (`BoundedModule.compute_bounds(intermediate_bounds=...)`).

Adding an op: write ``rule(b, node, g) -> [(input node, its gradient), ...]`` with `vjp_rule`.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .decompose import decompose
from .graph import is_shape_query, trace, BoundNode
from .ops.conv_grad import conv2d_input_grad
from .ops.derivative import relu_grad, sigmoid_derivative, tanh_derivative
from .ops.registry import UnsupportedOperation, describe_target, source_line, target_key

#: what the graph's output is: the Jacobian, J v, or the ℓ1 norm of each row of J
KINDS = ("jacobian", "jvp", "lipschitz")

VJP_RULES: dict[Any, Callable] = {}


def vjp_rule(*targets):
    """Register a vector-Jacobian-product rule for the given module classes / functions / methods."""
    def deco(fn):
        for t in targets:
            VJP_RULES[t] = fn
        return fn
    return deco


class Builder:
    """Emits gradient nodes into the new graph; rules use it to read the forward graph's facts."""

    def __init__(self, gm: fx.GraphModule, graph: fx.Graph, rows: int, shapes: dict):
        self.gm, self.graph, self.rows, self.shapes = gm, graph, rows, shapes
        self.dep: set = set()

    def call(self, fn, *args, **kwargs) -> fx.Node:
        return self.graph.call_function(fn, tuple(args), kwargs)

    def method(self, name: str, *args, **kwargs) -> fx.Node:
        return self.graph.call_method(name, tuple(args), kwargs)

    def attr(self, target: str) -> fx.Node:
        return self.graph.get_attr(target)

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def shape(self, node) -> tuple:
        """Per-example shape of a node (without the batch dimension)."""
        return self.shapes[node]

    def total(self, parts: list) -> fx.Node:
        """The sum of a node's gradient contributions (one per consumer)."""
        g = parts[0]
        for p in parts[1:]:
            g = self.call(operator.add, g, p)
        return g

    def depends(self, a) -> bool:
        return isinstance(a, fx.Node) and a in self.dep

    def arg(self, node: fx.Node, i: int, name: str, default=None):
        if i < len(node.args):
            return node.args[i]
        return node.kwargs.get(name, default)

    def scale(self, g: fx.Node, c, out: fx.Node, op=operator.mul) -> fx.Node:
        """g times a constant factor c of the forward op's output shape (a number, or a tensor
        that broadcasts against it): c gets a row dimension if it has a batch dimension."""
        if isinstance(c, fx.Node):
            full = len(self.shapes[out]) + 1
            cdim = len(self.shapes[c]) + (1 if c.op != "get_attr" else 0)
            if c.op != "get_attr" and cdim == full:
                c = self.call(torch.unsqueeze, c, 1)
        elif isinstance(c, Tensor):
            raise UnsupportedOperation("a tensor constant inside forward() is not supported by the gradient "
                                       "graph; register it as a buffer")
        return self.call(op, g, c)


def _unsupported(b: Builder, node: fx.Node, why: str):
    raise UnsupportedOperation(f"gradient graph: {why} at node '{node.name}' ({source_line(node)})")


# ----------------------------------------------------------------------------- rules
@vjp_rule(nn.Linear)
def _linear_module(b: Builder, n, g):
    return [(n.args[0], b.call(torch.matmul, g, b.attr(f"{n.target}.weight")))]


@vjp_rule(F.linear)
def _linear_fn(b: Builder, n, g):
    w = b.arg(n, 1, "weight")
    if b.depends(w):
        _unsupported(b, n, "a weight that depends on the input")
    return [(n.args[0], b.call(torch.matmul, g, w))]


def _pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv(b: Builder, n, g, x, w, stride, padding, dilation, groups):
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:
            _unsupported(b, n, f"Conv2d padding={padding!r} (give explicit padding)")
    in_hw = tuple(b.shape(x)[-2:])
    return [(x, b.call(conv2d_input_grad, g, w, _pair(stride), _pair(padding), _pair(dilation), groups, in_hw))]


@vjp_rule(nn.Conv2d)
def _conv_module(b: Builder, n, g):
    m = b.module(n)
    if m.padding_mode != "zeros":
        _unsupported(b, n, f"Conv2d padding_mode={m.padding_mode!r}")
    return _conv(b, n, g, n.args[0], b.attr(f"{n.target}.weight"), m.stride, m.padding, m.dilation, m.groups)


@vjp_rule(F.conv2d)
def _conv_fn(b: Builder, n, g):
    w = b.arg(n, 1, "weight")
    if b.depends(w):
        _unsupported(b, n, "a kernel that depends on the input")
    return _conv(b, n, g, n.args[0], w, b.arg(n, 3, "stride", 1), b.arg(n, 4, "padding", 0),
                 b.arg(n, 5, "dilation", 1), b.arg(n, 6, "groups", 1))


@vjp_rule(nn.Flatten, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten,
          "method:view", "method:reshape", "method:flatten", "method:squeeze", "method:unsqueeze",
          "method:unflatten")
def _reshape(b: Builder, n, g):
    x = n.args[0]
    return [(x, b.call(torch.reshape, g, (-1, b.rows, *b.shape(x))))]


@vjp_rule(nn.Identity, nn.Dropout, torch.clone, "method:clone", "method:contiguous", F.dropout)
def _identity(b: Builder, n, g):
    return [(n.args[0], g)]


@vjp_rule(nn.ReLU, F.relu, torch.relu, "method:relu")
def _relu(b: Builder, n, g):
    return [(n.args[0], b.call(relu_grad, n.args[0], g))]


@vjp_rule(nn.LeakyReLU, F.leaky_relu)
def _leaky_relu(b: Builder, n, g):
    slope = b.module(n).negative_slope if n.op == "call_module" else b.arg(n, 1, "negative_slope", 0.01)
    return [(n.args[0], b.call(relu_grad, n.args[0], g, slope))]


def _through_derivative(b: Builder, n, g, derivative):
    # d = f'(z) from the op's own output; g_in = d * g (a product of two bounded tensors)
    d = b.call(torch.unsqueeze, b.call(derivative, n.args[0], n), 1)
    return [(n.args[0], b.call(operator.mul, d, g))]


@vjp_rule(nn.Sigmoid, torch.sigmoid, "method:sigmoid")
def _sigmoid(b: Builder, n, g):
    return _through_derivative(b, n, g, sigmoid_derivative)


@vjp_rule(nn.Tanh, torch.tanh, "method:tanh")
def _tanh(b: Builder, n, g):
    return _through_derivative(b, n, g, tanh_derivative)


def _same_shape(b: Builder, n, x, g):
    if b.shape(x) != b.shape(n):
        _unsupported(b, n, f"an input-dependent operand broadcast from {b.shape(x)} to {b.shape(n)}")
    return g


@vjp_rule(operator.add, torch.add, "method:add")
def _add(b: Builder, n, g):
    return [(x, _same_shape(b, n, x, g)) for x in n.args[:2] if b.depends(x)]


@vjp_rule(operator.sub, torch.sub, "method:sub")
def _sub(b: Builder, n, g):
    out = []
    if b.depends(n.args[0]):
        out.append((n.args[0], _same_shape(b, n, n.args[0], g)))
    if b.depends(n.args[1]):
        out.append((n.args[1], b.call(operator.neg, _same_shape(b, n, n.args[1], g))))
    return out


@vjp_rule(operator.neg, torch.neg, "method:neg")
def _neg(b: Builder, n, g):
    return [(n.args[0], b.call(operator.neg, g))]


@vjp_rule(operator.mul, torch.mul, "method:mul")
def _mul(b: Builder, n, g):
    x, y = n.args[:2]
    out = []
    for this, other in ((x, y), (y, x)):
        if b.depends(this):  # product rule: d(xy) = y dx + x dy
            out.append((this, _same_shape(b, n, this, b.scale(g, other, n))))
    return out


@vjp_rule(operator.truediv, torch.div, "method:div")
def _div(b: Builder, n, g):
    x, y = n.args[:2]
    if b.depends(y):
        _unsupported(b, n, "division by an input-dependent tensor")
    return [(x, _same_shape(b, n, x, b.scale(g, y, n, operator.truediv)))]


@vjp_rule(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm(b: Builder, n, g):
    m = b.module(n)
    if not m.track_running_stats:
        _unsupported(b, n, "BatchNorm without running statistics")
    # eval mode: y = (x - mean) * gamma / sqrt(var + eps) + beta, a per-channel scale
    s = b.call(torch.rsqrt, b.call(torch.add, b.attr(f"{n.target}.running_var"), m.eps))
    if m.affine:
        s = b.call(operator.mul, s, b.attr(f"{n.target}.weight"))
    s = b.call(torch.reshape, s, (-1, *([1] * (len(b.shape(n)) - 1))))
    return [(n.args[0], b.call(operator.mul, g, s))]


# ----------------------------------------------------------------------------- the graph
def check_eval(model: nn.Module) -> None:
    """ValueError unless BatchNorm and Dropout are in eval mode (the deployed network's gradient)."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)) and m.training:
            raise ValueError(f"gradient graph: module '{name}' ({type(m).__name__}) is in training mode; "
                             "bound the Jacobian of the model in eval mode (call model.eval() first)")


def build_gradient_graph(model: nn.Module, example: Tensor, C: Tensor, kind: str = "jacobian") -> fx.GraphModule:
    """An fx.GraphModule computing, for input x (and v for ``kind='jvp'``):

    * ``jacobian``: J (N, rows, *x.shape[1:]), J[n, i] = d (C y)_i / dx;
    * ``jvp``: J v, (N, rows);
    * ``lipschitz``: the ℓ1 norm of each row of J, (N, rows) (the L∞ local Lipschitz constant of
      (C y)_i at that point, Shi et al. 2022, eq. 2).

    ``C``: (rows, n_out) spec rows over the flattened output.  Model parameters are shared (live)."""
    if kind not in KINDS:
        raise ValueError(f"unknown gradient graph kind {kind!r}; use one of {', '.join(KINDS)}")
    check_eval(model)
    gm = decompose(trace(model), [example])
    if sum(1 for n in gm.graph.nodes if n.op == "placeholder") != 1:
        raise ValueError("gradient graph: the model must take one input tensor")
    shapes_old = {n: tuple(n.meta["tensor_meta"].shape[1:]) if n.op != "get_attr" else
                  tuple(n.meta["tensor_meta"].shape)
                  for n in gm.graph.nodes if n.op != "output" and hasattr(n.meta.get("tensor_meta"), "shape")}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out_node = None
    for n in gm.graph.nodes:
        if n.op == "output":
            out_node = env[n.args[0]] if isinstance(n.args[0], fx.Node) else None
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    if out_node is None:
        raise ValueError("gradient graph: the model must return one tensor")
    shapes = {env[k]: v for k, v in shapes_old.items()}
    rows = C.shape[0]
    out_shape = shapes[out_node]
    if C.dim() != 2 or C.shape[1] != math.prod(out_shape):
        raise ValueError(f"spec C must be (rows, {math.prod(out_shape)}) over the flattened output, "
                         f"got {tuple(C.shape)}")
    b = Builder(gm, graph, rows, shapes)
    order = [env[n] for n in gm.graph.nodes if n.op != "output"]
    x = next(n for n in order if n.op == "placeholder")
    # nodes that depend on the input's values (shape queries do not)
    b.dep.add(x)
    for n in order:
        if n is x or n.op in ("get_attr", "placeholder"):
            continue
        bn = BoundNode(n.name, n.op, n, gm.get_submodule(n.target) if n.op == "call_module" else None)
        if any(i in b.dep for i in n.all_input_nodes) and not is_shape_query(bn):
            b.dep.add(n)
    if out_node not in b.dep:
        raise ValueError("gradient graph: the model's output does not depend on its input")
    gm.register_buffer("jacobian_seed", C.detach().to(example.dtype).reshape(1, rows, *out_shape).clone())
    grads: dict[fx.Node, list[fx.Node]] = {out_node: [b.attr("jacobian_seed")]}
    for n in reversed(order):
        if n is x or n not in grads:
            continue
        g = b.total(grads.pop(n))
        key = target_key(n, gm.get_submodule(n.target) if n.op == "call_module" else None)
        rule = VJP_RULES.get(key)
        if rule is None:
            raise UnsupportedOperation(
                f"gradient graph: no derivative rule for {describe_target(key)} at node '{n.name}' "
                f"({source_line(n)}); supported: Linear, Conv2d, BatchNorm (eval), ReLU, LeakyReLU, "
                "Sigmoid, Tanh, reshapes, +, -, * and / by constants. Add one with "
                "certtrain.bounds.gradient_graph.vjp_rule.")
        for inp, gi in rule(b, n, g):
            if inp in b.dep:
                grads.setdefault(inp, []).append(gi)
    g = b.total(grads[x])
    if kind == "jacobian":
        result = g
    elif kind == "jvp":
        v = graph.placeholder("v")
        x.append(v)  # the second input, right after x
        prod = b.call(operator.mul, g, b.call(torch.unsqueeze, v, 1))
        result = b.call(torch.sum, b.method("flatten", prod, 2), -1)
    else:
        result = b.call(torch.sum, b.method("flatten", b.call(torch.abs, g), 2), -1)
    graph.output(result)
    out = fx.GraphModule(gm, graph)
    out.graph.eliminate_dead_code()  # the forward output itself and anything else no gradient reads
    out.recompile()
    out._certtrain_traced = True  # already traced and functional: the engine uses it as is
    return out
