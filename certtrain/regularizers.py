"""Warm-up regularizers of Shi et al. 2021 ("Fast Certified Robust Training with Short Warmup", Sec. 3.3).

During the ε warm-up they keep the IBP bounds of the pre-activation layers (the inputs of the
ReLUs) from exploding and the ReLU states balanced:

* ``L_tightness`` = (1/m) Σ_i ReLU(τ - t_i) / τ, with t_i = mean(r_0) / mean(r_i), r_0 the radius
  (half-width) of the (normalised) input box and r_i that of the i-th pre-activation layer: zero
  while no layer's bounds are more than 1/τ times wider than the input's.
* ``L_relu`` = (1/m) Σ_i [ReLU(τ - ρ_mean,i) + ReLU(τ - ρ_var,i)] / τ, where, with c = (l + u)/2
  the box centres of layer i, active = {l > 0} and inactive = {u < 0},
  ρ_mean = min(r, 1/r) for r = mean(c·1_active) / -mean(c·1_inactive) and
  ρ_var = min(r, 1/r) for r = Σ_active (c - mean c)² / Σ_inactive (c - mean c)²:
  zero while active and inactive neurons are balanced within a factor 1/τ.  A layer whose ratio
  is not finite (e.g. no active and no inactive neuron) contributes 0, as in the authors' code.

Their loss adds λ·(1 - ε/ε_target)·(L_tightness + L_relu) (λ = 0.5, τ = 0.5), so the weight decays
linearly to 0 as ε reaches its target (:func:`warmup_weight`).  Bounds are (lower, upper) pairs,
e.g. from ``BoundedModule.save_intermediate()`` after ``compute_bounds(..., keep_intermediate=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["REG_TERMS", "relu_balance_loss", "tightness_loss", "warmup_regularizer", "warmup_weight"]

REG_TERMS = ("tightness", "relu")

Bounds = tuple[Tensor, Tensor]


def _check_tau(tau: float) -> float:
    if not 0 < float(tau) <= 1:
        raise ValueError(f"the regularizer tolerance tau must be in (0, 1], got {tau}")
    return float(tau)


def tightness_loss(input_bounds: Bounds, pre_bounds: Sequence[Bounds], tau: float = 0.5) -> Tensor:
    """L_tightness of Shi et al. 2021: mean over layers of ReLU(τ - mean r_0 / mean r_i) / τ."""
    tau = _check_tau(tau)
    lo0, hi0 = input_bounds
    if not pre_bounds:
        return lo0.new_zeros(())
    r0 = ((hi0 - lo0) / 2).mean()
    terms = [F.relu(tau - r0 / ((u - lo) / 2).mean().clamp(min=1e-12)) / tau for lo, u in pre_bounds]
    return torch.stack(terms).mean()


def _balance(r: Tensor) -> Tensor:
    """min(r, 1/r): 1 when balanced, towards 0 when one side dominates."""
    return torch.minimum(r, 1 / r.clamp(min=1e-12))


def relu_balance_loss(pre_bounds: Sequence[Bounds], tau: float = 0.5) -> Tensor:
    """L_relu of Shi et al. 2021: balance of active (l > 0) and inactive (u < 0) neurons, by the
    mean and by the spread of their box centres, averaged over the layers."""
    tau = _check_tau(tau)
    if not pre_bounds:
        raise ValueError("relu_balance_loss needs at least one layer of bounds")
    total = pre_bounds[0][0].new_zeros(())
    for lo, u in pre_bounds:
        c = (lo + u) / 2
        act, inact = (lo > 0).to(c.dtype), (u < 0).to(c.dtype)  # masks carry no gradient
        mean_ratio = (c * act).mean() / -(c * inact).mean()
        d = (c - c.mean()) ** 2
        var_ratio = (d * act).sum() / (d * inact).sum()
        term = (F.relu(tau - _balance(mean_ratio)) + F.relu(tau - _balance(var_ratio))) / tau
        if bool(torch.isfinite(term)):  # one host sync per layer; skipped layers add 0
            total = total + term
    return total / len(pre_bounds)


def warmup_regularizer(input_bounds: Bounds, pre_bounds: Sequence[Bounds], tau: float = 0.5,
                       terms: Sequence[str] = REG_TERMS) -> dict[str, Tensor]:
    """The chosen terms (``tightness``, ``relu``) and their sum under ``"total"``."""
    unknown = [t for t in terms if t not in REG_TERMS]
    if unknown or not terms:
        raise ValueError(f"regularizer terms must be a non-empty subset of {', '.join(REG_TERMS)}, got {list(terms)}")
    out: dict[str, Tensor] = {}
    if not pre_bounds:  # no ReLU-like layer: nothing to regularize
        zero = input_bounds[0].new_zeros(())
        return {**{t: zero for t in terms}, "total": zero}
    if "tightness" in terms:
        out["tightness"] = tightness_loss(input_bounds, pre_bounds, tau)
    if "relu" in terms:
        out["relu"] = relu_balance_loss(pre_bounds, tau)
    out["total"] = sum(out.values(), input_bounds[0].new_zeros(()))
    return out


def warmup_weight(lam: float, eps: float, eps_target: float) -> float:
    """λ · (1 - ε/ε_target), clipped to [0, λ]: the weight of the regularizers, 0 once ε has reached its target."""
    if lam < 0:
        raise ValueError(f"the regularizer weight lambda must be >= 0, got {lam}")
    if eps_target <= 0:
        return 0.0
    return float(lam) * min(1.0, max(0.0, 1.0 - float(eps) / float(eps_target)))
