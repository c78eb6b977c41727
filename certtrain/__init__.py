"""certtrain: certified training of neural networks (bound engine, schedules, losses, Lightning module).

``CertifiedModule`` and friends are imported lazily, so ``import certtrain.bounds`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CertifiedModule", "VerifiedCheckpoint", "load_certified", "module_from_config"]

_LAZY = {
    "CertifiedModule": "certtrain.certified_module",
    "module_from_config": "certtrain.certified_module",
    "load_certified": "certtrain.certified_module",
    "VerifiedCheckpoint": "certtrain.callbacks",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'certtrain' has no attribute {name!r}")
