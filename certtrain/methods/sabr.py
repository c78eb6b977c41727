"""SABR (Müller et al. 2023, "Certified Training: Small Boxes are All You Need", ICLR): an attack
finds a point in the ε-ball; the robust loss is IBP over the box of radius lambda_ratio·ε around
it, shifted inside the ε-ball ∩ domain (boxes only).  Defaults: the authors' MNIST ε = 0.1
command (IBP initialization, Shi et al.'s regularizers, κ = 0, their attack)."""
from __future__ import annotations

from ..losses import robust_ce, verified
from .base import TrainingMethod, number, register_method


@register_method
class SABR(TrainingMethod):
    name = "sabr"
    defaults = {**TrainingMethod.defaults, "kappa_start": 0.0, "kappa_end": 0.0, "init": "ibp", "reg_lambda": 0.5,
                "l1": 1e-5}
    # src/parse_args.py / adv_attack.py: 8 PGD steps of 0.5·ε, ×0.1 at 50 %, 80 %, 90 % of the
    # steps, CE, random start, BatchNorm in eval mode, the point of highest loss
    attack_defaults = {"steps": 8, "step_size": 0.5, "restarts": 1, "random_start": True, "loss": "ce",
                       "select": "max_loss", "step_decay": [0.5, 0.8, 0.9], "decay_factor": 0.1, "bn_eval": True}

    def __init__(self, lambda_ratio: float = 0.4, **options):
        super().__init__(**options)
        self.lambda_ratio = number(f"{self.where}.lambda_ratio", lambda_ratio, 0.0, 1.0, low_open=True)

    def options(self):
        return {**super().options(), "lambda_ratio": self.lambda_ratio}

    def check_threat(self, threat) -> None:
        super().check_threat(threat)
        if not threat.is_box:
            raise ValueError("method sabr propagates L∞ boxes: use perturbation.norm=inf (perturbation=linf)")

    def bounds_around_x(self) -> bool:
        return False  # the small box is around the adversarial point

    def robust_loss(self, module, x, y, eps, beta, nat, keep_intermediate=False, lb_ibp=None):
        x_adv = module.adversarial(x, y, eps)
        lb = module.sabr_bounds(x, y, eps, x_adv, self.lambda_ratio, keep_intermediate)
        return robust_ce(lb), {"small_box_acc": verified(lb).float().mean()}, keep_intermediate
