"""Fast IBP paths of `BoundedModule` (issue 4), proven identical to the reference path by
``tests/test_fast_paths.py``.

The reference IBP (``compute_bounds(method="IBP")``) runs a clean forward pass through the graph
(`BoundedModule.prepare`), then one interval step per node (`interval_pass`), then folds the spec C into
the last linear layer (`ibp_output_bounds`).  Here the same rules run as **one generated straight-line
program** per BoundedModule and set of perturbed inputs (`ibp_program_source` prints it): one line
per graph node, no dict of values, no per-node dispatch, each intermediate released after its last
use, and (optionally) compiled by ``torch.compile`` so that the elementwise interval work between
two convolutions (BN affine on centre and radius, ReLU on both ends, back to centre/radius) fuses
into one kernel.

**Why the clean pass can go.**  Which nodes are perturbed depends only on which inputs are (a node
is perturbed iff it has a bound rule and a perturbed input: the rules were attached at
construction to exactly the tensor-valued nodes that depend on an input), and the only thing
the rules read from a perturbed input's clean value in ``ibp``/``ibp_image``/``ibp_spec`` is its
shape, dtype and device, except BatchNorm with batch statistics (training mode, or no running
statistics), whose affine map *is* a function of the clean batch.  Each rule declares this next
to its IBP (``BoundOp.ibp_operands``, ``BoundOp.ibp_reads_batch``); a rule that does not (a
user's own, by default) sends the model to the reference path.  So in eval mode a perturbed node's clean value is replaced by a NaN stand-in
of the right shape, dtype and device (a data read would poison the bounds instead of changing
them silently), nodes without a perturbed input are still evaluated normally, and a node without a
rule that consumes a perturbed one must be a shape query (``x.size()``, ``x.shape``, ...).  When
a BatchNorm needs its batch, the clean pass runs exactly as in the reference (or the values kept
by the last ``forward`` serve, as there) and its inputs' clean values go into the program.

Options (``bound_opts``), all giving the reference bounds up to floating-point rounding:

* ``ibp_skip_clean`` (default True): the program above, eager.  False: the reference path.
* ``ibp_compile`` (default False): True, or a dict of ``torch.compile`` arguments (``backend``,
  ``mode``, ``dynamic``, ``options``).  The compiled program reads the live parameters (they are
  graph inputs), takes the input box as tensors (a new ε never recompiles), and gets its own
  compiled function per (perturbed inputs, dtype, device, spec present, train/eval flags, grad
  mode, autocast) on top of dynamo's own guards on shapes and flags, so a change never reuses a
  stale graph; batch sizes go dynamic after the first change.  Where compilation fails it warns
  once and runs the eager program.
* ``ibp_channels_last`` (default False): 4-d input boxes in channels_last memory format (conv
  models on GPU; pair it with ``model.to(memory_format=torch.channels_last)``).
* ``ibp_autocast`` (default None): "bfloat16" runs the IBP pass under ``torch.autocast`` **in
  training only** (gradients enabled and the model in training mode).  The interval rules are
  unchanged, but convolutions and matrix products round to bf16 (8 significant bits), so the bounds
  hold for a bf16-rounded network and may miss the float32 one by about 2^-8 of the magnitudes:
  a training signal, never a certificate.  Under ``torch.no_grad()`` or in eval mode (every
  verification path) the option does nothing and the bounds are the float32/float64 ones.
* ``ibp_cuda_graphs`` (default False, CUDA only): compile with ``mode="reduce-overhead"`` and
  static shapes (one CUDA graph per shape); outputs are overwritten by the next call, so use a
  bound before computing the next one.
"""
from __future__ import annotations

import contextlib
import itertools
import keyword
import linecache
import math
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, fx, nn

from .functionalize import call_module_safely
from .graph import fetch_attr, is_shape_query
from .ops.base import BoundOp, Value
from .perturbations import Perturbation
from .state import BoundState

if TYPE_CHECKING:  # pragma: no cover
    from .bounded_module import BoundedModule

__all__ = ["IBP_PROGRAM_OPTS", "check_ibp_program_opts", "ibp_program_bounds", "ibp_program_source", "compile_ibp",
           "program_supported"]

