"""IBP training (Gowal et al. 2018): robust cross-entropy of the IBP margin lower bounds."""
from __future__ import annotations

from ..losses import robust_ce, verified
from .base import TrainingMethod, register_method


@register_method
class IBP(TrainingMethod):
    name = "ibp"
    defaults = {**TrainingMethod.defaults, "kappa_start": 1.0, "kappa_end": 0.5}

    def robust_loss(self, module, x, y, eps, beta, nat, keep_intermediate=False, lb_ibp=None):
        lb = module.margin_bounds(x, y, eps, "IBP", keep_intermediate) if lb_ibp is None else lb_ibp
        return robust_ce(lb), {"verified_acc": verified(lb).float().mean()}, keep_intermediate and lb_ibp is None
