"""BoundedModule: bounds of a traced model's outputs over a perturbation of its inputs.

The graph walk lives here; the maths of each op lives in `certtrain.bounds.ops`, and everything
one computation knows lives in a `BoundState` that the walk is handed explicitly.

* IBP (Gowal et al. 2018): intervals propagated forward through every node.
* CROWN (Zhang et al. 2018): linear bounds propagated backward from the output to the inputs,
  then concretized over the perturbation set.  Every input of a relaxed op (ReLU, ...) needs
  bounds first; they are computed in topological order, by CROWN too, for the neurons whose
  relaxation they change (the unstable ones, judged by IBP from the already tightened inputs, as
  auto_LiRPA does with its "sparse intermediate bounds").
* CROWN-IBP (Zhang et al. 2020): IBP for every intermediate node, CROWN for the output.

**The walk interface** (what α-CROWN, the IBP program and every future algorithm build on):

=============================================  ==================================================
``net.prepare(x, intermediate_bounds=None)``   check the inputs, run (or reuse) the clean pass:
                                                a fresh `BoundState`
``net.interval_pass(state, refine, alphas)``   bounds of every node in topological order (IBP;
                                                with ``refine`` the inputs of relaxed ops by CROWN)
``net.output_bounds(state, C, ...)``           CROWN bounds of the spec rows C on the output
``net.node_bounds(state, name, rows, ...)``    CROWN bounds of chosen neurons of any node
``net.ibp_output_bounds(state, C)``            IBP bounds of the spec (folded into the last layer)
``net.nodes`` / ``net.node(name)``             the graph, topological order (`BoundNode`)
``net.relaxed_input_names(state)``             nodes whose bounds some relaxation reads
``net.optimizable_nodes(state)``               relaxed nodes with a free parameter (α)
=============================================  ==================================================
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, fx, nn

from .alpha_crown import optimized_bounds
from .decompose import decompose, lift_parameters
from .functionalize import call_module_safely
from .graph import BoundNode, attach_op, build_nodes, fetch_attr, is_set_constant, trace
from .ibp_program import IBP_PROGRAM_OPTS, check_ibp_program_opts, ibp_program_bounds
from .methods import ALPHA_DEFAULTS, BoundMethod, check_alpha_opts, get_method
from .ops.base import Value
from .ops.registry import UnsupportedOperation, source_line
from .patches import LinearA, Patches, to_dense
from .perturbations import Perturbation
from .state import BoundState
from .tensor import BoundedTensor

DEFAULT_OPTS: dict[str, Any] = {
    "relu": "adaptive",           # lower slope of unstable ReLUs: adaptive | same-slope | zero
    "hardtanh": "same-slope",     # free slope of clamp / HardTanh across a limit: same-slope | adaptive | zero
    "conv_mode": "patches",       # patches | matrix (dense), for CROWN through convolutions
    "memory_budget": 1 << 30,     # bytes of CROWN coefficients per chunk of rows
    "sparse_intermediate_bounds": True,  # CROWN only for neurons whose relaxation they change
    "intersect_intermediate": True,  # intermediate bounds: CROWN ∩ IBP (False: CROWN alone, as auto_LiRPA)
    "optimize_bound_args": dict(ALPHA_DEFAULTS),  # alpha-CROWN (see certtrain.bounds.methods)
    **IBP_PROGRAM_OPTS,           # fast IBP paths: ibp_skip_clean, ibp_compile, ... (certtrain.bounds.ibp_program)
}
_OPT_ALIASES = {"activation_bound_option": "relu"}
_RELU_VALUES = ("adaptive", "same-slope", "zero")
_RELU_ALIASES = {"zero-lb": "zero"}


def check_bound_opts(bound_opts: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """`DEFAULT_OPTS` updated by ``bound_opts``; an unknown key or a bad value is a ValueError that
    names it and what is accepted."""
    opts = dict(DEFAULT_OPTS)
    for k, v in dict(bound_opts or {}).items():
        key = _OPT_ALIASES.get(k, k)
        if key not in DEFAULT_OPTS:
            raise ValueError(f"unknown bound_opts key {k!r}; available: {', '.join(DEFAULT_OPTS)}")
        opts[key] = _RELU_ALIASES.get(v, v) if key == "relu" else v
    for key in ("relu", "hardtanh"):
        opts[key] = _RELU_ALIASES.get(opts[key], opts[key])
        if opts[key] not in _RELU_VALUES:
            raise ValueError(f"bound_opts {key}={opts[key]!r}: use 'adaptive', 'same-slope' or 'zero'")
    if opts["conv_mode"] not in ("patches", "matrix"):
        raise ValueError(f"bound_opts conv_mode={opts['conv_mode']!r}: use 'patches' or 'matrix'")
    mb = opts["memory_budget"]
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb > 0:
        raise ValueError(f"bound_opts memory_budget must be a positive number of bytes, got {mb!r}")
    for k in ("sparse_intermediate_bounds", "intersect_intermediate"):
        if not isinstance(opts[k], bool):
            raise ValueError(f"bound_opts {k} must be true or false, got {opts[k]!r}")
    opts["optimize_bound_args"] = check_alpha_opts(opts["optimize_bound_args"], where="bound_opts.optimize_bound_args")
    check_ibp_program_opts(opts)
    return opts


def _carries_tensor(v: Any) -> bool:
    if isinstance(v, Tensor):
        return True
    return isinstance(v, (tuple, list)) and any(_carries_tensor(t) for t in v)


def _add(a: Optional[LinearA], b: Optional[LinearA]) -> Optional[LinearA]:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, Tensor) and isinstance(b, Patches):
        return b + a
    return a + b


def _unknown_is_infinite(lb: Tensor, ub: Tensor) -> tuple[Tensor, Tensor]:
    """A NaN bound (inf - inf or 0 * inf in a relaxation past float range) says nothing: -inf below,
    +inf above, which is sound, where NaN would compare false against every value."""
    return torch.nan_to_num(lb, nan=-math.inf, posinf=math.inf, neginf=-math.inf), \
        torch.nan_to_num(ub, nan=math.inf, posinf=math.inf, neginf=-math.inf)


class BoundedModule(nn.Module):
    """Wrap ``model`` so that ``compute_bounds`` gives guaranteed output bounds.

    ``global_input`` is an example input (a tensor or tuple of tensors) used to trace and check
    the model; any batch size works afterwards.  ``bound_opts`` overrides `DEFAULT_OPTS` (an
    unknown key is an error).
    """

    def __init__(self, model: nn.Module, global_input: Union[Tensor, Sequence[Tensor]],
                 bound_opts: Optional[Mapping[str, Any]] = None, device: Any = None, verbose: bool = False):
        super().__init__()
        self.model = model
        self.bound_opts = check_bound_opts(bound_opts)
        example = self._as_inputs(global_input)
        gm = decompose(trace(model), example)  # ops without a rule of their own, rewritten (decompose.py)
        # BoundedParameters become graph inputs after the model's own, fed by `_with_parameters`
        self._lifted: list[tuple[str, str]] = lift_parameters(gm)
        self._n_inputs = len(example)
        example = self._with_parameters(example, gm)
        object.__setattr__(self, "_gm", gm)  # shares the user's submodules; not a child module
        self._nodes: list[BoundNode] = build_nodes(gm)
        self._by_name = {n.name: n for n in self._nodes}
        self._index = {n.name: i for i, n in enumerate(self._nodes)}
        self._placeholders = [n for n in self._nodes if n.kind == "placeholder"]
        self._output = next(n for n in self._nodes if n.kind == "output")
        self._consumers: dict[str, list[BoundNode]] = {n.name: [] for n in self._nodes}
        for n in self._nodes:
            for i in n.inputs:
                self._consumers[i].append(n)
        # Check the model once on the example input; every node that can carry a perturbation
        # must have a bound rule (so an unsupported op fails here, not mid-training).
        self._input_shapes = [tuple(x.shape[1:]) for x in example]
        # The check runs in eval mode: it must not update BatchNorm statistics, and a batch of
        # one must work for a model in training mode.
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                values = self._run(example, perturbed=[True] * len(example))
        finally:
            for m, mode in modes:
                m.training = mode
        for n in self._nodes:
            if n.kind.startswith("call") and values[n.name].perturbed:
                attach_op(n, self.bound_opts)
            elif (n.kind.startswith("call") and any(values[i].perturbed for i in n.inputs)
                  and not is_set_constant(n)):
                # A perturbed tensor turned into a Python value (.item(), .tolist(), bool(...),
                # an in-place op's None, ...) would be treated as a constant: refuse it.
                raise UnsupportedOperation(
                    f"graph node '{n.name}' ({source_line(n.fx_node)}) turns a perturbed tensor into "
                    f"a non-tensor value ({type(values[n.name].value).__name__}); bounds cannot follow "
                    "it. Keep the computation in tensor ops (only shape queries such as x.size(), "
                    "x.shape or len(x) may read a perturbed tensor)")
        self._final_name = self._output.inputs[0] if self._output.inputs else None
        out = values[self._final_name].value
        if not isinstance(out, Tensor):
            raise TypeError("BoundedModule needs a model that returns one tensor, got "
                            f"{type(out).__name__}")
        self._output_shape = tuple(out.shape[1:])
        self._warned_grad = False
        self._cache = None
        self._last: Optional[BoundState] = None  # of the last call with keep_intermediate

    # ---------------------------------------------------------------- graph facts
    @property
    def nodes(self) -> list[BoundNode]:
        """The traced graph's nodes in topological order (the output node last)."""
        return list(self._nodes)

    def node(self, name: str) -> BoundNode:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no graph node {name!r}; nodes: {', '.join(self._by_name)}") from None

    def consumers(self, name: str) -> list[BoundNode]:
        """The nodes that read node ``name``."""
        return list(self._consumers[name])

    @property
    def input_names(self) -> list[str]:
        """Names of the graph's input nodes: the model's arguments in order, then one per
        `BoundedParameter` (`parameter_inputs`)."""
        return [n.name for n in self._placeholders]

    @property
    def parameter_inputs(self) -> dict[str, str]:
        """{graph input name: parameter name} of the perturbed parameters (`BoundedParameter`)."""
        return dict(self._lifted)

    def _with_parameters(self, xs: list, gm: Optional[fx.GraphModule] = None) -> list:
        """The model's inputs followed by one copy per example of each perturbed parameter
        (a BoundedTensor with the parameter's current ``ptb``)."""
        if not self._lifted or len(xs) != self._n_inputs:
            return list(xs)
        gm = self._gm if gm is None else gm
        batch = xs[0].shape[0]
        out = list(xs)
        for _, target in self._lifted:
            p = fetch_attr(gm, target)
            v = p.expand(batch, *p.shape)
            out.append(BoundedTensor(v, p.ptb) if getattr(p, "ptb", None) is not None else v)
        return out

    @property
    def final_name(self) -> str:
        """Name of the node whose value the model returns."""
        return self._final_name

    @property
    def output_shape(self) -> tuple:
        """Per-example shape of the model's output."""
        return self._output_shape

    @property
    def graph_module(self) -> fx.GraphModule:
        """The traced (and functionalized) graph; shares the user's submodules."""
        return self._gm

    def pre_activation_names(self) -> list[str]:
        """Names of the nodes whose bounds a relaxed op (ReLU, Sigmoid, MaxPool ...) consumes, in
        topological order: the "pre-activation" layers of the regularizers of Shi et al. 2021."""
        seen: list[str] = []
        for n in self._nodes:
            for name in n.relaxed_names:
                if name not in seen:
                    seen.append(name)
        return seen

    def save_intermediate(self) -> "dict[str, tuple[Tensor, Tensor]]":
        """Bounds (lower, upper) of every perturbed node from the last ``compute_bounds`` call made
        with ``keep_intermediate=True`` (auto_LiRPA's name), keyed by node name in topological order."""
        if self._last is None:
            raise RuntimeError("no intermediate bounds kept: call compute_bounds(..., keep_intermediate=True) first")
        return {k: v for k, v in self._last.intermediate().items() if k != self._output.name}

    # ---------------------------------------------------------------- forward
    def forward(self, *x: Tensor) -> Tensor:
        """The model's plain output.  The node values are kept, so that a following
        ``compute_bounds`` on the same inputs (and unchanged parameters) reuses this forward pass
        instead of running the model again (certified training needs both)."""
        inputs = [t.as_subclass(Tensor) if isinstance(t, BoundedTensor) else t for t in x]
        inputs = [t.as_subclass(Tensor) if isinstance(t, BoundedTensor) else t for t in self._with_parameters(inputs)]
        if len(inputs) != len(self._placeholders):
            return self.model(*inputs)
        values = self._run(inputs, [True] * len(inputs))
        self._cache = (self._cache_key(inputs), values)
        return values[self._final_name].value

    def _cache_key(self, inputs: list[Tensor]) -> tuple:
        """What must not change for cached node values to stay valid."""
        return (tuple((t.data_ptr(), tuple(t.shape), t.dtype, t._version) for t in inputs),
                tuple(p._version for p in self.model.parameters()),
                tuple(m.training for m in self.model.modules()), torch.is_grad_enabled())

    def drop_forward_cache(self) -> None:
        """Forget the values kept by the last ``forward`` (a cache serves one bound computation)."""
        self._cache = None

    def clean_values(self, inputs: list[Tensor], perturbed: Sequence[bool]) -> dict[str, Value]:
        """Every node's clean value for plain input tensors (the last ``forward``'s when it ran on
        the same inputs and parameters, else a fresh pass), marked by whether it depends on a
        perturbed input.  The values belong to the caller (a new state)."""
        cache, self._cache = self._cache, None  # a cache serves one compute_bounds call
        if cache is None or cache[0] != self._cache_key(inputs):
            return self._run(inputs, list(perturbed))
        values = cache[1]
        for n in self._nodes:  # re-mark which nodes depend on the perturbed inputs
            v = values.get(n.name)
            if v is None:
                continue
            if n.kind == "placeholder":
                v.perturbed = perturbed[self._placeholders.index(n)]
            elif n.kind != "get_attr":
                v.perturbed = _carries_tensor(v.value) and any(values[i].perturbed for i in n.inputs) \
                    and not is_set_constant(n)
            v.lower = v.upper = v.image = None
        return values

    @staticmethod
    def _as_inputs(x) -> list[Tensor]:
        if isinstance(x, Tensor):
            return [x]
        return list(x)

    def _args(self, node: BoundNode, values: dict[str, Value], raw: bool):
        f = (lambda n: values[n.name].value) if raw else (lambda n: values[n.name])
        return fx.node.map_arg(node.fx_node.args, f), fx.node.map_arg(node.fx_node.kwargs, f)

    def _run(self, inputs: list[Tensor], perturbed: list[bool]) -> dict[str, Value]:
        """Clean forward pass through the graph, marking which nodes depend on perturbed inputs."""
        values: dict[str, Value] = {}
        it = iter(zip(inputs, perturbed))
        for n in self._nodes:
            if n.kind == "placeholder":
                x, p = next(it)
                values[n.name] = Value(n.name, x, p)
                continue
            if n.kind == "output":
                continue
            if n.kind == "get_attr":
                values[n.name] = Value(n.name, fetch_attr(self._gm, n.fx_node.target))
                continue
            args, kwargs = self._args(n, values, raw=True)
            t = n.fx_node.target
            if n.kind == "call_module":
                v = call_module_safely(n.module, args, kwargs)
            elif n.kind == "call_method":
                v = getattr(args[0], t)(*args[1:], **kwargs)
            else:
                v = t(*args, **kwargs)
            # Any tensor computed from a perturbed input (also integer ones, or tuples of tensors)
            # needs a bound rule; only non-tensor values (sizes, shapes) and value-free tensors
            # (zeros_like, ...) are safe as constants.
            pert = _carries_tensor(v) and any(values[i].perturbed for i in n.inputs) and not is_set_constant(n)
            values[n.name] = Value(n.name, v, pert)
        return values

    # ---------------------------------------------------------------- checks
    def check_inputs(self, x) -> tuple[list[Tensor], list[Optional[Perturbation]]]:
        """(plain tensors, perturbations) of ``x`` (tensors / BoundedTensors), checked: count,
        shape, finiteness, dtype, and each perturbation's own settings."""
        xs = self._as_inputs(x)
        if len(xs) != self._n_inputs:
            raise ValueError(f"the model takes {self._n_inputs} input(s), got {len(xs)}")
        xs = self._with_parameters(xs)
        plain, ptbs = [], []
        params = next(iter(self.model.parameters()), None)
        for i, t in enumerate(xs):
            if not isinstance(t, Tensor):
                raise TypeError(f"input {i} must be a tensor or BoundedTensor, got {type(t).__name__}")
            ptb = getattr(t, "ptb", None) if isinstance(t, BoundedTensor) else None
            t = t.as_subclass(Tensor) if isinstance(t, BoundedTensor) else t
            if tuple(t.shape[1:]) != self._input_shapes[i] or t.dim() != len(self._input_shapes[i]) + 1:
                raise ValueError(f"input {i} has shape {tuple(t.shape)}, but the model was traced with "
                                 f"per-example shape {self._input_shapes[i]}: pass (batch, "
                                 f"{', '.join(map(str, self._input_shapes[i]))})")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"input {i} contains NaN or inf")
            if params is not None and t.is_floating_point() and t.dtype != params.dtype:
                raise TypeError(f"input {i} is {t.dtype} but the model's parameters are {params.dtype}: "
                                f"convert one of them (e.g. model.to({t.dtype}))")
            if ptb is not None:
                if not isinstance(ptb, Perturbation):
                    raise TypeError(f"input {i}: ptb must be a certtrain.bounds.Perturbation, got {type(ptb).__name__}")
                ptb.validate(t)
            plain.append(t)
            ptbs.append(ptb)
        return plain, ptbs

    def check_spec(self, C: Optional[Tensor], batch: int, ref: Tensor) -> Optional[Tensor]:
        """The spec C checked and expanded to (batch, n_spec, n_out) in ``ref``'s dtype (or None)."""
        if C is None:
            return None
        n_out = math.prod(self._output_shape)
        if not isinstance(C, Tensor) or C.dim() != 3 or C.shape[0] not in (1, batch) or C.shape[2] != n_out:
            shape = tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__
            raise ValueError(f"C must have shape (batch={batch}, n_spec, n_out={n_out}), got {shape}")
        if not torch.isfinite(C).all():
            raise ValueError("C contains NaN or inf")
        return C.to(ref.dtype).expand(batch, *C.shape[1:])

    # ---------------------------------------------------------------- the walk
    def prepare(self, x, intermediate_bounds: Optional[Mapping[str, tuple[Tensor, Tensor]]] = None) -> BoundState:
        """A fresh `BoundState` for inputs ``x`` (tensors / BoundedTensors): inputs checked, clean
        values computed (or reused from the last ``forward``), no bounds yet.
        ``intermediate_bounds``: {node: (lower, upper)} that hold over the set being bounded
        (e.g. a branch-and-bound domain); every walk over the state intersects them in."""
        inputs, ptbs = self.check_inputs(x)
        values = self.clean_values(inputs, [p is not None for p in ptbs])
        state = BoundState(values, {n.name: p for n, p in zip(self._placeholders, ptbs)},
                           order=[n.name for n in self._nodes])
        for name, (lo, up) in dict(intermediate_bounds or {}).items():
            if name not in self._by_name:
                raise ValueError(f"intermediate_bounds names {name!r}, which is no graph node; nodes: "
                                 f"{', '.join(self._by_name)}")
            state.fix(name, lo, up)
        return state

    def _ibp_node(self, n: BoundNode, state: BoundState):
        v = state.values[n.name]
        if n.kind == "placeholder":
            ptb = state.ptbs[n.name]
            v.image = ptb.image(v.value)
            return ptb.interval(v.value)
        args, kwargs = self._args(n, state.values, raw=False)
        v.image = n.op.ibp_image(*args, **kwargs)
        return n.op.ibp(*args, **kwargs)

    def interval_pass(self, state: BoundState, refine: bool = False, alphas: Optional[dict] = None,
                      refine_fixed: bool = False, refine_fn: Optional[Callable] = None) -> None:
        """Bounds of every perturbed node, in topological order: IBP, intersected with the state's
        fixed bounds; with ``refine`` the inputs of relaxed ops are tightened by CROWN before their
        consumers use them (with the α-CROWN slopes ``alphas[node]`` when given).  Nodes with fixed
        bounds are taken as given unless ``refine_fixed`` (then CROWN runs on them too and the
        result is intersected with the fixed bounds: branch and bound after a split).
        ``refine_fn(node, state)``, when given, refines a node instead of plain CROWN (α-CROWN's
        optimized, checkpointed intermediate bounds: `refine_rows`, `node_bounds`, `store_refined`)."""
        need = self.relaxed_input_names(state) if refine else set()
        for n in self._nodes:
            v = state.values.get(n.name)
            if v is None or not v.perturbed:
                continue
            v.set_interval(self._ibp_node(n, state))
            fixed = state.apply_fixed(n.name)
            if fixed and not refine_fixed:
                continue  # the caller's bounds (already at least as tight as it wants)
            if n.name in need and not self._ibp_is_exact(n, state):
                if refine_fn is not None:
                    refine_fn(n, state)
                else:
                    self._refine(n, state, alphas.get(n.name) if alphas else None)
                if fixed:
                    state.apply_fixed(n.name)

    def relaxed_input_names(self, state: BoundState) -> set[str]:
        """Nodes whose bounds the relaxation of a perturbed op reads."""
        need = set()
        for n in self._nodes:
            if n.op is not None and state.perturbed(n.name):
                need.update(n.relaxed_names)
        return need

    def refined_names(self, state: BoundState) -> list[str]:
        """Nodes whose bounds ``interval_pass(state, refine=True)`` computes by CROWN (the inputs
        of relaxed ops where IBP is not already exact), in topological order."""
        need = self.relaxed_input_names(state)
        return [n.name for n in self._nodes if n.name in need and state.perturbed(n.name)
                and not self._ibp_is_exact(n, state)]

    def optimizable_nodes(self, state: BoundState) -> list[BoundNode]:
        """Relaxed nodes with a free relaxation parameter (``op.alpha_range``) and at least one
        neuron where it is free, in topological order."""
        out = []
        for n in self._nodes:
            if n.op is None or n.op.alpha_range is None or not state.perturbed(n.name):
                continue
            args, kwargs = self.op_args(state, n.name)
            if bool(n.op.alpha_free(*args, **kwargs).any()):
                out.append(n)
        return out

    def op_args(self, state: BoundState, name: str) -> tuple:
        """(args, kwargs) of node ``name``'s op: `Value` objects of the state where the graph has
        nodes, constants elsewhere (what the op's methods receive)."""
        return self._args(self._by_name[name], state.values, raw=False)

    def _ibp_is_exact(self, n: BoundNode, state: BoundState) -> bool:
        """IBP is as tight as CROWN for an affine op fed directly by a box (``op.ibp_exact_on_box``
        and ``ptb.is_box``), and (as in auto_LiRPA) is used for the output of a monotone
        elementwise op, whose input bounds are already tight."""
        if n.op is None:
            return True
        if n.op.ibp_exact_on_box:
            src = n.arg_name(0)
            return src in state.ptbs and state.ptbs[src] is not None and state.ptbs[src].is_box
        return n.op.monotone_elementwise

    def _refine(self, n: BoundNode, state: BoundState, alphas: Optional[dict] = None) -> None:
        rows = self.refine_rows(n, state)
        if rows is not None and rows.numel() == 0:
            return
        v = state.values[n.name]
        all_rows = torch.arange(v.value[0].numel(), device=v.value.device) if rows is None else rows
        lb, ub = self.node_bounds(state, n.name, all_rows, alphas=alphas)
        self.store_refined(n, state, rows, lb, ub)

    def refine_rows(self, n: BoundNode, state: BoundState,
                    reference: Optional[tuple[Tensor, Tensor]] = None) -> Optional[Tensor]:
        """The flat neurons of node ``n`` whose CROWN bounds its consumers' relaxations need
        (``sparse_intermediate_bounds``), judged from its current bounds (intersected with
        ``reference`` = (lower, upper) when given); None: every neuron, an empty tensor: none."""
        if not self.bound_opts["sparse_intermediate_bounds"]:
            return None
        v = state.values[n.name]
        lo, up = v.lower, v.upper
        if reference is not None:
            lo, up = torch.maximum(lo, reference[0]), torch.minimum(up, reference[1])
        masks = []
        for c in self._consumers[n.name]:
            if c.op is None or not state.perturbed(c.name):
                continue
            if n.name in c.relaxed_names:
                masks.append(c.op.rows_to_refine(lo, up))
        if not masks or any(m is None for m in masks):
            return None
        rows = torch.stack(masks).any(0).nonzero().flatten()
        if rows.numel() > 0.9 * v.value[0].numel():  # nearly all: bound every neuron (auto_LiRPA's rule)
            return None
        return rows

    def store_refined(self, n: BoundNode, state: BoundState, rows: Optional[Tensor], lb: Tensor, ub: Tensor,
                      straight_through: bool = False) -> None:
        """Set node ``n``'s bounds at the flat neurons ``rows`` (None: all) to the CROWN bounds
        (lb, ub), each (B, len(rows)), intersected with its interval where configured
        (``straight_through``: the intersection's value with the CROWN bound's gradient, for
        α-CROWN, whose slopes would get no gradient where the interval is tighter)."""
        v = state.values[n.name]
        lb, ub = _unknown_is_infinite(lb, ub)
        # Both the interval and the CROWN bound hold: keep their intersection (CROWN can be
        # looser than IBP for some neurons, e.g. after a saturated sigmoid).
        lo, up = v.lower.flatten(1), v.upper.flatten(1)
        if rows is not None:
            lo, up = lo[:, rows], up[:, rows]
        if self.bound_opts["intersect_intermediate"] or any(
                c.op is not None and c.op.needs_domain for c in self._consumers[n.name]):
            if straight_through:
                lb = lb + (torch.maximum(lb, lo) - lb).detach()
                ub = ub + (torch.minimum(ub, up) - ub).detach()
            else:
                lb, ub = torch.maximum(lb, lo), torch.minimum(ub, up)
        if rows is None:
            v.lower, v.upper = lb.view_as(v.value), ub.view_as(v.value)
        else:
            lo, up = v.lower.flatten(1).clone(), v.upper.flatten(1).clone()
            lo[:, rows], up[:, rows] = lb, ub
            v.lower, v.upper = lo.view_as(v.value), up.view_as(v.value)

    def rows_per_chunk(self, state: BoundState, start: str) -> int:
        """Rows of a backward pass from node ``start`` per chunk, so that the dense coefficients of
        the widest node on the way fit ``memory_budget``."""
        v = state.values[start].value
        widest = max(math.prod(state.values[n.name].value.shape[1:]) for n in self._nodes[: self._index[start] + 1]
                     if state.perturbed(n.name))
        per_row = v.shape[0] * widest * v.element_size() * 4
        return max(1, int(self.bound_opts["memory_budget"] // per_row))

    def chunked_backward(self, state: BoundState, start: str, n_rows: int, rows_A0, lower: bool = True,
                         upper: bool = True, alphas: Optional[dict] = None, extra: Optional[dict] = None,
                         record: Optional[dict] = None):
        """CROWN bounds of ``n_rows`` linear functions of node ``start``, in chunks that fit the
        memory budget; ``rows_A0(i, j)`` gives the coefficients of rows i..j-1 (dense
        (B, rows, *shape) or `Patches`).  ``alphas``: α-CROWN slopes per relaxed node,
        (lower-side, upper-side) tensors with one row per row (or 1, shared).  ``extra`` and
        ``record``: see `backward` (per-row tensors are sliced per chunk, records concatenated)."""
        if n_rows == 0:  # a node without elements (e.g. a softmax over one entry has no pairs)
            ref = state.values[start].value
            empty = ref.new_zeros(ref.shape[0], 0)
            return (empty if lower else None), (empty if upper else None)
        step = self.rows_per_chunk(state, start)
        lbs, ubs = [], []
        parts: dict[str, list] = {k: [] for k in (record or {})}

        def rows(d, s, e):
            return None if d is None else {k: tuple(a if a is None or a.shape[1] == 1 else a[:, s:e] for a in pair)
                                           for k, pair in d.items()}

        for s in range(0, n_rows, step):
            e = min(s + step, n_rows)
            rec = None if record is None else {k: None for k in record}
            lb, ub = self.backward(state, start, rows_A0(s, e), lower, upper, rows(alphas, s, e),
                                   rows(extra, s, e), rec)
            lbs.append(lb)
            ubs.append(ub)
            for k in parts:
                parts[k].append(rec[k])
        if record is not None:
            for k, chunks in parts.items():
                if any(c is None for c in chunks):
                    record[k] = None
                    continue
                record[k] = tuple(None if chunks[0][i] is None else torch.cat([to_dense(c[i]) for c in chunks], 1)
                                  for i in range(2))
        return (torch.cat(lbs, 1) if lower else None), (torch.cat(ubs, 1) if upper else None)

    def node_bounds(self, state: BoundState, name: str, rows: Tensor, lower: bool = True, upper: bool = True,
                    alphas: Optional[dict] = None):
        """CROWN bounds (B, len(rows)) of the given flat neurons of node ``name``; the state must
        hold bounds for every relaxed node before it (`interval_pass`)."""
        v = state.values[name].value
        B, shape = v.shape[0], tuple(v.shape[1:])

        def identity(start, stop):
            r = rows[start:stop]
            if len(shape) == 3 and self.bound_opts["conv_mode"] == "patches":
                return Patches.identity(B, shape, r, v.dtype, v.device)
            A0 = torch.zeros(B, r.numel(), math.prod(shape), dtype=v.dtype, device=v.device)
            A0[:, torch.arange(r.numel(), device=v.device), r] = 1.0
            return A0.view(B, r.numel(), *shape)

        return self.chunked_backward(state, name, rows.numel(), identity, lower, upper, alphas)

    def backward(self, state: BoundState, start: str, A0: LinearA, lower: bool = True, upper: bool = True,
                 alphas: Optional[dict] = None, extra: Optional[dict] = None, record: Optional[dict] = None):
        """Propagate linear bounds A0 on node ``start`` back to the inputs and concretize them over
        the state's perturbations: (lb, ub), each (B, rows); relaxed nodes named in ``alphas`` use
        those lower-line slopes (α-CROWN) instead of their default.

        ``extra``: {node: (lower-side, upper-side)} dense coefficients (B, rows, *node_shape) added
        to the accumulated coefficients of that node before it is propagated further: Lagrangian
        terms of constraints on the node (β-CROWN's split constraints, Wang et al. 2021, eq. 5);
        the caller is responsible for their validity.  ``record``: {node: None}, filled in place
        with the (lower-side, upper-side) coefficients that reached each named node (input nodes:
        the final linear function of the input, e.g. to find the box corner minimising it)."""
        values = state.values
        acc: dict[str, list] = {start: [A0 if lower else None, A0 if upper else None]}
        ref = values[start].value
        zero = ref.new_zeros(ref.shape[0], A0.n_rows if isinstance(A0, Patches) else A0.shape[1])
        lb, ub = zero, zero
        dense = self.bound_opts["conv_mode"] == "matrix"
        for n in reversed(self._nodes[: self._index[start] + 1]):
            entry = acc.pop(n.name, None)
            if extra is not None and n.name in extra:
                la, ua = entry if entry is not None else (None, None)
                el, eu = extra[n.name]
                if lower and el is not None:
                    la = el if la is None else to_dense(la) + el
                if upper and eu is not None:
                    ua = eu if ua is None else to_dense(ua) + eu
                entry = None if la is None and ua is None else (la, ua)
            if entry is None:
                continue
            la, ua = entry
            if record is not None and n.name in record:
                record[n.name] = (la, ua)
            if n.kind == "placeholder":
                ptb, x0 = state.ptbs[n.name], values[n.name].value
                if la is not None:
                    lb = lb + ptb.concretize(x0, la, -1)
                if ua is not None:
                    ub = ub + ptb.concretize(x0, ua, +1)
                continue
            if not n.op.supports_patches or dense:
                same = la is ua
                la = to_dense(la) if la is not None else None
                ua = la if same else (to_dense(ua) if ua is not None else None)
            args, kwargs = self._args(n, values, raw=False)
            alpha = alphas.get(n.name) if alphas else None
            if alpha is not None:
                res, lbias, ubias = n.op.backward_alpha(la, ua, alpha, *args, **kwargs)
            else:
                res, lbias, ubias = n.op.backward(la, ua, *args, **kwargs)
            lb = lb + lbias
            ub = ub + ubias
            for inp, la_i, ua_i in res:
                if not inp.perturbed:
                    continue
                shared = la_i is ua_i
                la_i = self._compact(la_i)
                ua_i = la_i if shared else self._compact(ua_i)
                cur = acc.get(inp.name)
                if cur is None:
                    acc[inp.name] = [la_i, ua_i]
                elif shared and cur[0] is cur[1]:
                    cur[0] = cur[1] = _add(cur[0], la_i)
                else:
                    cur[0], cur[1] = _add(cur[0], la_i), _add(cur[1], ua_i)
        return lb, ub

    @staticmethod
    def _compact(A: Optional[LinearA]) -> Optional[LinearA]:
        """Patches whose window covers the whole node are cheaper as dense coefficients."""
        if isinstance(A, Patches):
            kh, kw = A.kernel
            if kh * kw >= A.shape[1] * A.shape[2]:
                return A.to_dense()
        return A

    def spec_matrix(self, state: BoundState, C: Optional[Tensor]) -> Tensor:
        """The specification rows (B, n_spec, n_out); the identity when C is None."""
        if C is not None:
            return C
        out = state.values[self._final_name].value
        n_out = math.prod(self._output_shape)
        return torch.eye(n_out, dtype=out.dtype, device=out.device).expand(out.shape[0], n_out, n_out)

    def output_bounds(self, state: BoundState, C: Optional[Tensor], lower: bool = True, upper: bool = True,
                      alphas: Optional[dict] = None, extra: Optional[dict] = None, record: Optional[dict] = None):
        """CROWN bounds (B, n_spec) of ``C @ output`` (the identity when C is None); ``extra`` and
        ``record`` as in `backward`."""
        C = self.spec_matrix(state, C)
        B = C.shape[0]
        lb, ub = self.chunked_backward(
            state, self._final_name, C.shape[1],
            lambda start, stop: C[:, start:stop].reshape(B, -1, *self._output_shape), lower, upper, alphas,
            extra, record)
        if lb is not None:
            lb = _unknown_is_infinite(lb, lb)[0]
        if ub is not None:
            ub = _unknown_is_infinite(ub, ub)[1]
        return lb, ub

    def ibp_output_bounds(self, state: BoundState, C: Optional[Tensor]):
        """IBP bounds of ``C @ output``: C folded into the last op where it can (``op.ibp_spec``),
        else applied to the output's interval."""
        final = state.values[self._final_name]
        if C is None:
            return final.lower, final.upper
        node = self._by_name[self._final_name]
        if node.op is not None:
            args, kwargs = self._args(node, state.values, raw=False)
            folded = node.op.ibp_spec(C, *args, **kwargs)
            if folded is not None:
                return folded
        c, r = (t.flatten(1) for t in final.center_radius)
        c = torch.bmm(C, c.unsqueeze(-1)).squeeze(-1)
        r = torch.bmm(C.abs(), r.unsqueeze(-1)).squeeze(-1)
        return c - r, c + r

    # ---------------------------------------------------------------- bounds
    def compute_bounds(self, x: Union[Tensor, Sequence[Tensor], None] = None, C: Optional[Tensor] = None,
                       method: Union[str, BoundMethod, None] = "CROWN", IBP: bool = False, forward: bool = False,
                       bound_lower: bool = True, bound_upper: bool = True, keep_intermediate: bool = False,
                       optimize_bound_args: Optional[dict] = None,
                       intermediate_bounds: Optional[Mapping[str, tuple[Tensor, Tensor]]] = None,
                       return_state: bool = False):
        """Lower and upper bounds of ``C @ model(x)`` (or of the outputs) over the perturbation.

        Returns (lb, ub), each (batch, n_spec) with C, else (batch, *output_shape); a side not
        asked for is None.  ``method``: a name (`certtrain.bounds.methods`) or a method object
        such as ``AlphaCROWN(iteration=50)``.  ``keep_intermediate=True`` keeps every node's
        bounds of this call for `save_intermediate` (differentiable; off by default so training
        holds no extra memory).  ``optimize_bound_args`` overrides the α-CROWN options.
        ``intermediate_bounds``: {node: (lower, upper)} that hold over the set (see `prepare`).
        ``return_state=True`` returns (lb, ub, state), the `BoundState` with every node's bounds.
        """
        if x is None:
            raise ValueError("compute_bounds needs x=(BoundedTensor(...),)")
        if forward:
            raise NotImplementedError("forward-mode LiRPA is not implemented yet; use method='CROWN'")
        if method is None:
            if not IBP:
                raise ValueError("compute_bounds needs a method: 'IBP', 'CROWN', 'CROWN-IBP' or 'alpha-CROWN'")
            method = "IBP"
        m = get_method(method)
        name = "CROWN-IBP" if (IBP and m.name == "CROWN") else m.name
        alpha_opts = None
        if name == "alpha-CROWN":
            base = check_alpha_opts(m.options() if isinstance(method, BoundMethod) else None,
                                    self.bound_opts["optimize_bound_args"])
            alpha_opts = check_alpha_opts(optimize_bound_args, base)
        elif optimize_bound_args:
            raise ValueError(f"optimize_bound_args is for method 'alpha-CROWN', not {name!r}")
        if name == "IBP" and not intermediate_bounds and not return_state:
            # No clean pass where none is needed; compiled program (certtrain.bounds.ibp_program).
            inputs, ptbs = self.check_inputs(x)
            C_ = self.check_spec(C, inputs[0].shape[0], inputs[0])
            fast = ibp_program_bounds(self, inputs, ptbs, C_, keep_intermediate)
            if fast is not None:
                lb, ub, kept = fast
                self._last = kept
                return (lb if bound_lower else None), (ub if bound_upper else None)
        state = self.prepare(x, intermediate_bounds)
        ref = state.values[self._placeholders[0].name].value
        C = self.check_spec(C, ref.shape[0], ref)
        final = state.values[self._final_name]
        if not final.perturbed:
            out = final.value.flatten(1)
            out = torch.bmm(C, out.unsqueeze(-1)).squeeze(-1) if C is not None else final.value
            res = (out if bound_lower else None), (out if bound_upper else None)
            return (*res, state) if return_state else res
        crown = get_method(name).intermediate == "crown"
        if crown and torch.is_grad_enabled() and not self._warned_grad:
            self._warned_grad = True
            warnings.warn("CROWN with gradients enabled: autograd keeps every intermediate coefficient "
                          "matrix, so memory_budget cannot bound memory. For verification, call "
                          "compute_bounds under torch.no_grad().", stacklevel=2)
        self.interval_pass(state, refine=crown)
        self._last = state if keep_intermediate else None
        if name == "IBP":
            lb, ub = self.ibp_output_bounds(state, C)
        elif name == "alpha-CROWN":
            lb, ub = optimized_bounds(self, state, C, bound_lower, bound_upper, alpha_opts)
        else:
            lb, ub = self.output_bounds(state, C, bound_lower, bound_upper)
        res = (lb if bound_lower else None), (ub if bound_upper else None)
        return (*res, state) if return_state else res
