"""ONNX networks as PyTorch modules the bound engine accepts.

    from certtrain.onnx_model import load_onnx, onnx_input_shape
    model = load_onnx("mnist-net_256x2.onnx")          # an fx.GraphModule, eval mode
    model.input_shape                                   # (1, 784, 1): the ONNX input, batch dim 1
    net = BoundedModule(model, torch.zeros(model.input_shape))

The conversion itself is the maintained converter ``onnx2torch``; its graph is then *normalised*:
the modules onnx2torch emits for ONNX ops without a plain ``torch.nn`` counterpart (``OnnxReshape``,
``OnnxGemm``, ``OnnxMatMul``, ``OnnxBinaryMathOperation``, ``OnnxConstant``, ``OnnxTranspose``, ...)
are rewritten into plain modules and functions that ``certtrain.bounds`` has bound rules for:

* every value that does not depend on the network input (initializers, ``Constant`` nodes,
  ``Shape`` and whatever is computed from constants and shapes alone) is folded into a buffer of
  the module (shapes are those of the declared input, batch 1);
* ``Gemm`` (any ``alpha``/``beta``/``transB``, bias of shape ``(n,)``, ``(1, n)`` or scalar) and
  ``MatMul`` by a constant matrix become ``nn.Linear``; ``MatMul`` of two tensors ``torch.matmul``;
* ``Add``/``Sub``/``Mul``/``Div`` become ``torch.add``/``sub``/``mul``/``div`` (a constant operand is a
  buffer; this covers the ``(x - mean) / std`` normalisation some networks carry), ``Neg``
  ``torch.neg``, ``Clip`` ``torch.clamp``, ``Concat`` ``torch.cat``, ``Transpose`` ``permute``;
* ``Reshape`` (constant shape, ``0`` and ``-1`` entries), ``Flatten``, ``Squeeze``,
  ``Unsqueeze`` become ``reshape(-1, *rest)``: the leading dim is the batch dim, so the module accepts
  any batch size although the ONNX graph declares a batch of 1 (or a symbolic one);
* ``Identity``/``Dropout`` vanish; ``Conv``, ``Relu``, ``BatchNormalization`` (constant statistics),
  ``Sigmoid``, ``Tanh``, ``LeakyRelu``, pooling ... stay the ``torch.nn`` modules onnx2torch emits.

Anything else raises `UnsupportedOnnxOperation` (a `certtrain.bounds.UnsupportedOperation`) naming
the ONNX op type and node, at load time rather than inside the bound engine.  Dim 0 of every
tensor that depends on the input is the batch dim: an op that moves or merges it (a ``Reshape``
from ``(1, 784)`` to ``(784,)``, a ``Concat`` on axis 0, ...) is refused.  The loaded module is
checked on load against onnx2torch's own module, on one example and on a batch of two; tests check
it against ``onnx.reference.ReferenceEvaluator``.

onnx2torch 1.5 has converters up to about opset 13-16; for ops whose newer versions only accept
more element types (``Shape`` 19+, ``Reshape`` 19+, ``Flatten``/``Squeeze``/``Unsqueeze``/``Transpose``
21+, ``Constant`` 19+, ``Identity`` 19+, ``Conv``/``MaxPool`` 22) the loader reuses the latest
converter, so graphs of opset 20 as ``torch.onnx.export`` writes them load too.
"""
from __future__ import annotations

import operator
import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import fx, nn

from certtrain.bounds.ops.registry import UnsupportedOperation, lookup

__all__ = ["load_onnx", "onnx_input_shape", "UnsupportedOnnxOperation", "OnnxModelError"]

PathLike = Union[str, Path]


class UnsupportedOnnxOperation(UnsupportedOperation):
    """An ONNX op (or a use of it) that the loader cannot turn into bounded torch ops."""


class OnnxModelError(ValueError):
    """The ONNX file is not a network the loader can handle (inputs, outputs, shapes)."""


# ---------------------------------------------------------------------------------------- input
def _load_proto(path_or_model):
    import onnx

    if isinstance(path_or_model, (str, Path)):
        return onnx.load(str(path_or_model))
    return path_or_model


def _graph_inputs(model) -> list:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def onnx_input_shape(path) -> tuple[int, ...]:
    """The shape of the ONNX network's single input, batch dim included, with a symbolic or unset
    leading (batch) dim given as 1: ``(1, 784, 1)`` for mnistfc, ``(1, 3, 32, 32)`` for oval21.

    Raises `OnnxModelError` for several inputs, a missing shape, or a symbolic non-leading dim."""
    model = _load_proto(path)
    return _input_shape(model, str(path) if isinstance(path, (str, Path)) else "<model>")