#: The options of this module and their defaults (merged into `certtrain.bounds.DEFAULT_OPTS`).
IBP_PROGRAM_OPTS: dict[str, Any] = {
    "ibp_skip_clean": True,      # IBP without the clean forward pass where no BN needs its batch
    "ibp_compile": False,        # True or a dict of torch.compile arguments
    "ibp_channels_last": False,  # 4-d input boxes in channels_last memory format
    "ibp_autocast": None,        # "bfloat16": autocast in training only (see the module docstring)
    "ibp_cuda_graphs": False,    # CUDA graphs (torch.compile mode="reduce-overhead"), CUDA only
}

# ------------------------------------------------------------------------------------- helpers
# The generated program calls only these (and the rules): dynamo traces them inline.

def _box(name: str, x: Tensor, box, image) -> Value:
    """A perturbed input: its interval and set image, as `BoundedModule._ibp_node` sets them."""
    v = Value(name, x, True)
    v.image = image
    v.set_interval(box)
    return v


def _ibp(op, name: str, args: tuple, kwargs: dict, clean: dict, nan: Tensor) -> Value:
    """One perturbed node: set image then interval (the reference order); its clean value is the
    supplied one where a BatchNorm needs it, else a NaN stand-in of the right shape and dtype."""
    v = Value(name, None, True)
    v.image = op.ibp_image(*args, **kwargs)
    interval = op.ibp(*args, **kwargs)
    v.set_interval(interval)
    first = interval[0]
    v.value = clean[name] if name in clean else nan.to(first.dtype).expand(first.shape)
    return v


def _finish(op, final: Value, args: tuple, kwargs: dict, C: Optional[Tensor], kept: Optional[tuple]):
    """`BoundedModule.ibp_output_bounds` (C folded into the last op where it can), plus the kept bounds."""
    if C is None:
        lb, ub = final.lower, final.upper
    else:
        folded = op.ibp_spec(C, *args, **kwargs) if op is not None else None
        if folded is not None:
            lb, ub = folded
        else:
            c, r = (t.flatten(1) for t in final.center_radius)
            c = torch.bmm(C, c.unsqueeze(-1)).squeeze(-1)
            r = torch.bmm(C.abs(), r.unsqueeze(-1)).squeeze(-1)
            lb, ub = c - r, c + r
    return lb, ub, (None if kept is None else {v.name: (v.lower, v.upper) for v in kept})


class _Unsupported(Exception):
    """The fast program cannot serve this graph (the message says why)."""


def _nodes_in(a: Any) -> list:
    found: list = []
    fx.node.map_arg(a, lambda m: found.append(m) or m)
    return found


def _perturbed_elsewhere(n, rule: str, pert: dict) -> bool:
    """Whether a perturbed node sits where the rule reads a clean value (see ``BoundOp.ibp_operands``)."""
    args, kwargs = n.fx_node.args, n.fx_node.kwargs
    k = {"unary": 1, "binary": 2, "list": 1}[rule]
    bounded = list(args[:k])
    if rule == "list":
        if not bounded or not isinstance(bounded[0], (list, tuple)):
            return True
        bounded = list(bounded[0])
    if any(_nodes_in(a) and not isinstance(a, fx.Node) for a in bounded):
        return True  # a container where the rule expects a bounded value
    return any(pert[m.name] for m in _nodes_in((tuple(args[k:]), dict(kwargs))))


