"""Threat models: the perturbation family a model is trained and verified against.

Training ramps the radius ε from 0 to its target, so a run's perturbation is a *family* of sets;
``family.at(eps)`` gives the engine's perturbation set (a `certtrain.bounds.Perturbation`) at one
radius.  Configs build the family by ``_target_`` (``conf/perturbation/*.yaml``)::

    _target_: certtrain.threat.LpBall
    norm: inf
    eps: 0.1

Every ε and norm of a run is checked here, once.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from .bounds.perturbations import Perturbation, PerturbationLpNorm

__all__ = ["LpBall", "ThreatModel", "build_threat", "check_eps", "parse_norm"]


def parse_norm(norm: float | str) -> float:
    """``inf`` / ``linf`` / ``2`` / ``l2`` → math.inf or 2.0 (ValueError otherwise: the PGD attack
    of training and verification has no L1)."""
    s = str(norm).strip().lower()
    s = s[1:] if s.startswith("l") else s
    try:
        value = math.inf if s in ("inf", "infinity", "∞") else float(s)
    except ValueError:
        value = float("nan")
    if value not in (math.inf, 2.0):
        raise ValueError(f"unsupported perturbation norm {norm!r}: use inf (linf) or 2 (l2)")
    return value


def check_eps(name: str, eps: Any) -> float:
    """``eps`` as a finite float >= 0; ValueError naming ``name`` otherwise."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {eps!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")
    return value


class ThreatModel:
    """Base class of perturbation families: ``at(eps)`` is the set of radius ``eps``; ``eps`` the
    training target, ``eval_eps`` the radius of evaluation; ``attack_norm`` the norm PGD attacks
    in (None where PGD does not apply); ``is_box`` whether every set is a box (SABR needs it)."""

    eps: float
    eval_eps: float
    attack_norm: Optional[float] = None
    is_box: bool = False
    x_L: float = 0.0
    x_U: float = 1.0

    def at(self, eps: Any) -> Perturbation:
        raise NotImplementedError


class LpBall(ThreatModel):
    """The Lp ball ``||x' - x||_p <= eps`` (p = inf or 2) within the input domain ``[x_L, x_U]``
    (pixel space: [0, 1])."""

    def __init__(self, norm: float | str = "inf", eps: float = 0.1, eval_eps: Optional[float] = None,
                 x_L: float = 0.0, x_U: float = 1.0):
        self.norm = parse_norm(norm)
        self.eps = check_eps("perturbation.eps", eps)
        self.eval_eps = self.eps if eval_eps is None else check_eps("perturbation.eval_eps", eval_eps)
        self.x_L, self.x_U = float(x_L), float(x_U)
        if not self.x_L < self.x_U:
            raise ValueError(f"perturbation domain [x_L, x_U] = [{x_L}, {x_U}] is empty")
        self.attack_norm = self.norm
        self.is_box = self.norm == math.inf

    def __repr__(self) -> str:
        n = "inf" if self.norm == math.inf else f"{self.norm:g}"
        return f"LpBall(norm={n}, eps={self.eps:g}, eval_eps={self.eval_eps:g})"

    def at(self, eps: Any) -> PerturbationLpNorm:
        return PerturbationLpNorm(eps=eps, norm=self.norm, x_L=self.x_L, x_U=self.x_U)


def build_threat(config: Any, where: str = "perturbation") -> ThreatModel:
    """A threat model from an object or a config mapping (``_target_`` plus its options; a mapping
    without ``_target_``, as in old checkpoints, is an `LpBall`).  ValueError naming the problem."""
    if isinstance(config, ThreatModel):
        return config
    if config is None:
        return LpBall()
    if not hasattr(config, "items"):
        raise ValueError(f"{where} must be a mapping (norm, eps, ...) or a threat model, got {config!r}")
    opts = dict(config)
    target = opts.pop("_target_", None)
    cls: Any = LpBall
    if target is not None:
        import importlib

        mod, _, attr = str(target).rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError, ValueError):
            raise ValueError(f"unknown {where}._target_ {target!r}; e.g. certtrain.threat.LpBall") from None
        if not (isinstance(cls, type) and issubclass(cls, ThreatModel)):
            raise ValueError(f"{where}._target_ {target!r} is not a certtrain.threat.ThreatModel")
    import inspect

    known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(f'{where}.{k}' for k in unknown)}; available: {', '.join(known)}")
    return cls(**opts)
