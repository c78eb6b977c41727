"""The contract between the graph walk and a bound rule.

A bound rule is one `BoundOp` subclass: `ibp` maps input intervals to an output interval, and
`backward` maps linear bounds on its output (CROWN's ``A`` matrices) to linear bounds on its
inputs plus a constant term.  The graph walk (`certtrain.bounds.bounded_module`) never looks inside.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor, fx, nn

from ..patches import LinearA, Patches

Interval = tuple[Tensor, Tensor]


class CenterRadius(tuple):
    """An interval given as (centre, radius): linear ops produce and consume this form, so that
    chains of them (conv -> BN -> conv) skip the conversions to and from (lower, upper)."""

    __slots__ = ()

    def __new__(cls, center: Tensor, radius: Tensor):
        return super().__new__(cls, (center, radius))


class Value:
    """A graph node's state in one bound computation: its clean value and, if it depends on a
    perturbed input, its interval bounds (kept as lower/upper or centre/radius, converted lazily)."""

    __slots__ = ("name", "value", "perturbed", "_lower", "_upper", "_center", "_radius", "image")

    def __init__(self, name: str, value: Any, perturbed: bool = False):
        self.name, self.value, self.perturbed = name, value, perturbed
        self._lower = self._upper = self._center = self._radius = None
        # The perturbation set as it reaches this node (`certtrain.bounds.set_image`), kept through
        # ops that keep its form so that the next Linear / Conv bounds it exactly (e.g. the dual norm
        # of an Lp ball, auto_LiRPA's IBP); None: the interval is all there is.
        self.image = None

    @property
    def lower(self) -> Optional[Tensor]:
        if self._lower is None and self._center is not None:
            self._lower = self._center - self._radius
        return self._lower

    @lower.setter
    def lower(self, t: Optional[Tensor]) -> None:
        self._lower, self._center, self._radius = t, None, None

    @property
    def upper(self) -> Optional[Tensor]:
        if self._upper is None and self._center is not None:
            self._upper = self._center + self._radius
        return self._upper

    @upper.setter
    def upper(self, t: Optional[Tensor]) -> None:
        self._upper, self._center, self._radius = t, None, None

    def set_interval(self, interval) -> None:
        """Store an op's IBP result: a CenterRadius or a (lower, upper) pair."""
        if isinstance(interval, CenterRadius):
            self._lower = self._upper = None
            self._center, self._radius = interval
        else:
            self._center = self._radius = None
            self._lower, self._upper = interval

    @property
    def bounds(self) -> Interval:
        return (self.lower, self.upper) if self.perturbed else (self.value, self.value)

    def scaled_center_radius(self) -> tuple[Tensor, Tensor, float]:
        """(s, d, f) with centre = f·s and radius = f·d: from (lower, upper) this is (u + l, u - l, 0.5),
        which saves the two halvings when the consumer is linear and can fold f into its weights
        (exact: scaling by 0.5 commutes with rounding)."""
        if self._center is None and self.perturbed and self._lower is not None:
            return self._upper + self._lower, self._upper - self._lower, 0.5
        c, r = self.center_radius
        return c, r, 1.0

    @property
    def center_radius(self) -> tuple[Tensor, Tensor]:
        if self._center is None:
            l, u = self.bounds
            self._center, self._radius = (u + l) * 0.5, (u - l) * 0.5
        return self._center, self._radius


def const(v: Any) -> Any:
    """The clean value of an argument (a `Value` or a plain Python constant)."""
    return v.value if isinstance(v, Value) else v


def is_perturbed(v: Any) -> bool:
    return isinstance(v, Value) and v.perturbed


# One side of a backward result: (input Value, lA or None, uA or None).
InputA = tuple[Value, Optional[LinearA], Optional[LinearA]]


