"""TrainingMethod: what every certified-training method shares — its options, their checks, and
the hook that computes its robust loss.

A method is one class in one file of this package plus one ``conf/method/<name>.yaml`` that
instantiates it by ``_target_``.  The LightningModule (`certtrain.CertifiedModule`) owns the
model, the bound engine and the schedules; a method only says which loss to minimise, using the
module's helpers (``margin_bounds``, ``adversarial``, ...), so no bound mathematics lives here.

loss = κ · CE(clean logits) + (1 - κ) · robust loss (+ warm-up regularizers + L1), κ ramped from
``kappa_start`` to ``kappa_end`` with ε.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from torch import Tensor

from ..regularizers import REG_TERMS

if TYPE_CHECKING:  # pragma: no cover
    from ..certified_module import CertifiedModule
    from ..threat import ThreatModel

INITS = ("default", "ibp")
#: the registry: method name -> class (filled by `register_method`)
METHODS: dict[str, type["TrainingMethod"]] = {}


def register_method(cls: type["TrainingMethod"]) -> type["TrainingMethod"]:
    METHODS[cls.name] = cls
    return cls


def number(where: str, v: Any, low: float, high: float = math.inf, low_open: bool = False,
           high_open: bool = False) -> float:
    """``v`` as a float in the given interval; ValueError naming ``where`` otherwise."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    if ok:
        f = float(v)
        ok = (f > low if low_open else f >= low) and (f < high if high_open else f <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{where} must be a number in {lo}{low:g}, {high:g}{hi}, got {v!r}")
    return float(v)


class TrainingMethod:
    """Base class of training methods (see the module docstring).

    Options shared by every method: ``kappa_start`` / ``kappa_end`` (weight of the clean loss along
    the ε ramp), ``init`` (``default`` | ``ibp``: the IBP initialization of Shi et al. 2021),
    ``reg_lambda`` / ``reg_tau`` / ``reg_terms`` / ``reg_min_eps`` (their warm-up regularizers,
    off at λ = 0) and ``l1`` (weight of Σ|W|)."""

    name: ClassVar[str] = "?"
    #: the robust loss computes bounds (so the warm-up regularizers can read them)
    needs_bounds: ClassVar[bool] = True
    #: defaults of the method's attack (``certtrain.attacks.AttackConfig``), None: no attack
    attack_defaults: ClassVar[Optional[dict[str, Any]]] = None
    #: defaults of the shared options for this method
    defaults: ClassVar[dict[str, Any]] = {"kappa_start": 1.0, "kappa_end": 1.0, "init": "default", "reg_lambda": 0.0,
                                          "reg_tau": 0.5, "reg_terms": list(REG_TERMS), "reg_min_eps": 1e-6, "l1": 0.0}

    def __init__(self, kappa_start: Optional[float] = None, kappa_end: Optional[float] = None,
                 init: Optional[str] = None, reg_lambda: Optional[float] = None, reg_tau: Optional[float] = None,
                 reg_terms: Optional[Sequence[str]] = None, reg_min_eps: Optional[float] = None,
                 l1: Optional[float] = None, attack: Optional[Mapping[str, Any]] = None, where: str = "method"):
        d = self.defaults
        pick = lambda k, v: d[k] if v is None else v  # noqa: E731
        self.where = where
        self.kappa_start = number(f"{where}.kappa_start", pick("kappa_start", kappa_start), 0.0, 1.0)
        self.kappa_end = number(f"{where}.kappa_end", pick("kappa_end", kappa_end), 0.0, 1.0)
        self.init = pick("init", init)
        if self.init not in INITS:
            raise ValueError(f"{where}.init must be one of {', '.join(INITS)}, got {self.init!r}")
        self.reg_lambda = number(f"{where}.reg_lambda", pick("reg_lambda", reg_lambda), 0.0)
        self.reg_tau = number(f"{where}.reg_tau", pick("reg_tau", reg_tau), 0.0, 1.0, low_open=True)
        self.reg_min_eps = number(f"{where}.reg_min_eps", pick("reg_min_eps", reg_min_eps), 0.0, low_open=True)
        terms = pick("reg_terms", reg_terms)
        if isinstance(terms, str) or not isinstance(terms, Sequence) or not terms or any(t not in REG_TERMS for t in terms):
            raise ValueError(f"{where}.reg_terms must be a non-empty list of {', '.join(REG_TERMS)}, got {terms!r}")
        self.reg_terms = tuple(dict.fromkeys(terms))
        self.l1 = number(f"{where}.l1", pick("l1", l1), 0.0)
        if self.reg_lambda > 0 and not self.needs_bounds:
            raise ValueError(f"{where}.reg_lambda > 0 needs bounds, but method {self.name!r} computes none; use one of "
                             f"{', '.join(n for n, c in METHODS.items() if c.needs_bounds)} or set {where}.reg_lambda=0")
        from ..attacks import AttackConfig

        if self.attack_defaults is not None:
            self.attack: Optional[AttackConfig] = AttackConfig.from_mapping(attack, f"{where}.attack", self.attack_defaults)
        elif attack is not None:
            raise ValueError(f"{where}.attack: method {self.name!r} does not attack; drop the attack options")
        else:
            self.attack = None

    # ----------------------------------------------------------------- description
    def options(self) -> dict[str, Any]:
        """Every option with its value (what a config would need to rebuild the method)."""
        out = {k: getattr(self, k) for k in self.defaults}
        out["reg_terms"] = list(out["reg_terms"])
        if self.attack is not None:
            out["attack"] = self.attack.as_dict()
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options() == self.options()  # type: ignore[union-attr]

    # ----------------------------------------------------------------- hooks
    def check_threat(self, threat: "ThreatModel") -> None:
        """ValueError if the method cannot train against ``threat`` (e.g. SABR needs boxes)."""
        if threat.input_kind == "text" and self.attack is not None:
            raise ValueError(f"method {self.name!r} trains on gradient attacks in input space, which word "
                             "substitutions do not have; use method=ibp, crown_ibp, fast_ibp or natural")
        if self.attack is not None and threat.attack_norm is None:  # L0 and weight balls
            raise ValueError(f"method {self.name!r} trains on PGD points of an L∞ / L2 ball around the input, and "
                             f"{threat!r} is not one; use method=ibp, crown_ibp, fast_ibp or natural")
        if getattr(threat, "perturbs", "input") == "weights" and self.reg_lambda > 0 and "tightness" in self.reg_terms:
            raise ValueError(f"{self.where}.reg_terms: the tightness regularizer compares pre-activation bounds with "
                             f"the input box, which a weight perturbation leaves a point; set {self.where}.reg_terms="
                             f"[relu] or {self.where}.reg_lambda=0")

    def beta(self) -> Optional[tuple[float, float]]:
        """(start, end) of the β schedule, for methods that mix two bounds (CROWN-IBP)."""
        return None

    def bounds_around_x(self) -> bool:
        """Whether the robust loss bounds the ball around x itself (the engine then reuses the
        clean forward pass of the step)."""
        return self.needs_bounds

    def robust_loss(self, module: "CertifiedModule", x: Tensor, y: Tensor, eps: float, beta: float, nat: Tensor,
                    keep_intermediate: bool = False, lb_ibp: Optional[Tensor] = None
                    ) -> tuple[Tensor, dict[str, Tensor], bool]:
        """The robust loss at ε (> 0), what to log (keys without prefix), and whether the engine
        kept intermediate bounds (``keep_intermediate``) for the regularizers.  ``lb_ibp``: IBP
        margin bounds over the ε-ball already computed (validation reuses them)."""
        raise NotImplementedError