# ------------------------------------------------------------------------------------- program
class _Program:
    """The IBP pass of one BoundedModule for one set of perturbed inputs, as generated Python.

    ``reason`` is None when the program serves, else why the reference path must run."""

    _ids = itertools.count()

    def __init__(self, net: "BoundedModule", perturbed: tuple[bool, ...], keep: bool):
        self.reason: Optional[str] = None
        self.keep = keep
        self.final_perturbed = False
        self.bn_inputs: list[tuple[Any, str]] = []  # (BatchNorm rule, name of its input node)
        self.modules: list[nn.Module] = []          # whose train/eval flag the rules read
        self.source = ""
        try:
            lines, last_use, var, ops, consts = self._generate(net, perturbed)
        except _Unsupported as e:
            self.reason = str(e)
            return
        # Release every intermediate after its last use (the reference keeps all of them alive).
        dels: dict[int, list[str]] = {}
        if not keep:
            for name, i in last_use.items():
                if i < len(lines) - 1:
                    dels.setdefault(i, []).append(var[name])
        body = []
        for i, line in enumerate(lines):
            body.append(line)
            if i in dels:
                body.append("del " + ", ".join(dels[i]))
        self.source = (f"def ibp_program(inputs, boxes, images, clean, C, nan):\n"
                       f"    # IBP of {type(net.model).__name__} ({len(ops)} bound rules), perturbed inputs "
                       f"{list(perturbed)}\n" + "".join(f"    {line}\n" for line in body))
        self._globals = {"_K": consts, "_OP": ops, "_GM": net.graph_module, "_Value": Value, "_box": _box,
                         "_ibp": _ibp, "_finish": _finish, "_fetch": fetch_attr,
                         "_safe": call_module_safely}
        self.fn = self.new_function()

    def _generate(self, net, perturbed):
        """Lines of the program, the index of the last line reading each node, node -> variable,
        the rules and the constants it refers to.  Raises _Unsupported with the reason."""
        consts: list[Any] = []
        ops: list[Any] = []
        var: dict[str, str] = {}
        pert: dict[str, bool] = {}
        nodes = net.nodes
        kinds = {n.name: n.kind for n in nodes}

        def lit(a: Any, raw: bool) -> str:
            if isinstance(a, fx.Node):
                return var[a.name] + (".value" if raw else "")
            if type(a) is tuple:
                return "(" + "".join(lit(x, raw) + ", " for x in a) + ")"
            if isinstance(a, list):
                return "[" + ", ".join(lit(x, raw) for x in a) + "]"
            if isinstance(a, dict) and all(type(k) is str for k in a):
                return "{" + ", ".join(f"{k!r}: {lit(v, raw)}" for k, v in a.items()) + "}"
            if isinstance(a, slice):
                return f"slice({lit(a.start, raw)}, {lit(a.stop, raw)}, {lit(a.step, raw)})"
            if a is None or type(a) in (bool, int, str):
                return repr(a)
            if _nodes_in(a):
                raise _Unsupported(f"a graph value inside an argument of type {type(a).__name__}")
            consts.append(a)
            return f"_K[{len(consts) - 1}]"

        lines: list[str] = []
        last_use: dict[str, int] = {}
        n_inputs = 0
        for n in nodes:
            if n.kind == "output":
                continue
            v = var[n.name] = f"v{len(var)}"
            last_use[n.name] = len(lines)  # a node nobody reads is released at once
            for m in n.inputs:
                last_use[m] = len(lines)
            args, kwargs = n.fx_node.args, n.fx_node.kwargs
            if n.kind == "placeholder":
                i, n_inputs = n_inputs, n_inputs + 1
                p = pert[n.name] = perturbed[i]
                lines.append(f"{v} = _box({n.name!r}, inputs[{i}], boxes[{i}], images[{i}])" if p else
                             f"{v} = _Value({n.name!r}, inputs[{i}], False)")
                continue
            if n.kind == "get_attr":
                pert[n.name] = False
                lines.append(f"{v} = _Value({n.name!r}, _fetch(_GM, {n.fx_node.target!r}), False)")
                continue
            if n.module is not None and all(n.module is not m for m in self.modules):
                self.modules.append(n.module)
            p = pert[n.name] = n.op is not None and any(pert[m] for m in n.inputs)
            if p:
                operands = n.op.ibp_operands
                if operands is None:
                    raise _Unsupported(f"the rule {type(n.op).__name__} of node '{n.name}' does not declare "
                                       "its clean-value reads (BoundOp.ibp_operands)")
                if _perturbed_elsewhere(n, operands, pert):
                    raise _Unsupported(f"node '{n.name}' has a perturbed input where its rule "
                                       f"{type(n.op).__name__} reads a clean value")
                src = n.arg_name(0)
                if type(n.op).ibp_reads_batch is not BoundOp.ibp_reads_batch and src is not None \
                        and kinds[src] != "placeholder":
                    self.bn_inputs.append((n.op, src))
                ops.append(n.op)
                lines.append(f"{v} = _ibp(_OP[{len(ops) - 1}], {n.name!r}, {lit(tuple(args), False)}, "
                             f"{lit(dict(kwargs), False)}, clean, nan)")
                continue
            if any(pert[m] for m in n.inputs) and not is_shape_query(n):
                raise _Unsupported(f"node '{n.name}' ({n.kind} {n.fx_node.target}) reads a perturbed "
                                   "value without a bound rule")
            t = n.fx_node.target
            kw = [f"{k}={lit(x, True)}" for k, x in kwargs.items()]
            if n.kind == "call_method":
                rest = ", ".join([lit(x, True) for x in args[1:]] + kw)
                call = (f"{lit(args[0], True)}.{t}({rest})" if t.isidentifier() and not keyword.iskeyword(t)
                        else f"getattr({lit(args[0], True)}, {t!r})({rest})")
            elif n.kind == "call_module":
                consts.append(n.module)  # a module with inplace=True gets a copy of its input
                call = (f"_safe(_K[{len(consts) - 1}], (" + "".join(lit(x, True) + ", " for x in args)
                        + "), {" + ", ".join(f"{k!r}: {lit(x, True)}" for k, x in kwargs.items()) + "})")
            else:
                consts.append(t)
                call = f"_K[{len(consts) - 1}](" + ", ".join([lit(x, True) for x in args] + kw) + ")"
            lines.append(f"{v} = _Value({n.name!r}, {call}, False)")
        final = net.node(net.final_name)
        self.final_perturbed = pert.get(final.name, False)
        if final.kind != "placeholder" and self.final_perturbed:
            ops.append(final.op)
            tail = (f"_OP[{len(ops) - 1}], {var[final.name]}, {lit(tuple(final.fx_node.args), False)}, "
                    f"{lit(dict(final.fx_node.kwargs), False)}")
        else:
            tail = f"None, {var[final.name]}, (), {{}}"
        kept = "(" + "".join(f"{var[m]}, " for m, p in pert.items() if p) + ")" if self.keep else "None"
        for m in final.inputs + [final.name]:
            last_use[m] = len(lines)
        lines.append(f"return _finish({tail}, C, {kept})")
        return lines, last_use, var, ops, consts

    def new_function(self) -> Callable:
        """A fresh function object *and code object* for the source (dynamo caches per code)."""
        filename = f"<certtrain ibp program {next(self._ids)}>"
        linecache.cache[filename] = (len(self.source), None, self.source.splitlines(True), filename)
        scope = dict(self._globals)
        exec(compile(self.source, filename, "exec"), scope)
        return scope["ibp_program"]

    def clean_needed(self) -> list[str]:
        """Nodes whose clean value a BatchNorm reads now (training mode: the batch statistics)."""
        return [name for op, name in self.bn_inputs if op.ibp_reads_batch()]