class BoundOp:
    """Bound rule of one operation.

    Subclasses set ``targets`` (nn.Module classes, functions, or method names as ``"method:name"``)
    and are registered with `register_op`.  ``args``/``kwargs`` hold `Value` objects where the fx
    node had graph inputs, and plain constants elsewhere.
    """

    targets: ClassVar[Sequence[Any]] = ()
    supports_patches: ClassVar[bool] = False  # if False the walk hands backward() dense coefficients only
    #: Argument positions whose interval bounds `backward` needs (the relaxation's l, u).
    relaxed_inputs: ClassVar[tuple[int, ...]] = ()
    #: IBP is exact for this op when its input is a box (an affine map of a box input: CROWN
    #: cannot tighten it, so the walk skips refining it).
    ibp_exact_on_box: ClassVar[bool] = False
    #: Monotone elementwise op: IBP from tight input bounds is tight (the walk skips refining it).
    monotone_elementwise: ClassVar[bool] = False
    #: The rule has a domain (reciprocal, log, sqrt ...): its input's CROWN bounds are always
    #: intersected with IBP's (both hold), whatever ``intersect_intermediate`` says, so that a loose
    #: linear bound never leaves a domain the interval proves.
    needs_domain: ClassVar[bool] = False
    #: Range of the free parameter of the relaxation (α-CROWN's α), or None when it has none.
    #: The parameter has a shape of its own per example (``alpha_start``'s, e.g. the node's shape,
    #: (2, *node) for two tangent points, (*node, K) for window weights); every value in this box
    #: must give sound lines (α-CROWN and branch and bound only clamp onto it).
    alpha_range: ClassVar[Optional[tuple[float, float]]] = None
    #: For the IBP program (`certtrain.bounds.ibp_program`): where perturbed values may appear —
    #: "unary" (argument 0), "binary" (arguments 0 and 1) or "list" (the tensors of argument 0) —
    #: given that ``ibp``/``ibp_image``/``ibp_spec`` read nothing of a perturbed input's clean value
    #: but its shape, dtype and device (`ibp_reads_batch` says when they do).  None: not declared,
    #: the program does not serve graphs with this op (the reference path does, always right).
    ibp_operands: ClassVar[Optional[str]] = None

    def __init__(self, node: fx.Node, module: Optional[nn.Module], opts: dict):
        self.node, self.module, self.opts = node, module, opts

    def ibp(self, *args, **kwargs) -> Interval:
        raise NotImplementedError

    def ibp_image(self, *args, **kwargs):
        """For ops that keep the perturbation set's form (`certtrain.bounds.set_image`): the set's
        image at the output, else None."""
        return None

    def apply(self, first: Tensor, *args, **kwargs) -> Tensor:
        """Run the original op with ``first`` in place of its first input (constants elsewhere)."""
        args = [const(a) for a in args]
        kwargs = {k: const(v) for k, v in kwargs.items()}
        if self.module is not None:
            from ..functionalize import call_module_safely
            return call_module_safely(self.module, (first, *args), kwargs)
        if self.node.op == "call_method":
            return getattr(first, self.node.target)(*args, **kwargs)
        return self.node.target(first, *args, **kwargs)

    def backward(self, lA: Optional[LinearA], uA: Optional[LinearA], *args, **kwargs
                 ) -> tuple[list[InputA], Any, Any]:
        """Return ([(input, lA_in, uA_in), ...], lower bias, upper bias); biases are (B, N) or 0."""
        raise NotImplementedError

    def rows_to_refine(self, lower: Tensor, upper: Tensor) -> Optional[Tensor]:
        """Mask (per flat neuron, any example) of relaxed-input neurons whose bounds matter;
        None means all of them."""
        return None

    def ibp_spec(self, C: Tensor, *args, **kwargs) -> Optional[Interval]:
        """IBP bounds of ``C @ output`` with C folded into this op (tighter than applying C to the
        output interval), or None where the op cannot fold it."""
        return None

    def ibp_reads_batch(self) -> bool:
        """Whether ``ibp`` now reads its input's clean *values* (BatchNorm with batch statistics):
        the IBP program then supplies them (see ``ibp_operands``)."""
        return False

    def unstable(self, l: Tensor, u: Tensor) -> Tensor:
        """Neurons where the relaxation's free parameter matters (α-CROWN's variables)."""
        return (l < 0) & (u > 0)

    def alpha_init(self, l: Tensor, u: Tensor) -> Tensor:
        """The free parameter that plain CROWN uses (α-CROWN's starting point)."""
        raise NotImplementedError(f"{type(self).__name__} has no free relaxation parameter")

    def _relaxed_value(self, args) -> "Value":
        return args[self.relaxed_inputs[0]]

    def alpha_free(self, *args, **kwargs) -> Tensor:
        """(B, *parameter shape) mask (or one that broadcasts to it) of where the free parameter
        matters, from the op's arguments (default: `unstable` on the bounds of its first relaxed
        input)."""
        return self.unstable(*self._relaxed_value(args).bounds)

    def alpha_start(self, *args, **kwargs) -> Tensor:
        """(B, *parameter shape) starting α, CROWN's own parameter, from the op's arguments
        (default: `alpha_init` on the bounds of its first relaxed input, parameter shape = output
        shape)."""
        return self.alpha_init(*self._relaxed_value(args).bounds)

    def backward_alpha(self, lA: Optional[LinearA], uA: Optional[LinearA], alpha, *args, **kwargs):
        """`backward` with the free parameters ``alpha`` = (for the lower bound's rows, for the
        upper bound's rows), each None (CROWN's) or (B, rows or 1, *parameter shape), for ops with
        an ``alpha_range``."""
        raise NotImplementedError(f"{type(self).__name__} has no free relaxation parameter")


