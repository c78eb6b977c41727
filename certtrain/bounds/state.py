"""BoundState: everything one bound computation knows, passed explicitly through the walk.

A state holds the perturbation of each input, the clean value of every node and the bounds
computed so far (`Value` objects, one per node).  Nothing of a computation lives on the
`BoundedModule`, so calls are independent (``compute_bounds`` is reentrant) and an algorithm may
keep many states at once: one per branch-and-bound domain, each with its own intermediate bounds
(``fixed``: bounds the caller supplies for chosen nodes, e.g. a ReLU split's ``l = 0``).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor

from .ops.base import Value
from .perturbations import Perturbation

Interval = tuple[Tensor, Tensor]


class BoundState:
    """The state of one bound computation on a `BoundedModule` (see the module docstring)."""

    def __init__(self, values: dict[str, Value], ptbs: Mapping[str, Optional[Perturbation]],
                 fixed: Optional[Mapping[str, Interval]] = None, order: Optional[list[str]] = None):
        self.values = values
        self.ptbs = dict(ptbs)
        self.fixed: dict[str, Interval] = dict(fixed or {})
        self._order = order if order is not None else list(values)

    def __repr__(self) -> str:
        n = sum(1 for v in self.values.values() if v.perturbed)
        return f"BoundState({n} perturbed nodes, fixed={sorted(self.fixed)})"

    def value(self, name: str) -> Value:
        return self.values[name]

    def perturbed(self, name: str) -> bool:
        v = self.values.get(name)
        return v is not None and v.perturbed

    def bounds(self, name: str) -> Interval:
        """(lower, upper) of a node (its clean value twice when it does not depend on a perturbation)."""
        return self.values[name].bounds

    def intermediate(self) -> dict[str, Interval]:
        """Bounds of every perturbed node, in topological order."""
        return {k: (self.values[k].lower, self.values[k].upper) for k in self._order
                if k in self.values and self.values[k].perturbed and self.values[k].lower is not None}

    def fix(self, name: str, lower: Tensor, upper: Tensor) -> None:
        """Use (lower, upper) as the bounds of ``name`` in the next walk over this state (they are
        intersected with what the walk computes, so they must hold over the set being bounded)."""
        if name not in self.values or not self.values[name].perturbed:
            raise ValueError(f"node {name!r} does not depend on a perturbed input; perturbed nodes: "
                             f"{', '.join(k for k in self._order if self.perturbed(k))}")
        ref = self.values[name].value
        for side, t in (("lower", lower), ("upper", upper)):
            if not isinstance(t, Tensor) or t.shape != ref.shape:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"fixed {side} bound of {name!r} has shape {shape}, the node has {tuple(ref.shape)}")
        self.fixed[name] = (lower.to(ref.dtype), upper.to(ref.dtype))

    def apply_fixed(self, name: str) -> bool:
        """Intersect the node's bounds with the fixed ones (if any); True if it has fixed bounds."""
        f = self.fixed.get(name)
        if f is None:
            return False
        v = self.values[name]
        v.lower, v.upper = torch.maximum(v.lower, f[0]), torch.minimum(v.upper, f[1])
        return True
