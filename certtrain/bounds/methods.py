"""The bound methods: one registry of names, aliases, costs and options (α-CROWN's defaults).

Every part of certtrain that names a method (the engine, verification, training, the configs)
resolves it here, so an alias or a default is defined once::

    resolve_method("crown_ibp")          # -> "CROWN-IBP"
    AlphaCROWN(iteration=50)             # a method object with its options (a config `_target_`)
    net.compute_bounds(x=(x,), method=AlphaCROWN(iteration=50, lr_alpha=0.1))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

__all__ = ["ALPHA_DEFAULTS", "BoundMethod", "IBP", "CROWNIBP", "CROWN", "AlphaCROWN", "METHOD_NAMES",
           "CHEAP_METHODS", "as_method", "check_alpha_opts", "method_names", "resolve_method"]

#: α-CROWN options and their defaults (auto_LiRPA's names and defaults where it has the option).
ALPHA_DEFAULTS: dict[str, Any] = {
    "iteration": 20,               # gradient steps
    "lr_alpha": 0.5,               # Adam learning rate on α
    "lr_decay": 0.98,              # learning rate × lr_decay after every step
    "keep_best": True,             # return the best bound seen (never looser than CROWN)
    "optimize_intermediate": True,  # also optimize the α of the intermediate layers' bounds
    "use_shared_alpha": False,     # intermediate layers: one α for all neurons of a layer (else one per neuron)
    "use_full_conv_alpha": False,  # convolutional intermediate layers: one α per neuron (else per channel)
    "early_stop_patience": 10,     # stop after this many steps without improvement (0: never stop early)
    "early_stop_rtol": 1e-4,       # an improvement: the bounds' sum moves by more than this × their |sum|
    "alpha_memory_budget": 1 << 30,  # bytes for α (with gradient and Adam moments); beyond: rows share α
    "joint": False,                # both sides asked: one optimization for lb and ub (else two, as auto_LiRPA)
}
#: what each α-CROWN option must be (for error messages and docs)
ALPHA_RULES = {"iteration": "an integer >= 0", "lr_alpha": "a positive number", "lr_decay": "a number in (0, 1]",
               "keep_best": "true or false", "optimize_intermediate": "true or false",
               "use_shared_alpha": "true or false", "use_full_conv_alpha": "true or false", "early_stop_patience": "an integer >= 0",
               "early_stop_rtol": "a number >= 0", "alpha_memory_budget": "a positive number of bytes",
               "joint": "true or false"}


def check_alpha_opts(opts: Optional[Mapping[str, Any]], base: Optional[Mapping[str, Any]] = None,
                     where: str = "optimize_bound_args") -> dict:
    """``base`` (default `ALPHA_DEFAULTS`) updated by ``opts``; ValueError naming ``where.key`` and
    what it accepts."""
    out = dict(ALPHA_DEFAULTS if base is None else base)
    for k, v in dict(opts or {}).items():
        if k not in ALPHA_DEFAULTS:
            raise ValueError(f"unknown {where} key {k!r}; available: {', '.join(ALPHA_DEFAULTS)}")
        out[k] = v
    for k in ("iteration", "early_stop_patience"):
        it = out[k]
        if isinstance(it, bool) or not isinstance(it, int) or it < 0:
            raise ValueError(f"{where}.{k} must be {ALPHA_RULES[k]}, got {it!r}")
    for k, low, high, open_low in (("lr_alpha", 0.0, math.inf, True), ("lr_decay", 0.0, 1.0, True),
                                   ("early_stop_rtol", 0.0, math.inf, False),
                                   ("alpha_memory_budget", 0.0, math.inf, True)):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not (v > low if open_low else v >= low) or not v <= high:
            raise ValueError(f"{where}.{k} must be {ALPHA_RULES[k]}, got {v!r}")
    for k in ("keep_best", "optimize_intermediate", "use_shared_alpha", "use_full_conv_alpha", "joint"):
        if not isinstance(out[k], bool):
            raise ValueError(f"{where}.{k} must be {ALPHA_RULES[k]}, got {out[k]!r}")
    return out


@dataclass(frozen=True)
class BoundMethod:
    """A bound method: its canonical name, aliases, and what it computes where.

    ``intermediate``: how the inputs of relaxed ops are bounded ("ibp" or "crown");
    ``output``: how the output is bounded ("ibp" or "crown"); ``rank``: cost order (cheapest 0)."""

    name: str
    aliases: tuple[str, ...]
    intermediate: str
    output: str
    rank: int
    cheap: bool
    summary: str

    def options(self) -> dict:
        """The method's options (α-CROWN: ``optimize_bound_args``); empty for the others."""
        return {}