class LinearOp(BoundOp):
    """An op that is affine in its perturbed inputs: the same map serves lA and uA."""

    def backward_one(self, A: LinearA, *args, **kwargs) -> tuple[list[tuple[Value, LinearA]], Any]:
        raise NotImplementedError

    def backward(self, lA, uA, *args, **kwargs):
        if lA is not None and lA is uA:  # same coefficients on both sides: map them once
            res, bias = self.backward_one(lA, *args, **kwargs)
            return [(v, a, a) for v, a in res], bias, bias
        # One entry per operand position, both sides paired: the same node may be several
        # operands (``h + h``, ``cat([h, h])``); the walk sums the entries of a node, so entries
        # must never be merged (or overwritten) by node here.
        sides, biases = [], []
        for A in (lA, uA):
            if A is None:
                sides.append(None)
                biases.append(0)
                continue
            res, bias = self.backward_one(A, *args, **kwargs)
            sides.append(res)
            biases.append(bias)
        lres, ures = sides
        n = len(lres if lres is not None else ures)
        out = [((lres or ures)[i][0], lres[i][1] if lres is not None else None,
                ures[i][1] if ures is not None else None) for i in range(n)]
        return out, biases[0], biases[1]


def ball_radius(eps: Tensor, ndim: int) -> Tensor:
    """An Lp ball's radius (a scalar, or one value per example of shape (B,)) shaped to broadcast
    against a ``ndim``-dimensional node value (B, ...)."""
    eps = torch.as_tensor(eps)
    return eps.reshape(-1, *([1] * (ndim - 1))) if eps.dim() else eps


def unbroadcast(A: LinearA, shape: torch.Size) -> LinearA:
    """Sum a (B, N, *out) coefficient tensor down to an input of per-example ``shape`` that was
    broadcast to ``out`` in the forward pass (the adjoint of broadcasting)."""
    if isinstance(A, Patches):
        if tuple(shape) == tuple(A.shape):
            return A
        A = A.to_dense()
    out = A.shape[2:]
    if tuple(out) == tuple(shape):
        return A
    extra = len(out) - len(shape)
    if extra > 0:
        A = A.sum(dim=tuple(range(2, 2 + extra)))
    dims = tuple(i + 2 for i, (s, o) in enumerate(zip(shape, A.shape[2:])) if s == 1 and o != 1)
    return A.sum(dim=dims, keepdim=True) if dims else A
