"""PGD adversarial training (Madry et al. 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR): cross-entropy at the PGD point only (κ = 0); a baseline that certifies
little.  Attack: their MNIST setting, 40 steps of 0.01 at ε = 0.3 (ε/30), random start."""
from __future__ import annotations

from .base import TrainingMethod, register_method


@register_method
class PGD(TrainingMethod):
    name = "pgd"
    needs_bounds = False
    defaults = {**TrainingMethod.defaults, "kappa_start": 0.0, "kappa_end": 0.0}
    attack_defaults = {"steps": 40, "step_size": 1 / 30, "restarts": 1, "random_start": True, "loss": "ce",
                       "select": "max_loss", "step_decay": [], "decay_factor": 0.1, "bn_eval": False}

    def robust_loss(self, module, x, y, eps, beta, nat, keep_intermediate=False, lb_ibp=None):
        adv_loss, adv_acc = module.adversarial_ce(module.adversarial(x, y, eps), y)
        return adv_loss, {"adv_loss": adv_loss, "adv_acc": adv_acc}, False
