"""Fast IBP (Shi et al. 2021, "Fast Certified Robust Training with Short Warmup", NeurIPS): IBP
training with the IBP initialization and, during the ε warm-up, the regularizers of the
pre-activation bounds (L_tightness + L_relu, weight reg_lambda·(1 - ε/ε_target)).  Defaults: the
authors' parser.py and certified.py (robust loss only: κ = 0)."""
from __future__ import annotations

from .base import TrainingMethod, register_method
from .ibp import IBP


@register_method
class FastIBP(IBP):
    name = "fast_ibp"
    defaults = {**TrainingMethod.defaults, "kappa_start": 0.0, "kappa_end": 0.0, "init": "ibp", "reg_lambda": 0.5}
