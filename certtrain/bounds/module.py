"""BoundedModule: bounds of a traced model's outputs over a perturbation of its inputs.

The graph walk lives here; the maths of each op lives in `certtrain.bounds.ops`.

* IBP (Gowal et al. 2018): intervals propagated forward through every node.
* CROWN (Zhang et al. 2018): linear bounds propagated backward from the output to the inputs,
  then concretized over the perturbation set.  Every input of a relaxed op (ReLU, ...) needs
  bounds first; they are computed in topological order, by CROWN too, for the neurons whose
  relaxation they change (the unstable ones, judged by IBP from the already tightened inputs, as
  auto_LiRPA does with its "sparse intermediate bounds").
* CROWN-IBP (Zhang et al. 2020): IBP for every intermediate node, CROWN for the output.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, fx, nn

from .alpha_crown import DEFAULT_ALPHA_OPTS, check_alpha_opts, optimized_bounds
from .ibp_program import IBP_PROGRAM_OPTS, ibp_program_bounds
from .functionalize import call_module_safely
from .graph import BoundNode, attach_op, build_nodes, fetch_attr, is_shape_query, trace
from .ops.base import Value
from .ops.registry import UnsupportedOperation, source_line
from .ops.linear import BoundLinear
from .ops.conv import BoundConv2d
from .patches import LinearA, Patches, to_dense
from .perturbations import Perturbation, PerturbationLpNorm
from .tensor import BoundedTensor

_METHODS = {
    "ibp": "IBP",
    "crown": "CROWN", "backward": "CROWN",
    "crown-ibp": "CROWN-IBP", "crown_ibp": "CROWN-IBP", "ibp+backward": "CROWN-IBP",
    "crownibp": "CROWN-IBP",
    "alpha-crown": "alpha-CROWN", "alpha_crown": "alpha-CROWN", "alphacrown": "alpha-CROWN",
    "crown-optimized": "alpha-CROWN", "crown_optimized": "alpha-CROWN", "α-crown": "alpha-CROWN",
}
_FUTURE = {"forward", "forward+backward", "dynamic-forward"}

DEFAULT_OPTS = {
    "relu": "adaptive",           # lower slope of unstable ReLUs: adaptive | same-slope | zero
    "conv_mode": "patches",       # patches | matrix (dense), for CROWN through convolutions
    "memory_budget": 1 << 30,     # bytes of CROWN coefficients per chunk of rows
    "sparse_intermediate_bounds": True,  # CROWN only for neurons whose relaxation they change
    "intersect_intermediate": True,  # intermediate bounds: CROWN ∩ IBP (False: CROWN alone, as auto_LiRPA)
    "optimize_bound_args": dict(DEFAULT_ALPHA_OPTS),  # alpha-CROWN (see certtrain.bounds.alpha_crown)
    **IBP_PROGRAM_OPTS,           # fast IBP paths: ibp_skip_clean, ibp_compile, ... (certtrain.bounds.ibp_program)
}
_OPT_ALIASES = {"activation_bound_option": "relu"}
_RELU_ALIASES = {"zero-lb": "zero"}


def _resolve_method(method: Optional[str], IBP: bool, forward: bool) -> str:
    if forward:
        raise NotImplementedError("forward-mode LiRPA is not implemented yet; use method='CROWN'")
    if method is None:
        if IBP:
            return "IBP"
        raise ValueError("compute_bounds needs a method: 'IBP', 'CROWN', 'CROWN-IBP' or 'alpha-CROWN'")
    key = method.lower().replace(" ", "")
    if key in _FUTURE:
        raise NotImplementedError(f"method {method!r} is not implemented yet; use 'IBP', 'CROWN', "
                                  "'CROWN-IBP' or 'alpha-CROWN'")
    if key not in _METHODS:
        raise ValueError(f"unknown method {method!r}: use 'IBP', 'CROWN' (alias 'backward'), "
                         "'CROWN-IBP' (alias 'IBP+backward') or 'alpha-CROWN' (alias 'CROWN-Optimized')")
    m = _METHODS[key]
    return "CROWN-IBP" if (IBP and m == "CROWN") else m


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


class BoundedModule(nn.Module):
    """Wrap ``model`` so that ``compute_bounds`` gives guaranteed output bounds.

    ``global_input`` is an example input (a tensor or tuple of tensors) used to trace and check
    the model; any batch size works afterwards.  ``bound_opts`` overrides `DEFAULT_OPTS`.
    """

    def __init__(self, model: nn.Module, global_input: Union[Tensor, Sequence[Tensor]],
                 bound_opts: Optional[dict] = None, device: Any = None, verbose: bool = False):
        super().__init__()
        self.model = model
        opts = dict(DEFAULT_OPTS)
        for k, v in (bound_opts or {}).items():
            k = _OPT_ALIASES.get(k, k)
            if k in opts:
                opts[k] = _RELU_ALIASES.get(v, v) if k == "relu" else v
        if opts["relu"] not in ("adaptive", "same-slope", "zero"):
            raise ValueError(f"bound_opts relu={opts['relu']!r}: use 'adaptive', 'same-slope' or 'zero'")
        if opts["conv_mode"] not in ("patches", "matrix"):
            raise ValueError(f"bound_opts conv_mode={opts['conv_mode']!r}: use 'patches' or 'matrix'")
        opts["optimize_bound_args"] = check_alpha_opts(opts["optimize_bound_args"])
        self.bound_opts = opts
        gm = trace(model)
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
        example = self._as_inputs(global_input)
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
                  and not is_shape_query(n)):
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
        self._kept: Optional[dict[str, Value]] = None

    # ---------------------------------------------------------------- graph facts
    @property
    def input_names(self) -> list[str]:
        """Names of the graph's input nodes, in the order of the model's arguments."""
        return [n.name for n in self._placeholders]

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
        if self._kept is None:
            raise RuntimeError("no intermediate bounds kept: call compute_bounds(..., keep_intermediate=True) first")
        return {n.name: (self._kept[n.name].lower, self._kept[n.name].upper) for n in self._nodes
                if n.name in self._kept and self._kept[n.name].perturbed and n.kind != "output"}

    # ---------------------------------------------------------------- forward
    def forward(self, *x: Tensor) -> Tensor:
        """The model's plain output.  The node values are kept, so that a following
        ``compute_bounds`` on the same inputs (and unchanged parameters) reuses this forward pass
        instead of running the model again (certified training needs both)."""
        inputs = [t.as_subclass(Tensor) if isinstance(t, BoundedTensor) else t for t in x]
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

    def _cached_values(self, inputs: list[Tensor], perturbed: list[bool]) -> Optional[dict[str, Value]]:
        cache, self._cache = self._cache, None  # a cache serves one compute_bounds call
        if cache is None or cache[0] != self._cache_key(inputs):
            return None
        values = cache[1]
        for n in self._nodes:  # re-mark which nodes depend on the perturbed inputs
            v = values.get(n.name)
            if v is None:
                continue
            if n.kind == "placeholder":
                v.perturbed = perturbed[self._placeholders.index(n)]
            elif n.kind != "get_attr":
                v.perturbed = _carries_tensor(v.value) and any(values[i].perturbed for i in n.inputs)
            v.lower = v.upper = v.ball = None
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
            # needs a bound rule; only non-tensor values (sizes, shapes) are safe as constants.
            pert = _carries_tensor(v) and any(values[i].perturbed for i in n.inputs)
            values[n.name] = Value(n.name, v, pert)
        return values

    # ---------------------------------------------------------------- checks
    def _check_inputs(self, x) -> tuple[list[Tensor], list[Optional[Perturbation]]]:
        xs = self._as_inputs(x)
        if len(xs) != len(self._placeholders):
            raise ValueError(f"the model takes {len(self._placeholders)} input(s), got {len(xs)}")
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
                ptb.validate(t)
            plain.append(t)
            ptbs.append(ptb)
        return plain, ptbs

    def _check_C(self, C: Optional[Tensor], batch: int, ref: Tensor) -> Optional[Tensor]:
        if C is None:
            return None
        n_out = math.prod(self._output_shape)
        if not isinstance(C, Tensor) or C.dim() != 3 or C.shape[0] not in (1, batch) or C.shape[2] != n_out:
            shape = tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__
            raise ValueError(f"C must have shape (batch={batch}, n_spec, n_out={n_out}), got {shape}")
        if not torch.isfinite(C).all():
            raise ValueError("C contains NaN or inf")
        return C.to(ref.dtype).expand(batch, *C.shape[1:])

    # ---------------------------------------------------------------- bounds
    def compute_bounds(self, x: Union[Tensor, Sequence[Tensor], None] = None, C: Optional[Tensor] = None,
                       method: Optional[str] = "CROWN", IBP: bool = False, forward: bool = False,
                       bound_lower: bool = True, bound_upper: bool = True,
                       keep_intermediate: bool = False, optimize_bound_args: Optional[dict] = None, **unused
                       ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Lower and upper bounds of ``C @ model(x)`` (or of the outputs) over the perturbation.

        Returns (lb, ub), each (batch, n_spec) with C, else (batch, *output_shape); a side not
        asked for is None.  ``keep_intermediate=True`` keeps every node's bounds of this call for
        `save_intermediate` (differentiable; off by default so training holds no extra memory).
        ``optimize_bound_args`` overrides ``bound_opts["optimize_bound_args"]`` for method
        "alpha-CROWN" (see `certtrain.bounds.alpha_crown`).
        """
        if x is None:
            raise ValueError("compute_bounds needs x=(BoundedTensor(...),)")
        method = _resolve_method(method, IBP, forward)
        alpha_opts = check_alpha_opts(optimize_bound_args, self.bound_opts["optimize_bound_args"]) \
            if method == "alpha-CROWN" else None
        inputs, ptbs = self._check_inputs(x)
        batch = inputs[0].shape[0]
        C = self._check_C(C, batch, inputs[0])
        if method == "IBP":  # no clean pass where none is needed; compiled program (ibp_program)
            fast = ibp_program_bounds(self, inputs, ptbs, C, bound_lower, bound_upper, keep_intermediate)
            if fast is not None:
                return fast
        perturbed = [p is not None for p in ptbs]
        values = self._cached_values(inputs, perturbed)
        if values is None:
            values = self._run(inputs, perturbed)
        self._ptbs = {n.name: p for n, p in zip(self._placeholders, ptbs)}
        final = values[self._final_name]
        if not final.perturbed:
            out = final.value.flatten(1)
            out = torch.bmm(C, out.unsqueeze(-1)).squeeze(-1) if C is not None else final.value
            return (out if bound_lower else None), (out if bound_upper else None)
        if method in ("CROWN", "alpha-CROWN") and torch.is_grad_enabled() and not self._warned_grad:
            self._warned_grad = True
            warnings.warn("CROWN with gradients enabled: autograd keeps every intermediate coefficient "
                          "matrix, so memory_budget cannot bound memory. For verification, call "
                          "compute_bounds under torch.no_grad().", stacklevel=2)
        self._intervals(values, refine=(method in ("CROWN", "alpha-CROWN")))
        self._kept = values if keep_intermediate else None
        if method == "IBP":
            lb, ub = self._ibp_output(final, C, values)
        elif method == "alpha-CROWN":
            lb, ub = optimized_bounds(self, values, final, C, bound_lower, bound_upper, alpha_opts)
        else:
            lb, ub = self._crown_output(final, C, values, bound_lower, bound_upper)
        return (lb if bound_lower else None), (ub if bound_upper else None)

    def _ibp_node(self, n: BoundNode, values: dict[str, Value]):
        v = values[n.name]
        if n.kind == "placeholder":
            v.ball = self._ptbs[n.name].ball(v.value)
            return self._ptbs[n.name].interval(v.value)
        args, kwargs = self._args(n, values, raw=False)
        v.ball = n.op.ibp_ball(*args, **kwargs)
        return n.op.ibp(*args, **kwargs)

    def _intervals(self, values: dict[str, Value], refine: bool, alphas: Optional[dict] = None) -> None:
        """Interval bounds of every perturbed node, in topological order; with ``refine`` the inputs
        of relaxed ops are tightened by CROWN before their consumers use them (with the α-CROWN
        slopes ``alphas[node]`` when given)."""
        need = self._needs_bounds(values) if refine else set()
        for n in self._nodes:
            v = values.get(n.name)
            if v is None or not v.perturbed:
                continue
            v.set_interval(self._ibp_node(n, values))
            if n.name in need and not self._ibp_is_exact(n, values):
                self._refine(n, values, alphas.get(n.name) if alphas else None)

    def _needs_bounds(self, values) -> set[str]:
        need = set()
        for n in self._nodes:
            if n.op is not None and values.get(n.name) is not None and values[n.name].perturbed:
                need.update(n.relaxed_names)
        return need

    def _ibp_is_exact(self, n: BoundNode, values) -> bool:
        """IBP is as tight as CROWN for a linear layer fed directly by a box, and (as in auto_LiRPA)
        is used for the output of a monotone elementwise op, whose input bounds are already tight."""
        if n.op is None:
            return True
        if isinstance(n.op, (BoundLinear, BoundConv2d)):
            src = self._by_name[n.arg_name(0) or n.inputs[0]]
            return src.kind == "placeholder" and isinstance(self._ptbs[src.name], PerturbationLpNorm) \
                and self._ptbs[src.name].norm == math.inf
        return getattr(n.op, "relaxed_inputs", ()) == (0,) and hasattr(n.op, "relax")

    def _refine(self, n: BoundNode, values: dict[str, Value], alphas: Optional[dict] = None) -> None:
        v = values[n.name]
        shape = v.value.shape[1:]
        numel = math.prod(shape)
        rows = None  # None: every neuron
        if self.bound_opts["sparse_intermediate_bounds"]:
            masks = []
            for c in self._consumers[n.name]:
                if c.op is None or not values[c.name].perturbed:
                    continue
                if n.name in c.relaxed_names:
                    masks.append(c.op.rows_to_refine(v.lower, v.upper))
            if masks and all(m is not None for m in masks):
                rows = torch.stack(masks).any(0).nonzero().flatten()
                if rows.numel() == 0:
                    return
                if rows.numel() > 0.9 * numel:  # nearly all: bound every neuron (auto_LiRPA's rule)
                    rows = None
        all_rows = torch.arange(numel, device=v.value.device) if rows is None else rows
        lb, ub = self._backward_rows(n, all_rows, values, alphas=alphas)
        # Both the interval and the CROWN bound hold: keep their intersection (CROWN can be
        # looser than IBP for some neurons, e.g. after a saturated sigmoid).
        lo, up = v.lower.flatten(1), v.upper.flatten(1)
        if rows is not None:
            lo, up = lo[:, rows], up[:, rows]
        if self.bound_opts["intersect_intermediate"]:
            lb, ub = torch.maximum(lb, lo), torch.minimum(ub, up)
        if rows is None:
            v.lower, v.upper = lb.view_as(v.value), ub.view_as(v.value)
        else:
            lo, up = v.lower.flatten(1).clone(), v.upper.flatten(1).clone()
            lo[:, rows], up[:, rows] = lb, ub
            v.lower, v.upper = lo.view_as(v.value), up.view_as(v.value)

    def _chunk_rows(self, start: BoundNode, values, batch: int, itemsize: int) -> int:
        """Rows per chunk so that the dense coefficients of the widest node fit the budget."""
        widest = max(math.prod(values[n.name].value.shape[1:]) for n in self._nodes[: self._index[start.name] + 1]
                     if n.name in values and values[n.name].perturbed)
        per_row = batch * widest * itemsize * 4
        return max(1, int(self.bound_opts["memory_budget"] // per_row))

    def _chunked_backward(self, n: BoundNode, n_rows: int, rows_A0, values, lower: bool, upper: bool,
                          alphas: Optional[dict] = None):
        """CROWN bounds of ``n_rows`` rows on node n, in chunks that fit the memory budget;
        ``rows_A0(start, stop)`` gives the coefficients of rows start..stop-1.  ``alphas``: α-CROWN
        slopes per relaxed node, (lower-side, upper-side) tensors with one row per row of n (or 1)."""
        v = values[n.name].value
        step = self._chunk_rows(n, values, v.shape[0], v.element_size())
        lbs, ubs = [], []
        for s in range(0, n_rows, step):
            e = min(s + step, n_rows)
            chunk = None
            if alphas:
                chunk = {k: tuple(a if a is None or a.shape[1] == 1 else a[:, s:e] for a in pair)
                         for k, pair in alphas.items()}
            lb, ub = self._backward(n, rows_A0(s, e), values, lower, upper, chunk)
            lbs.append(lb)
            ubs.append(ub)
        return (torch.cat(lbs, 1) if lower else None), (torch.cat(ubs, 1) if upper else None)

    def _backward_rows(self, n: BoundNode, rows: Tensor, values, lower=True, upper=True, alphas=None):
        """CROWN bounds of the given flat neurons of node n (identity rows)."""
        v = values[n.name].value
        B, shape = v.shape[0], tuple(v.shape[1:])

        def identity(start, stop):
            r = rows[start:stop]
            if len(shape) == 3 and self.bound_opts["conv_mode"] == "patches":
                return Patches.identity(B, shape, r, v.dtype, v.device)
            A0 = torch.zeros(B, r.numel(), math.prod(shape), dtype=v.dtype, device=v.device)
            A0[:, torch.arange(r.numel(), device=v.device), r] = 1.0
            return A0.view(B, r.numel(), *shape)

        return self._chunked_backward(n, rows.numel(), identity, values, lower, upper, alphas)

    def _backward(self, start: BoundNode, A0: LinearA, values: dict[str, Value], lower: bool, upper: bool,
                  alphas: Optional[dict] = None):
        """Propagate linear bounds A0 on ``start`` back to the inputs and concretize them; relaxed
        nodes named in ``alphas`` use those lower-line slopes (α-CROWN) instead of their default."""
        acc: dict[str, list] = {start.name: [A0 if lower else None, A0 if upper else None]}
        ref = values[start.name].value
        zero = ref.new_zeros(ref.shape[0], A0.n_rows if isinstance(A0, Patches) else A0.shape[1])
        lb, ub = zero, zero
        dense = self.bound_opts["conv_mode"] == "matrix"
        for n in reversed(self._nodes[: self._index[start.name] + 1]):
            entry = acc.pop(n.name, None)
            if entry is None:
                continue
            la, ua = entry
            if n.kind == "placeholder":
                ptb, x0 = self._ptbs[n.name], values[n.name].value
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

    def _spec(self, final: Value, C: Optional[Tensor]) -> Tensor:
        """The specification rows (B, n_spec, n_out); the identity when C is None."""
        if C is not None:
            return C
        out = final.value
        n_out = math.prod(self._output_shape)
        return torch.eye(n_out, dtype=out.dtype, device=out.device).expand(out.shape[0], n_out, n_out)

    def _crown_output(self, final: Value, C: Optional[Tensor], values, lower: bool, upper: bool,
                      alphas: Optional[dict] = None):
        C = self._spec(final, C)
        B = C.shape[0]
        return self._chunked_backward(
            self._by_name[final.name], C.shape[1],
            lambda start, stop: C[:, start:stop].reshape(B, -1, *self._output_shape), values, lower, upper,
            alphas)

    def _ibp_output(self, final: Value, C: Optional[Tensor], values: dict[str, Value]):
        if C is None:
            return final.lower, final.upper
        node = self._by_name[final.name]
        if isinstance(node.op, BoundLinear):
            args, kwargs = self._args(node, values, raw=False)
            folded = node.op.ibp_spec(C, *args, **kwargs)
            if folded is not None:
                return folded
        c, r = (t.flatten(1) for t in final.center_radius)
        c = torch.bmm(C, c.unsqueeze(-1)).squeeze(-1)
        r = torch.bmm(C.abs(), r.unsqueeze(-1)).squeeze(-1)
        return c - r, c + r
