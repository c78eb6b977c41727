"""CROWN-IBP (Zhang et al. 2020): the robust loss of β·CROWN-IBP + (1-β)·IBP margin bounds, β from
``beta_start`` to ``beta_end`` along the ε ramp; ``loss_fusion`` bounds the cross-entropy itself
(one backward row per example instead of K-1)."""
from __future__ import annotations

from typing import Optional

from ..losses import robust_ce, verified
from .base import TrainingMethod, number, register_method


@register_method
class CROWNIBP(TrainingMethod):
    name = "crown_ibp"
    defaults = {**TrainingMethod.defaults, "kappa_start": 1.0, "kappa_end": 0.0}

    def __init__(self, beta_start: float = 1.0, beta_end: float = 0.0, loss_fusion: bool = False, **options):
        super().__init__(**options)
        self.beta_start = number(f"{self.where}.beta_start", beta_start, 0.0, 1.0)
        self.beta_end = number(f"{self.where}.beta_end", beta_end, 0.0, 1.0)
        if not isinstance(loss_fusion, bool):
            raise ValueError(f"{self.where}.loss_fusion must be true or false, got {loss_fusion!r}")
        self.loss_fusion = loss_fusion

    def options(self):
        return {**super().options(), "beta_start": self.beta_start, "beta_end": self.beta_end,
                "loss_fusion": self.loss_fusion}

    def check_threat(self, threat) -> None:
        super().check_threat(threat)
        if self.loss_fusion and threat.input_kind != "image":
            raise ValueError(f"{self.where}.loss_fusion bounds the loss of an image classifier; for word "
                             f"substitutions set {self.where}.loss_fusion=false")

    def beta(self) -> Optional[tuple[float, float]]:
        return self.beta_start, self.beta_end

    def bounds_around_x(self) -> bool:
        return not self.loss_fusion  # the fused bound runs its own engine on the loss

    def robust_loss(self, module, x, y, eps, beta, nat, keep_intermediate=False, lb_ibp=None):
        log = {}
        if self.loss_fusion and beta > 0:
            # Both terms are upper bounds of the worst-case loss, so is their mix.
            rob = beta * module.fused_loss_bound(x, y, eps).mean()
            if beta < 1:
                lb = module.margin_bounds(x, y, eps, "IBP", keep_intermediate) if lb_ibp is None else lb_ibp
                rob = rob + (1 - beta) * robust_ce(lb)
                log["verified_acc_ibp"] = verified(lb).float().mean()
                return rob, log, keep_intermediate and lb_ibp is None
            return rob, log, False
        if beta == 0 and lb_ibp is not None:
            lb = lb_ibp
        else:
            lb = self.mixed_bound(module, x, y, eps, beta, keep_intermediate)
        log["verified_acc"] = verified(lb).float().mean()
        return robust_ce(lb), log, keep_intermediate and (lb_ibp is None or beta > 0)

    @staticmethod
    def mixed_bound(module, x, y, eps, beta, keep_intermediate=False):
        """β·CROWN-IBP + (1-β)·IBP margin lower bounds (Zhang et al. 2020, Eq. 5)."""
        if beta <= 0:
            return module.margin_bounds(x, y, eps, "IBP", keep_intermediate)
        lb_ci = module.margin_bounds(x, y, eps, "CROWN-IBP", keep_intermediate=keep_intermediate and beta >= 1)
        if beta >= 1:
            return lb_ci
        # CROWN-IBP's intermediate bounds are IBP's: keep those of the IBP call
        return beta * lb_ci + (1 - beta) * module.margin_bounds(x, y, eps, "IBP", keep_intermediate)
