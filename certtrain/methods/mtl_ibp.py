"""MTL-IBP (De Palma et al. 2024, "Expressive Losses for Verified Robustness via Convex
Combinations", ICLR): α·L_IBP(ε) + (1 - α)·CE(attack point in the ε-ball), Eq. (4).  Defaults: the
authors' MNIST 0.1 command (IBP initialization + Shi et al.'s regularizers, κ = 0, one attack step)."""
from __future__ import annotations

from ..losses import robust_ce, verified
from .base import TrainingMethod, number, register_method


@register_method
class MTLIBP(TrainingMethod):
    name = "mtl_ibp"
    defaults = {**TrainingMethod.defaults, "kappa_start": 0.0, "kappa_end": 0.0, "init": "ibp", "reg_lambda": 0.5,
                "l1": 1e-5}
    # README: 1 step of 10·(box radius) from a random start (train_att_n_steps 1, train_att_step_size
    # 10), i.e. FGSM with random start clipped to the ball
    attack_defaults = {"steps": 1, "step_size": 10.0, "restarts": 1, "random_start": True, "loss": "ce",
                       "select": "last", "step_decay": [], "decay_factor": 0.1, "bn_eval": True}

    def __init__(self, alpha: float = 0.01, **options):
        super().__init__(**options)
        self.alpha = number(f"{self.where}.alpha", alpha, 0.0, 1.0)

    def options(self):
        return {**super().options(), "alpha": self.alpha}

    def robust_loss(self, module, x, y, eps, beta, nat, keep_intermediate=False, lb_ibp=None):
        lb = module.margin_bounds(x, y, eps, "IBP", keep_intermediate) if lb_ibp is None else lb_ibp
        ibp_loss = robust_ce(lb)
        adv_loss, adv_acc = module.adversarial_ce(module.adversarial(x, y, eps), y)
        log = {"verified_acc": verified(lb).float().mean(), "ibp_loss": ibp_loss, "adv_loss": adv_loss,
               "adv_acc": adv_acc}
        return self.alpha * ibp_loss + (1 - self.alpha) * adv_loss, log, keep_intermediate and lb_ibp is None