@dataclass(frozen=True)
class _Alpha(BoundMethod):
    opts: tuple = ()

    def options(self) -> dict:
        return dict(self.opts)


_REGISTRY: dict[str, BoundMethod] = {}
_ALIASES: dict[str, str] = {}
#: names that auto_LiRPA accepts and certtrain does not have yet
_NOT_YET = {"forward", "forward+backward", "dynamic-forward", "crown-forward"}


def _key(name: str) -> str:
    return str(name).strip().lower().replace(" ", "").replace("_", "-")


def _register(m: BoundMethod) -> BoundMethod:
    _REGISTRY[m.name] = m
    for a in (m.name, *m.aliases):
        _ALIASES[_key(a)] = m.name
    return m


_register(BoundMethod("IBP", (), "ibp", "ibp", 0, True, "interval arithmetic, spec folded into the last linear layer"))
_register(BoundMethod("CROWN-IBP", ("IBP+backward", "crownibp"), "ibp", "crown", 1, True,
                      "IBP for the intermediate layers, one backward pass from the output"))
_register(BoundMethod("CROWN", ("backward",), "crown", "crown", 2, False,
                      "backward passes for every relaxed op's inputs (unstable neurons) and the output"))
_register(_Alpha("alpha-CROWN", ("alphacrown", "α-CROWN", "CROWN-Optimized"), "crown", "crown", 3, False,
                 "CROWN with the free slopes optimized by gradient steps", tuple(ALPHA_DEFAULTS.items())))

#: canonical names, cheapest first
METHOD_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY, key=lambda n: _REGISTRY[n].rank))
#: methods cheap enough to run at every ε of a curve and alone on every sample
CHEAP_METHODS: tuple[str, ...] = tuple(n for n in METHOD_NAMES if _REGISTRY[n].cheap)


def method_names() -> str:
    return ", ".join(f"'{n}'" + (f" (alias {', '.join(repr(a) for a in _REGISTRY[n].aliases)})"
                                 if _REGISTRY[n].aliases else "") for n in METHOD_NAMES)


def resolve_method(name: Union[str, BoundMethod]) -> str:
    """Any accepted spelling (``ibp``, ``crown_ibp``, ``IBP+backward``, ``CROWN-Optimized`` ...) →
    the canonical name; ValueError naming the accepted ones otherwise."""
    if isinstance(name, BoundMethod):
        return name.name
    key = _key(name)
    if key in _NOT_YET:
        raise NotImplementedError(f"method {name!r} is not implemented yet; use one of {', '.join(METHOD_NAMES)}")
    if key not in _ALIASES:
        raise ValueError(f"unknown method {name!r}; use {method_names()}")
    return _ALIASES[key]


def get_method(name: Union[str, BoundMethod]) -> BoundMethod:
    return name if isinstance(name, BoundMethod) else _REGISTRY[resolve_method(name)]


# ----------------------------------------------------------------------------- config objects
def IBP() -> BoundMethod:  # noqa: N802 - a constructor, named as the method
    """Interval bound propagation (Gowal et al. 2018)."""
    return _REGISTRY["IBP"]


def CROWNIBP() -> BoundMethod:  # noqa: N802
    """CROWN-IBP (Zhang et al. 2020)."""
    return _REGISTRY["CROWN-IBP"]


def CROWN() -> BoundMethod:  # noqa: N802
    """CROWN (Zhang et al. 2018)."""
    return _REGISTRY["CROWN"]


def AlphaCROWN(**options: Any) -> BoundMethod:  # noqa: N802
    """α-CROWN (Xu et al. 2021) with ``options`` over `ALPHA_DEFAULTS` (checked here)."""
    base = _REGISTRY["alpha-CROWN"]
    return _Alpha(base.name, base.aliases, base.intermediate, base.output, base.rank, base.cheap, base.summary,
                  tuple(check_alpha_opts(options, where="AlphaCROWN").items()))


def as_method(method: Union[str, BoundMethod]) -> BoundMethod:
    """A method object from a name or an object (configs may give either)."""
    return get_method(method)
