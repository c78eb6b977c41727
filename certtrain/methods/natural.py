"""Standard training: the clean cross-entropy only; bounds serve evaluation alone."""
from __future__ import annotations

from .base import TrainingMethod, register_method


@register_method
class Natural(TrainingMethod):
    name = "natural"
    needs_bounds = False

    def __init__(self, **options):
        super().__init__(**options)
        self.kappa_start = self.kappa_end = 1.0  # the robust loss is never used

    def bounds_around_x(self) -> bool:
        return False

    def robust_loss(self, module, x, y, eps, beta, nat, keep_intermediate=False, lb_ibp=None):
        return nat, {}, False