# --------------------------------------------------------------------------------------- state
class _State:
    def __init__(self):
        self.programs: dict[tuple, _Program] = {}
        self.compiled: dict[tuple, Callable] = {}
        self.compile_failed = False
        self.warned: set[str] = set()
        self.nan: dict[tuple, Tensor] = {}


_STATES: "weakref.WeakKeyDictionary[BoundedModule, _State]" = weakref.WeakKeyDictionary()


def _state(net: "BoundedModule") -> _State:
    s = _STATES.get(net)
    if s is None:
        s = _STATES[net] = _State()
    return s


def _warn_once(state: _State, key: str, msg: str, stacklevel: int) -> None:
    if key not in state.warned:
        state.warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel + 1)


def _flag(opts: Mapping, key: str) -> bool:
    v = opts.get(key, IBP_PROGRAM_OPTS[key])
    if not isinstance(v, bool):
        raise ValueError(f"bound_opts {key}={v!r}: use true or false")
    return v


def _compile_kwargs(opts: Mapping) -> Optional[dict]:
    """torch.compile arguments from ``ibp_compile`` / ``ibp_cuda_graphs``; None: do not compile."""
    v = opts.get("ibp_compile", False)
    if v is True:
        kw: Optional[dict] = {}
    elif v is False or v is None:
        kw = None
    elif isinstance(v, Mapping):
        kw = dict(v)
        bad = set(kw) - {"backend", "mode", "dynamic", "options", "fullgraph"}
        if bad:
            raise ValueError(f"bound_opts ibp_compile has unknown torch.compile argument(s) {sorted(bad)}; "
                             "use backend, mode, dynamic, options, fullgraph")
    else:
        raise ValueError(f"bound_opts ibp_compile={v!r}: use true, false or a dict of torch.compile "
                         "arguments such as {'backend': 'inductor'}")
    if _flag(opts, "ibp_cuda_graphs"):
        kw = {"mode": "reduce-overhead", "dynamic": False, **(kw or {})}
    return kw