def _input_shape(model, where: str) -> tuple[int, ...]:
    ins = _graph_inputs(model)
    if len(ins) != 1:
        raise OnnxModelError(f"{where}: expected one graph input, found {len(ins)} "
                             f"({[i.name for i in ins]})")
    t = ins[0].type.tensor_type
    if not t.HasField("shape"):
        raise OnnxModelError(f"{where}: graph input '{ins[0].name}' has no declared shape")
    shape = []
    for k, d in enumerate(t.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(int(d.dim_value))
        elif k == 0:
            shape.append(1)  # symbolic / unknown batch
        else:
            raise OnnxModelError(f"{where}: graph input '{ins[0].name}' has a symbolic or unknown "
                                 f"dim {k} ({d.dim_param or '?'}); only the batch dim may be symbolic")
    if not shape or shape[0] != 1:
        raise OnnxModelError(
            f"{where}: graph input '{ins[0].name}' has shape {tuple(shape)}: the loader needs a "
            "leading batch dim of 1 (or a symbolic one)")
    return tuple(shape)


# ---------------------------------------------------------------------------------------- load
def load_onnx(path, dtype: Optional[torch.dtype] = None, check: bool = True) -> fx.GraphModule:
    """Load an ONNX network (a path, or an ``onnx.ModelProto``) as a plain PyTorch module that
    ``BoundedModule`` accepts.

    Returns an ``fx.GraphModule`` in eval mode taking one tensor of shape ``(batch, *input_shape[1:])``
    (any batch) and returning the network's single output.  Attributes: ``input_shape`` (the ONNX
    input shape with batch dim 1, as `onnx_input_shape`), ``output_shape`` (likewise),
    ``onnx_path``, ``onnx_ops`` (a Counter of the ONNX op types of the graph).  ``dtype``
    (e.g. ``torch.float64``) converts parameters and constants.  ``check`` compares the result with
    onnx2torch's own module on a random input and on a batch of two.

    Raises `UnsupportedOnnxOperation` naming the ONNX op and node for an op without a rewrite or
    a bound rule, and `OnnxModelError` for graphs with several inputs/outputs or bad shapes.
    """
    import onnx2torch
    from onnx2torch.node_converters import get_converter
    from onnx2torch.onnx_graph import OnnxGraph

    where = str(path) if isinstance(path, (str, Path)) else f"<onnx model {path.graph.name or ''}>"
    proto = _load_proto(path)
    in_shape = _input_shape(proto, where)
    n_out = len(proto.graph.output)
    if n_out != 1:
        raise OnnxModelError(f"{where}: expected one graph output, found {n_out}")
    opset = {o.domain: o.version for o in proto.opset_import}
    onnx_nodes = OnnxGraph(proto.graph).nodes  # unique name (onnx2torch's module name) -> node
    info = {name: (n.operation_type, n.proto.name or "(unnamed)") for name, n in onnx_nodes.items()}
    for name, n in onnx_nodes.items():
        version = opset.get(n.domain, opset.get("", 1))
        try:
            try:
                get_converter(operation_type=n.operation_type, version=version, domain=n.domain)
            except NotImplementedError:
                if not _alias_newer_version(n.operation_type, version, n.domain):
                    raise
        except NotImplementedError:
            raise UnsupportedOnnxOperation(
                f"{where}: ONNX op {n.operation_type} (opset {opset.get(n.domain)}) at node "
                f"'{info[name][1]}' is not supported by onnx2torch") from None
    try:
        raw = onnx2torch.convert(proto)
    except NotImplementedError as e:
        raise UnsupportedOnnxOperation(f"{where}: onnx2torch cannot convert this graph: {e}") from e
    except Exception as e:  # noqa: BLE001 - the converter raises many types on odd graphs
        raise OnnxModelError(f"{where}: onnx2torch failed ({type(e).__name__}: {e})") from e
    raw.eval()
    wdtype = _float_dtype(raw)
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(in_shape, generator=gen, dtype=wdtype)
    model = _Normalizer(raw, info, where).run(example)
    model.eval()
    if dtype is not None:
        model.to(dtype)
    if check:
        _check(model, raw, in_shape, where)
    with torch.no_grad():
        out = model(torch.zeros(in_shape, dtype=dtype or wdtype))
    model.input_shape = in_shape
    model.output_shape = tuple(out.shape)
    model.onnx_path = where
    model.onnx_ops = Counter(op for op, _ in info.values())
    return model


def _float_dtype(m: nn.Module) -> torch.dtype:
    for t in (*m.parameters(), *m.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


#: ONNX ops whose versions after the given one changed only the element types they accept (same
#: inputs, attributes and semantics); onnx2torch 1.5 registers converters up to that version only
_TYPE_ONLY_AFTER = {"Shape": 15, "Reshape": 14, "Flatten": 13, "Squeeze": 13, "Unsqueeze": 13,
                    "Transpose": 13, "Constant": 13, "Identity": 16, "Conv": 11, "MaxPool": 12}


def _alias_newer_version(op_type: str, version: int, domain: str) -> bool:
    """Register onnx2torch's converter of ``_TYPE_ONLY_AFTER[op_type]`` for the newer version
    ``version`` resolves to (e.g. Shape-19 for a graph of opset 20, as torch.onnx.export writes)."""
    from onnx import defs
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription

    base = _TYPE_ONLY_AFTER.get(op_type)
    if domain not in ("", "ai.onnx") or base is None:
        return False
    try:
        since = defs.get_schema(op_type, max_inclusive_version=version, domain=domain).since_version
    except Exception:  # noqa: BLE001 - an unknown op or version: no alias
        return False
    conv = _CONVERTER_REGISTRY.get(OperationDescription(domain, op_type, base))
    if conv is None or since <= base:
        return False
    _CONVERTER_REGISTRY.setdefault(OperationDescription(domain, op_type, since), conv)
    return True


def _check(model: nn.Module, raw: nn.Module, in_shape: tuple, where: str) -> None:
    gen = torch.Generator().manual_seed(1)
    dt, rdt = _float_dtype(model), _float_dtype(raw)
    xs = torch.rand((2, *in_shape[1:]), generator=gen, dtype=torch.float64) * 2 - 0.5
    with torch.no_grad():
        ref = torch.cat([raw(x[None].to(rdt)) for x in xs]).to(torch.float64)
        one = model(xs[:1].to(dt)).to(torch.float64)
        two = model(xs.to(dt)).to(torch.float64)
    scale = 1.0 + ref.abs().max().item()
    tol = 1e-4 * scale if torch.float32 in (dt, rdt) else 1e-9 * scale
    if not (torch.allclose(one, ref[:1], atol=tol, rtol=0) and torch.allclose(two, ref, atol=tol, rtol=0)):
        raise RuntimeError(f"{where}: the normalised module differs from onnx2torch's "
                           f"(max difference {(two - ref).abs().max().item():.3g}); please report")


# -------------------------------------------------------------------------------- normalization
_SANITIZE = re.compile(r"[^0-9A-Za-z_]")


class _Const:
    """A value of the graph that does not depend on the input (folded)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class _Var:
    """A value that depends on the input: its node in the new graph and its example value."""

    __slots__ = ("node", "value")

    def __init__(self, node: fx.Node, value):
        self.node = node
        self.value = value


_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul}


class _Normalizer:
    def __init__(self, raw: fx.GraphModule, info: dict, where: str):
        self.raw = raw
        self.info = info
        self.where = where
        self.root = nn.Module()
        self.consts = nn.Module()
        self.root.add_module("constants", self.consts)
        self.graph = fx.Graph()
        self.n_const = 0
        self.names: set[str] = set()

    # ---- helpers
    def _what(self, n: fx.Node) -> str:
        op, name = self.info.get(str(n.target), (None, None))
        if op is None:
            return f"graph node '{n.name}'"
        return f"ONNX op {op} at node '{name}'"

    def _unsupported(self, n: fx.Node, why: str):
        return UnsupportedOnnxOperation(f"{self.where}: {self._what(n)}: {why}")

    def const_node(self, t: torch.Tensor) -> fx.Node:
        name = f"c{self.n_const}"
        self.n_const += 1
        self.consts.register_buffer(name, t.detach().clone())
        return self.graph.get_attr(f"constants.{name}")

    def operand(self, e: Any):
        """A new-graph argument for an entry: the node of a variable, a buffer for a tensor
        constant, the Python value otherwise."""
        if isinstance(e, _Var):
            return e.node
        if isinstance(e, _Const) and isinstance(e.value, torch.Tensor):
            return self.const_node(e.value)
        return e.value if isinstance(e, _Const) else e

    def add_module(self, hint: str, m: nn.Module) -> str:
        base = _SANITIZE.sub("_", hint) or "m"
        if base[0].isdigit():
            base = "m_" + base
        name, k = base, 0
        while name in self.names or name == "constants":
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        self.root.add_module(name, m)
        return name

    # ---- pass
    def run(self, example: torch.Tensor) -> fx.GraphModule:
        env: dict[fx.Node, Any] = {}
        out_node = None
        for n in self.raw.graph.nodes:
            if n.op == "placeholder":
                env[n] = _Var(self.graph.placeholder("x"), example)
            elif n.op == "get_attr":
                obj = self.raw
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                env[n] = _Const(obj)
            elif n.op == "output":
                res = env[n.args[0]] if isinstance(n.args[0], fx.Node) else None
                if not isinstance(res, _Var):
                    raise OnnxModelError(f"{self.where}: the network output does not depend on its input")
                out_node = self.graph.output(res.node)
            else:
                env[n] = self.node(n, env)
        assert out_node is not None
        gm = fx.GraphModule(self.root, self.graph, class_name="OnnxNetwork")
        gm.graph.lint()
        return gm

    def node(self, n: fx.Node, env: dict) -> Any:
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        module = self.raw.get_submodule(n.target) if n.op == "call_module" else None
        def val(e):
            return e.value if isinstance(e, (_Var, _Const)) else e

        vargs = [val(a) for a in args]
        vkw = {k: val(v) for k, v in kwargs.items()}
        with torch.no_grad():
            if n.op == "call_module":
                value = module(*vargs, **vkw)
            elif n.op == "call_function":
                value = n.target(*vargs, **vkw)
            else:
                value = getattr(vargs[0], n.target)(*vargs[1:], **vkw)
        entries = list(args) + list(kwargs.values())
        is_var = any(isinstance(e, _Var) for e in entries)
        kind = type(module).__name__ if module is not None else None
        if not is_var or kind == "OnnxShape":
            return _Const(value)  # fold: a constant, or a shape (of the batch-1 example)
        if n.op != "call_module":
            if n.target is operator.getitem:
                raise self._unsupported(n, "an op with several outputs applied to the input is not supported")
            raise self._unsupported(n, f"unexpected {n.op} {n.target}")
        if kwargs:
            raise self._unsupported(n, f"optional inputs {sorted(kwargs)} are not supported")
        handler = getattr(self, f"_h_{kind}", None)
        if handler is not None:
            return handler(n, module, args, value)
        if isinstance(module, (nn.Identity, nn.Dropout)):
            return args[0]
        return self._keep(n, module, args, value)

    def _keep(self, n, module, args, value):
        """A plain torch.nn module: kept if the bound engine has a rule for it."""
        if type(module).__module__.startswith("onnx2torch"):
            raise self._unsupported(n, f"not supported (onnx2torch module {type(module).__name__} "
                                       "has no rewrite to bounded torch ops)")
        if isinstance(module, nn.Sequential):
            x = args[0]
            for k, child in enumerate(module):
                with torch.no_grad():
                    v = child(x.value)
                x = self._keep(n, child, [x], v)
            return x
        if len(args) != 1 or not isinstance(args[0], _Var):
            raise self._unsupported(n, f"{type(module).__name__} with constant or several inputs")
        name = self.add_module(str(n.target), module)
        new = self.graph.call_module(name, (args[0].node,))
        self._check_rule(n, new, module)
        return _Var(new, value)

    def _check_rule(self, n, new: fx.Node, module=None):
        try:
            lookup(new, module)
        except UnsupportedOperation:
            what = type(module).__name__ if module is not None else getattr(new.target, "__name__", new.target)
            raise self._unsupported(n, f"not supported: the bound engine has no rule for {what}") from None

    def _fn(self, n, fn, args, value, kind="call_function"):
        ops = tuple(self.operand(a) for a in args)
        new = (self.graph.call_function(fn, ops) if kind == "call_function"
               else self.graph.call_method(fn, ops))
        return _Var(new, value)

    def _batch_ok(self, n, x: _Var, value: torch.Tensor):
        if value.dim() == 0 or value.shape[0] != x.value.shape[0]:
            raise self._unsupported(
                n, f"maps shape {tuple(x.value.shape)} to {tuple(value.shape)}: the batch dim (dim 0) "
                   "must stay first; the bound engine needs it")

    # ---- handlers, by onnx2torch module class name
    def _reshape(self, n, module, args, value):
        x = args[0]
        if not isinstance(x, _Var) or any(isinstance(a, _Var) for a in args[1:]):
            raise self._unsupported(n, "a shape that depends on the input is not supported")
        self._batch_ok(n, x, value)
        return self._fn(n, "reshape", [x, -1, *value.shape[1:]], value, kind="call_method")

    _h_OnnxReshape = _reshape
    _h_OnnxFlatten = _reshape
    _h_Flatten = _reshape
    _h_OnnxSqueezeStaticAxes = _reshape
    _h_OnnxSqueezeDynamicAxes = _reshape
    _h_OnnxUnsqueezeStaticAxes = _reshape
    _h_OnnxUnsqueezeDynamicAxes = _reshape

    def _h_OnnxCopyIdentity(self, n, module, args, value):
        return args[0]

    _h_OnnxDropoutDynamic = _h_OnnxCopyIdentity

    def _h_OnnxConstant(self, n, module, args, value):  # never reached: constants fold
        return _Const(value)

    def _h_OnnxBinaryMathOperation(self, n, module, args, value):
        a, b = args
        fn = module.math_op_function
        name = getattr(fn, "__name__", "")
        if module.broadcast == 1 and module.axis is not None:
            if not isinstance(b, _Const):
                raise self._unsupported(n, "old-style broadcast of a non-constant operand")
            from onnx2torch.utils.common import old_style_broadcast
            b = _Const(old_style_broadcast(a.value, b.value, module.axis))
        for e in (a, b):
            if isinstance(e, _Const) and not (isinstance(e.value, torch.Tensor) and e.value.is_floating_point()):
                e.value = torch.as_tensor(e.value, dtype=value.dtype)
        if "div" in name:
            if not value.is_floating_point():
                raise self._unsupported(n, "integer division of the input")
            fn = torch.div
        elif fn not in _BINARY.values():
            raise self._unsupported(n, f"binary op {name}")
        if isinstance(a, _Var) and isinstance(b, _Var) and a.value.shape != b.value.shape and \
                a.value.shape[0] != b.value.shape[0]:
            raise self._unsupported(n, "broadcast over the batch dim")
        self._batch_ok(n, a if isinstance(a, _Var) else b, value)
        return self._fn(n, fn, [a, b], value)

    def _h_OnnxNeg(self, n, module, args, value):
        return self._fn(n, torch.neg, args, value)

    def _h_OnnxClip(self, n, module, args, value):
        new = self.graph.call_function(torch.clamp, (args[0].node,),
                                       {"min": module.min_val, "max": module.max_val})
        return _Var(new, value)

    def _h_OnnxTranspose(self, n, module, args, value):
        x = args[0]
        perm = list(module.perm) if module.perm is not None else list(range(x.value.dim()))[::-1]
        perm = [p % x.value.dim() for p in perm]
        if perm[0] != 0:
            raise self._unsupported(n, f"perm {perm} moves the batch dim (dim 0)")
        return self._fn(n, "permute", [x, *perm], value, kind="call_method")

    def _h_OnnxConcat(self, n, module, args, value):
        axis = module.axis % value.dim()
        if axis == 0:
            raise self._unsupported(n, "concatenation along the batch dim (axis 0)")
        ops = [self.operand(a) for a in args]
        new = self.graph.call_function(torch.cat, (ops,), {"dim": axis})
        return _Var(new, value)

    def _linear(self, n, x: _Var, weight: torch.Tensor, bias: Optional[torch.Tensor], value):
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight = nn.Parameter(weight.detach().clone().to(value.dtype))
            if bias is not None:
                lin.bias = nn.Parameter(bias.detach().clone().to(value.dtype))
        name = self.add_module(str(n.target), lin)
        return self.graph.call_module(name, (x.node,))

    def _h_OnnxGemm(self, n, module, args, value):
        a, b = args[0], args[1]
        c = args[2] if len(args) > 2 else None
        if module.trans_a:
            raise self._unsupported(n, "transA=1 (transposes the batch dim)")
        if not isinstance(a, _Var) or not isinstance(b, _Const) or isinstance(c, _Var):
            raise self._unsupported(n, "only Gemm(input, constant B, constant C) is supported")
        w = b.value if module.trans_b else b.value.T
        w = w * module.alpha
        out_f = w.shape[0]
        bias, extra = None, None
        if c is not None:
            cv = torch.as_tensor(c.value) * module.beta
            if cv.numel() == 1:
                bias = cv.reshape(1).expand(out_f)
            elif cv.numel() == out_f and cv.shape[-1] == out_f:
                bias = cv.reshape(out_f)
            else:
                extra = cv  # e.g. a (batch, n) bias: added as it is
        new = self._linear(n, a, w, bias, value)
        if extra is not None:
            new = self.graph.call_function(torch.add, (new, self.const_node(extra.to(value.dtype))))
        return _Var(new, value)

    def _h_OnnxMatMul(self, n, module, args, value):
        a, b = args
        if isinstance(a, _Var) and isinstance(b, _Const) and b.value.dim() == 2:
            return _Var(self._linear(n, a, b.value.T, None, value), value)
        self._batch_ok(n, a if isinstance(a, _Var) else b, value)
        return self._fn(n, torch.matmul, args, value)
