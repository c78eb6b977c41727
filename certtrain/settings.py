"""The run settings besides method and threat model: optimizer and evaluation, checked once.

`OptimSettings` and `EvalSettings` are the ``optim`` and ``eval`` sections of ``conf/train.yaml``
as typed, validated objects; `check_run_config` builds every part of a composed run config (method,
threat model, schedule, these two) so a bad value fails before any data or model is built, with a
message naming the key.  `CertifiedModule` takes the same objects, so Python users get the same
checks.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

from .bounds import CHEAP_METHODS, check_bound_opts, resolve_method

__all__ = ["EvalSettings", "OptimSettings", "check_inputs_match", "check_run_config", "check_val_bounds"]


def _from_mapping(cls, options: Optional[Mapping[str, Any]], where: str):
    if options is None:
        return cls()
    if isinstance(options, cls):
        return options
    if not isinstance(options, Mapping):
        raise ValueError(f"{where} must be a mapping of options, got {options!r}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(f'{where}.{k}' for k in unknown)}; available: {', '.join(names)}")
    return cls(**{k: v for k, v in options.items() if v is not None}, where=where)


def _int(where: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def check_val_bounds(bounds: Any) -> tuple[str, ...]:
    """Canonical names of the bounds of ``val/verified_acc_target`` (the cheap methods)."""
    items = [bounds] if isinstance(bounds, str) else list(bounds or ())
    out = []
    for b in items:
        try:
            name = resolve_method(str(b))
        except (ValueError, NotImplementedError):
            name = None
        if name not in CHEAP_METHODS:
            raise ValueError(f"eval.val_bounds: unknown bound {b!r}; use a list of {', '.join(CHEAP_METHODS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"eval.val_bounds is empty; give one or more of {', '.join(CHEAP_METHODS)}")
    return tuple(out)


@dataclass
class OptimSettings:
    """Adam with weight decay and a MultiStepLR at ``milestones`` (epochs)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    milestones: Sequence[float] = ()
    gamma: float = 0.1
    where: str = field(default="optim", repr=False, compare=False)

    def __post_init__(self):
        w = self.where
        for k, low_open in (("lr", True), ("weight_decay", False), ("gamma", True)):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                    (v <= 0 if low_open else v < 0):
                raise ValueError(f"{w}.{k} must be {'positive' if low_open else '>= 0'}, got {v!r}")
            setattr(self, k, float(v))
        ms = list(self.milestones or [])
        if any(isinstance(m, bool) or not isinstance(m, (int, float)) or m < 0 for m in ms):
            raise ValueError(f"{w}.milestones must be a list of epochs >= 0, got {self.milestones!r}")
        self.milestones = [float(m) for m in ms]

    @classmethod
    def from_mapping(cls, options: Optional[Mapping[str, Any]], where: str = "optim") -> "OptimSettings":
        return _from_mapping(cls, options, where)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("where")
        return d


@dataclass
class EvalSettings:
    """Validation and test: PGD settings, whether test verifies with CROWN (``crown``: true / false
    / "auto" for models up to ``crown_max_neurons`` ReLU outputs), the engine's ``bound_opts``,
    and the bounds of ``val/verified_acc_target`` (``val_bounds``)."""

    val_pgd_steps: int = 5
    pgd_steps: int = 20
    pgd_restarts: int = 1
    pgd_step_size: Optional[float] = None
    crown: Union[bool, str] = "auto"
    crown_max_neurons: int = 10_000
    bound_opts: Optional[Mapping[str, Any]] = None
    val_bounds: Sequence[str] = ("IBP",)
    where: str = field(default="eval", repr=False, compare=False)

    def __post_init__(self):
        w = self.where
        self.val_pgd_steps = _int(f"{w}.val_pgd_steps", self.val_pgd_steps, 0)
        self.pgd_steps = _int(f"{w}.pgd_steps", self.pgd_steps, 0)
        self.pgd_restarts = _int(f"{w}.pgd_restarts", self.pgd_restarts, 1)
        self.crown_max_neurons = _int(f"{w}.crown_max_neurons", self.crown_max_neurons, 0)
        if self.pgd_step_size is not None:
            v = self.pgd_step_size
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{w}.pgd_step_size must be a positive number or null, got {v!r}")
            self.pgd_step_size = float(v)
        if self.crown != "auto" and not isinstance(self.crown, bool):
            raise ValueError(f"{w}.crown must be true, false or 'auto', got {self.crown!r}")
        self.bound_opts = dict(self.bound_opts or {})
        check_bound_opts(self.bound_opts)  # unknown engine options fail here, not at the first bound
        self.val_bounds = check_val_bounds(self.val_bounds)

    @classmethod
    def from_mapping(cls, options: Optional[Mapping[str, Any]], where: str = "eval") -> "EvalSettings":
        return _from_mapping(cls, options, where)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("where")
        d["val_bounds"] = list(d["val_bounds"])
        return d


def check_inputs_match(cfg: Any, threat: Any) -> None:
    """ValueError if the threat model perturbs another kind of input than the dataset gives (word
    substitutions need a text dataset and model; Lp balls an image dataset)."""
    target = cfg.get("dataset", {}).get("_target_") if hasattr(cfg, "get") else None
    if not target:
        return
    import importlib

    mod, _, attr = str(target).rpartition(".")
    try:
        text = bool(getattr(getattr(importlib.import_module(mod), attr), "is_text", False))
    except (ImportError, AttributeError, ValueError):
        return  # an unknown dataset is reported by the caller, naming the alternatives
    if text and threat.input_kind != "text":
        raise ValueError(f"dataset {attr} is text: train it against word substitutions (perturbation=synonym) "
                         f"with a text model (model=lstm or transformer), not {threat!r}")
    if not text and threat.input_kind == "text":
        raise ValueError(f"word substitutions (perturbation=synonym) need a text dataset (dataset=movie_reviews "
                         f"or sst2) and a text model (model=lstm or transformer); dataset {attr} holds images")


def check_run_config(cfg: Any) -> dict[str, Any]:
    """Build (and so check) every part of a composed run config that can be checked without data or
    a model: {"method", "threat", "schedule", "optim", "eval"}.  Raises ValueError naming the key."""
    from omegaconf import OmegaConf

    from .methods import build_method
    from .schedules import SCHEDULES, build_schedule
    from .threat import build_threat

    def plain(x):
        return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x

    threat = build_threat(plain(cfg.perturbation))
    check_inputs_match(cfg, threat)
    method = build_method(plain(cfg.method))
    method.check_threat(threat)
    s = plain(cfg.schedule) or {"name": "constant"}
    if s.get("name") not in SCHEDULES:
        raise ValueError(f"unknown schedule.name {s.get('name')!r}; available: {', '.join(sorted(SCHEDULES))}")
    for key in ("start", "length"):
        if s.get(key) is not None and (not math.isfinite(float(s[key])) or float(s[key]) < 0):
            raise ValueError(f"schedule.{key} must be >= 0 (epochs), got {s[key]}")
    schedule = build_schedule(s, 0.0, threat.eps)
    optim = OptimSettings.from_mapping(plain(cfg.optim))
    evaluation = EvalSettings.from_mapping(plain(cfg.get("eval")))
    return {"method": method, "threat": threat, "schedule": schedule, "optim": optim, "eval": evaluation}