def _autocast_dtype(opts: Mapping) -> Optional[torch.dtype]:
    v = opts.get("ibp_autocast")
    if v in (None, False, "none", "None"):
        return None
    if v in ("bf16", "bfloat16", torch.bfloat16):
        return torch.bfloat16
    raise ValueError(f"bound_opts ibp_autocast={v!r}: use 'bfloat16' (training only) or None; float16 "
                     "would need loss scaling and is not offered")


def check_ibp_program_opts(opts: Mapping) -> None:
    """ValueError for a bad value of one of this module's options (called by the engine at
    construction, so a typo fails before any work)."""
    for key in ("ibp_skip_clean", "ibp_channels_last", "ibp_cuda_graphs"):
        _flag(opts, key)
    _compile_kwargs(opts)
    _autocast_dtype(opts)


def program_supported(net: "BoundedModule", perturbed: Optional[Sequence[bool]] = None) -> Optional[str]:
    """None if the fast program serves ``net`` (default: every input perturbed), else the reason."""
    mask = tuple(perturbed) if perturbed is not None else (True,) * len(net.input_names)
    return _program(net, mask, False).reason


def _program(net, mask: tuple, keep: bool) -> _Program:
    state = _state(net)
    prog = state.programs.get((mask, keep))
    if prog is None:
        prog = state.programs[(mask, keep)] = _Program(net, mask, keep)
    return prog


def ibp_program_source(net: "BoundedModule", perturbed: Optional[Sequence[bool]] = None) -> str:
    """The generated straight-line IBP program of ``net`` (for reading; what torch.compile sees)."""
    mask = tuple(perturbed) if perturbed is not None else (True,) * len(net.input_names)
    prog = _program(net, mask, False)
    if prog.reason is not None:
        raise ValueError(f"no fast IBP program for this model: {prog.reason}")
    return prog.source


def compile_ibp(net: "BoundedModule", **compile_kwargs) -> "BoundedModule":
    """Turn on the compiled IBP program of ``net`` (same as ``bound_opts={"ibp_compile": ...}``);
    ``compile_kwargs`` go to ``torch.compile`` (e.g. ``backend="inductor"``)."""
    net.bound_opts["ibp_compile"] = dict(compile_kwargs) if compile_kwargs else True
    _compile_kwargs(net.bound_opts)  # validate now, not at the first bound
    return net


