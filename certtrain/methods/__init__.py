"""Certified-training methods, one class per file, chosen in configs by ``_target_``
(``conf/method/<name>.yaml``).  A new method is one `TrainingMethod` subclass in a new file here,
decorated with `register_method` and imported below, plus one yaml.

``METHODS`` maps each method's name (what checkpoints and tables show) to its class;
`build_method` makes one from a name or a config mapping.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import INITS, METHODS, TrainingMethod, register_method
from .crown_ibp import CROWNIBP
from .fast_ibp import FastIBP
from .ibp import IBP
from .mtl_ibp import MTLIBP
from .natural import Natural
from .pgd import PGD
from .sabr import SABR

__all__ = ["CROWNIBP", "FastIBP", "IBP", "INITS", "METHODS", "MTLIBP", "Natural", "PGD", "SABR", "TrainingMethod",
           "build_method", "method_name", "register_method"]


def method_name(config: Any) -> str:
    """The method name of a method config (``_target_`` or, in old checkpoints, ``name``) or object."""
    if isinstance(config, TrainingMethod):
        return config.name
    if isinstance(config, str):
        return config
    if isinstance(config, Mapping) or hasattr(config, "get"):
        if config.get("name"):
            return str(config["name"])
        target = str(config.get("_target_", ""))
        cls = _by_target(target)
        if cls is not None:
            return cls.name
        return target.rsplit(".", 1)[-1] or "?"
    return "?"


def _by_target(target: str):
    for cls in METHODS.values():
        if f"{cls.__module__}.{cls.__qualname__}" == target or f"certtrain.methods.{cls.__qualname__}" == target:
            return cls
    return None


def build_method(config: Any, where: str = "method") -> TrainingMethod:
    """A method object from a name, an object, or a config mapping (``_target_`` or the legacy
    ``name`` key, plus options).  ValueError naming the unknown method or option."""
    if isinstance(config, TrainingMethod):
        return config
    if isinstance(config, str):
        config = {"name": config}
    opts = {k: v for k, v in dict(config).items()}
    target, name = opts.pop("_target_", None), opts.pop("name", None)
    cls = _by_target(str(target)) if target is not None else METHODS.get(str(name))
    if cls is None:
        what = f"{where}._target_ {target!r}" if target is not None else f"{where}.name {name!r}"
        raise ValueError(f"unknown {what}; available: "
                         + ", ".join(f"{n} (certtrain.methods.{c.__qualname__})" for n, c in METHODS.items()))
    opts = {k: v for k, v in opts.items() if v is not None}
    try:
        return cls(**opts, where=where)
    except TypeError:
        import inspect

        known = sorted({p for c in cls.__mro__ if c is not object
                        for p in inspect.signature(c.__init__).parameters if p not in ("self", "options", "where")})
        bad = sorted(set(opts) - set(known))
        if bad:
            raise ValueError(f"unknown option(s) {', '.join(f'{where}.{k}' for k in bad)} for method {cls.name!r}; "
                             f"available: {', '.join(known)}") from None
        raise