# ----------------------------------------------------------------------------------- entry point
def ibp_program_bounds(net: "BoundedModule", inputs: list[Tensor], ptbs: list[Optional[Perturbation]],
                       C: Optional[Tensor], keep_intermediate: bool
                       ) -> Optional[tuple[Tensor, Tensor, Optional[BoundState]]]:
    """(lb, ub, state with the kept bounds or None) by the fast program, or None where the
    reference path must run (options off, an undeclared rule, no perturbed output).  Called by
    `BoundedModule.compute_bounds` after its input checks; the forward cache is used (or dropped)
    as the reference does."""
    opts = net.bound_opts
    compile_kw = _compile_kwargs(opts)
    autocast = _autocast_dtype(opts)
    channels_last = _flag(opts, "ibp_channels_last")
    if not _flag(opts, "ibp_skip_clean") and compile_kw is None and autocast is None and not channels_last:
        return None
    ref = inputs[0]
    if _flag(opts, "ibp_cuda_graphs") and ref.device.type != "cuda":
        raise ValueError(f"bound_opts ibp_cuda_graphs=True needs CUDA inputs, got {ref.device.type}: CUDA "
                         "graphs exist only on CUDA; drop the option (ibp_compile alone also works on CPU)")
    state = _state(net)
    mask = tuple(p is not None for p in ptbs)
    prog = _program(net, mask, keep_intermediate)
    if prog.reason is not None:
        if compile_kw is not None or autocast is not None or channels_last:
            _warn_once(state, "unsupported", f"fast IBP path unavailable ({prog.reason}); using the "
                       "reference IBP path", stacklevel=3)
        return None
    if not prog.final_perturbed:
        return None
    need = prog.clean_needed()
    if need:  # BatchNorm with batch statistics: the clean pass, exactly as the reference runs it
        values = net.clean_values(inputs, mask)
        clean = {name: values[name].value for name in need}
    else:
        net.drop_forward_cache()  # a cached forward serves one compute_bounds call, as in the reference
        clean = {}
    boxes = [p.interval(x) if p is not None else None for x, p in zip(inputs, ptbs)]
    images = [p.image(x) if p is not None else None for x, p in zip(inputs, ptbs)]
    if channels_last:
        boxes = [tuple(t.contiguous(memory_format=torch.channels_last) for t in b)
                 if b is not None and b[0].dim() == 4 else b for b in boxes]
    key_nan = (ref.dtype, ref.device)
    nan = state.nan.get(key_nan)
    if nan is None:
        nan = state.nan[key_nan] = torch.full((), math.nan, dtype=ref.dtype, device=ref.device)
    cast = autocast is not None and torch.is_grad_enabled() and net.model.training
    ctx = torch.autocast(ref.device.type, dtype=autocast) if cast else contextlib.nullcontext()
    call = (inputs, boxes, images, clean, C, nan)
    with ctx:
        if compile_kw is not None and not state.compile_failed:
            lb, ub, kept = _run_compiled(net, state, prog, compile_kw, call, mask, cast, channels_last)
        else:
            lb, ub, kept = prog.fn(*call)
    if cast:
        lb, ub = lb.to(ref.dtype), ub.to(ref.dtype)
    kept_state = None
    if kept is not None:
        values = {}
        for name, (lo, up) in kept.items():
            v = values[name] = Value(name, None, True)
            v.lower, v.upper = lo, up
        kept_state = BoundState(values, dict(zip(net.input_names, ptbs)), order=[n.name for n in net.nodes])
    return lb, ub, kept_state


def _dont_skip():
    """fx.Node.args/kwargs are on dynamo's skip list and the rules of functional ops read them:
    let dynamo trace them (a config patch around the call, so each program keeps its own code
    object and its own compile cache)."""
    if hasattr(torch._dynamo.config, "dont_skip_tracing"):
        return torch._dynamo.config.patch(dont_skip_tracing=True)
    return contextlib.nullcontext()


def _run_compiled(net, state: _State, prog: _Program, compile_kw: dict, call: tuple, mask: tuple,
                  cast: bool, channels_last: bool):
    """The compiled program for this variant (compiled on first use); on a compilation failure,
    the eager program (a genuine error of the bounds is raised by it, unchanged)."""
    inputs, C = call[0], call[4]
    key = (mask, prog.keep, inputs[0].dtype, inputs[0].device, C is None,
           tuple(m.training for m in prog.modules), torch.is_grad_enabled(), cast, channels_last,
           tuple(sorted((k, repr(v)) for k, v in compile_kw.items())))
    fn = state.compiled.get(key)
    try:
        if fn is None:
            if not torch._dynamo.is_dynamo_supported():
                raise RuntimeError("torch.compile (dynamo) is not supported on this Python/platform")
            fn = state.compiled[key] = torch.compile(prog.new_function(), **compile_kw)
        if compile_kw.get("mode") == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with _dont_skip():
            return fn(*call)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - decided below by the eager program
        root = e
        while (getattr(root, "inner_exception", None) or root.__cause__) is not None:
            root = getattr(root, "inner_exception", None) or root.__cause__
        failure = f"{type(root).__name__}: {str(root).strip().splitlines()[0] if str(root).strip() else ''}"
        if root is not e:
            failure = f"{type(e).__name__} from {failure}"
    out = prog.fn(*call)  # a genuine error of the bounds is raised here, as on the reference path
    state.compile_failed = True
    state.compiled.clear()
    _warn_once(state, "compile", f"ibp_compile: torch.compile failed ({failure[:300]}); using the eager "
               "IBP program for this BoundedModule (same bounds, no fusion)", stacklevel=4)
    return out
