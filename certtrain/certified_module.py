"""CertifiedModule: a LightningModule training any classifier with certified-training methods.

loss = κ · CE(clean logits) + (1 - κ) · L_robust (+ warm-up regularizers + L1), where L_robust is
the method's robust loss over the ε-ball around x within [0, 1] (pixel space):

* ``ibp`` / ``fast_ibp``: robust_ce(lb) of the IBP margin lower bounds (Gowal et al. 2018; fast_ibp
  adds the IBP initialization and warm-up regularizers of Shi et al. 2021);
* ``crown_ibp``: lb = β·lb_CROWN-IBP + (1-β)·lb_IBP (Zhang et al. 2020);
* ``sabr``: robust_ce of IBP on a small box of radius λ·ε around a PGD point (Müller et al. 2023);
* ``mtl_ibp``: α·L_IBP + (1-α)·CE(PGD point) (De Palma et al. 2024);
* ``pgd``: CE(PGD point) (Madry et al. 2018);
* ``natural``: the clean loss only.

ε, κ and β follow schedules of the global step (see certtrain.schedules).  The bound maths lives in
certtrain.bounds, the attacks in certtrain.attacks, the regularizers in certtrain.regularizers and
the initialization in certtrain.initialization.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .normalize import Normalize

from .attacks import AttackConfig, pgd_accuracy
from .bounds import CHEAP_METHODS, BoundedModule, BoundedTensor, PerturbationLpNorm, resolve_method
from .initialization import count_batchnorm, ibp_init
from .loss_fusion import CrossEntropyBound, one_hot
from .losses import margin_spec, robust_ce, verified
from .regularizers import REG_TERMS, warmup_regularizer, warmup_weight
from .schedules import Schedule, build_schedule

__all__ = ["METHODS", "CertifiedModule", "check_method_options", "frozen_bn_stats", "load_certified",
           "module_from_config", "parse_norm", "sabr_box"]

METHODS = ("natural", "ibp", "crown_ibp", "fast_ibp", "sabr", "mtl_ibp", "pgd")
#: methods whose training loss needs bounds (the warm-up regularizers read theirs)
BOUND_METHODS = ("ibp", "crown_ibp", "fast_ibp", "sabr", "mtl_ibp")
#: methods whose training loss needs an attack (``method.attack``)
ATTACK_METHODS = ("sabr", "mtl_ibp", "pgd")
INITS = ("default", "ibp")
VAL_BOUNDS = CHEAP_METHODS  # bounds cheap enough for every validation batch

#: per-method attack defaults (the papers' MNIST settings; step_size in units of ε)
ATTACK_DEFAULTS: dict[str, dict[str, Any]] = {
    # Müller et al. 2023 (SABR code): 8 PGD steps of 0.5·ε, ×0.1 at 50 %, 80 %, 90 % of the steps,
    # CE, random start, BatchNorm in eval mode, the point of highest loss
    "sabr": {"steps": 8, "step_size": 0.5, "restarts": 1, "random_start": True, "loss": "ce",
             "select": "max_loss", "step_decay": [0.5, 0.8, 0.9], "decay_factor": 0.1, "bn_eval": True},
    # De Palma et al. 2024 (MNIST, README): 1 step of 10·(box radius) from a random start
    # (train_att_n_steps 1, train_att_step_size 10), i.e. FGSM with random start clipped to the ball
    "mtl_ibp": {"steps": 1, "step_size": 10.0, "restarts": 1, "random_start": True, "loss": "ce",
                "select": "last", "step_decay": [], "decay_factor": 0.1, "bn_eval": True},
    # Madry et al. 2018 (MNIST): 40 steps of 0.01 at ε = 0.3 (= ε/30), random start
    "pgd": {"steps": 40, "step_size": 1 / 30, "restarts": 1, "random_start": True, "loss": "ce",
            "select": "max_loss", "step_decay": [], "decay_factor": 0.1, "bn_eval": False},
}

#: every key a ``method`` config may hold, with its default
METHOD_OPTIONS: dict[str, Any] = {
    "kappa_start": 1.0, "kappa_end": 1.0, "beta_start": 1.0, "beta_end": 0.0, "loss_fusion": False,
    "init": "default",                      # default | ibp (Shi et al. 2021)
    "reg_lambda": 0.0,                      # λ of the warm-up regularizers (Shi et al. 2021: 0.5)
    "reg_tau": 0.5,                         # τ of the warm-up regularizers (Shi et al. 2021: 0.5)
    "reg_terms": list(REG_TERMS),           # tightness and / or relu
    "reg_min_eps": 1e-6,                    # ε of the regularizer's bounds while the training ε is 0
    "l1": 0.0,                              # weight of the L1 norm of the Linear / Conv weights
    "lambda_ratio": 0.4,                    # sabr: small-box radius / ε (Müller et al. 2023, MNIST 0.1)
    "alpha": 0.01,                          # mtl_ibp: weight of the IBP loss (De Palma et al. 2024, MNIST 0.1)
    "attack": None,                         # sabr / mtl_ibp / pgd: see certtrain.attacks.AttackConfig
}


def _number(where: str, v: Any, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    if ok:
        f = float(v)
        ok = (f > low if low_open else f >= low) and (f < high if high_open else f <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{where} must be a number in {lo}{low:g}, {high:g}{hi}, got {v!r}")
    return float(v)


def check_method_options(name: str, options: Mapping[str, Any], norm: float | str = "inf",
                         where: str = "method") -> dict[str, Any]:
    """Validated options of training method ``name`` (the keys of :data:`METHOD_OPTIONS`, defaults
    filled in; ``attack`` becomes an :class:`~certtrain.attacks.AttackConfig` dict for the methods
    that attack, else None).  Raises ValueError naming the bad ``where.key`` and what it accepts."""
    if name not in METHODS:
        raise ValueError(f"unknown {where}.name {name!r}; available: {', '.join(METHODS)}")
    unknown = sorted(k for k in options if k not in METHOD_OPTIONS and k != "name")
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(f'{where}.{k}' for k in unknown)}; available: "
                         f"{', '.join(sorted(METHOD_OPTIONS))}")
    o = {k: d if options.get(k) is None else options[k] for k, d in METHOD_OPTIONS.items()}
    for k in ("kappa_start", "kappa_end", "beta_start", "beta_end", "alpha"):
        o[k] = _number(f"{where}.{k}", o[k], 0.0, 1.0)
    o["lambda_ratio"] = _number(f"{where}.lambda_ratio", o["lambda_ratio"], 0.0, 1.0, low_open=True)
    o["reg_lambda"] = _number(f"{where}.reg_lambda", o["reg_lambda"], 0.0)
    o["reg_tau"] = _number(f"{where}.reg_tau", o["reg_tau"], 0.0, 1.0, low_open=True)
    o["reg_min_eps"] = _number(f"{where}.reg_min_eps", o["reg_min_eps"], 0.0, low_open=True)
    o["l1"] = _number(f"{where}.l1", o["l1"], 0.0)
    if o["init"] not in INITS:
        raise ValueError(f"{where}.init must be one of {', '.join(INITS)}, got {o['init']!r}")
    terms = o["reg_terms"]
    if isinstance(terms, str) or not isinstance(terms, Sequence) or not terms or any(t not in REG_TERMS for t in terms):
        raise ValueError(f"{where}.reg_terms must be a non-empty list of {', '.join(REG_TERMS)}, got {terms!r}")
    o["reg_terms"] = list(dict.fromkeys(terms))
    if not isinstance(o["loss_fusion"], bool):
        raise ValueError(f"{where}.loss_fusion must be true or false, got {o['loss_fusion']!r}")
    if o["reg_lambda"] > 0 and name not in BOUND_METHODS:
        raise ValueError(f"{where}.reg_lambda > 0 needs bounds, but method {name!r} computes none; use one of "
                         f"{', '.join(BOUND_METHODS)} or set {where}.reg_lambda=0")
    if name == "sabr" and parse_norm(norm) != math.inf:
        raise ValueError("method sabr propagates L∞ boxes: use perturbation.norm=inf (perturbation=linf)")
    if name in ATTACK_METHODS:
        o["attack"] = AttackConfig.from_mapping(o["attack"], f"{where}.attack", ATTACK_DEFAULTS[name]).as_dict()
    else:
        o["attack"] = None
    return o


def sabr_box(x: Tensor, x_adv: Tensor, eps: float, lambda_ratio: float, x_min: float = 0.0,
             x_max: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SABR's propagation region (Müller et al. 2023, Sec. 3): the box of radius λ·ε around the
    adversarial point, shifted to lie inside B = [x - ε, x + ε] ∩ [x_min, x_max].

    Returns (centre, radius, lo, hi), with lo/hi the corners of B.  Where B is narrower than 2λε
    (clipped by the domain) the radius shrinks to half of B's width there, so at λ = 1 the box is B.
    """
    lo, hi = (x - eps).clamp(min=x_min), (x + eps).clamp(max=x_max)
    radius = torch.minimum(torch.full_like(x, lambda_ratio * eps), (hi - lo) / 2)
    centre = torch.maximum(torch.minimum(x_adv, hi - radius), lo + radius)
    return centre, radius, lo, hi


def parse_norm(norm: float | str) -> float:
    """``inf`` / ``linf`` / ``2`` / ``l2`` → math.inf or 2.0 (ValueError otherwise: the PGD attack has no L1)."""
    s = str(norm).strip().lower()
    s = s[1:] if s.startswith("l") else s
    try:
        value = math.inf if s in ("inf", "infinity", "∞") else float(s)
    except ValueError:
        value = float("nan")
    if value not in (math.inf, 2.0):
        raise ValueError(f"unsupported perturbation norm {norm!r}: use inf (linf) or 2 (l2)")
    return value


def _check_eps(name: str, eps: Any) -> float:
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {eps!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")
    return value


def _check_val_bounds(bounds: Any) -> tuple[str, ...]:
    """Canonical names of the bounds of ``val/verified_acc_target`` (IBP, CROWN-IBP)."""
    items = [bounds] if isinstance(bounds, str) else list(bounds or ())
    out = []
    for b in items:
        try:
            name = resolve_method(str(b))
        except (ValueError, NotImplementedError):
            name = None
        if name not in VAL_BOUNDS:
            raise ValueError(f"eval.val_bounds: unknown bound {b!r}; use a list of {', '.join(VAL_BOUNDS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"eval.val_bounds is empty; give one or more of {', '.join(VAL_BOUNDS)}")
    return tuple(out)


@contextmanager
def frozen_bn_stats(net: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode keep their running statistics (the bound engine's clean pass)."""
    saved = []
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class CertifiedModule(pl.LightningModule):
    """Certified training of ``model`` (inputs in pixel space; ``Normalize(mean, std)`` is prepended).

    ``method``: one of :data:`METHODS`.  ``eps`` is the training target ε, ``eval_eps`` the ε of
    evaluation (default ``eps``).  ``schedule``: config of the ramp shared by ε (0 → eps), κ
    (kappa_start → kappa_end) and β (beta_start → beta_end); see :func:`certtrain.schedules.build_schedule`.
    ``milestones`` (epochs) / ``gamma``: MultiStepLR.  ``test_crown``: also verify with CROWN in
    test (True / False / "auto": when the model has at most ``crown_max_neurons`` ReLU neurons).
    ``val_bounds``: bounds of ``val/verified_acc_target`` (verified at ``eval_eps`` by any of them).
    Method options (see :data:`METHOD_OPTIONS` and :func:`check_method_options`): ``init``,
    ``reg_lambda`` / ``reg_tau`` / ``reg_terms`` / ``reg_min_eps`` (warm-up regularizers), ``l1``,
    ``lambda_ratio`` (sabr), ``alpha`` (mtl_ibp), ``attack`` (sabr / mtl_ibp / pgd).
    ``config``: the resolved run config, stored in checkpoints as ``checkpoint["certtrain_config"]``.

    BatchNorm: the running statistics are updated by the clean forward pass of each training step
    only; attacks (``attack.bn_eval``) run in eval mode, and bound / adversarial passes use their own
    batch statistics without updating the running ones.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        method: str = "ibp",
        norm: float | str = "inf",
        eps: float = 0.1,
        eval_eps: float | None = None,
        schedule: Mapping[str, Any] | None = None,
        kappa_start: float = 1.0,
        kappa_end: float = 0.5,
        beta_start: float = 1.0,
        beta_end: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        milestones: Sequence[float] = (),
        gamma: float = 0.1,
        val_pgd_steps: int = 5,
        pgd_steps: int = 20,
        pgd_restarts: int = 1,
        pgd_step_size: float | None = None,
        test_crown: bool | str = "auto",
        crown_max_neurons: int = 10_000,
        bound_opts: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        loss_fusion: bool = False,
        init: str = "default",
        reg_lambda: float = 0.0,
        reg_tau: float = 0.5,
        reg_terms: Sequence[str] = REG_TERMS,
        reg_min_eps: float = 1e-6,
        l1: float = 0.0,
        lambda_ratio: float = 0.4,
        alpha: float = 0.01,
        attack: Mapping[str, Any] | None = None,
        val_bounds: Sequence[str] = ("IBP",),
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
        opts = check_method_options(method, dict(
            kappa_start=kappa_start, kappa_end=kappa_end, beta_start=beta_start, beta_end=beta_end,
            loss_fusion=bool(loss_fusion), init=init, reg_lambda=reg_lambda, reg_tau=reg_tau,
            reg_terms=list(reg_terms), reg_min_eps=reg_min_eps, l1=l1, lambda_ratio=lambda_ratio, alpha=alpha,
            attack=None if attack is None else dict(attack)), norm=norm)
        self.method = method
        self.norm = parse_norm(norm)
        self.eps = _check_eps("eps", eps)
        self.eval_eps = self.eps if eval_eps is None else _check_eps("eval_eps", eval_eps)
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if method == "natural":
            opts["kappa_start"] = opts["kappa_end"] = 1.0
        self.num_classes = int(num_classes)
        if opts["init"] == "ibp":
            ibp_init(model)
        if method == "fast_ibp":
            n_bn, n_layers = count_batchnorm(model)
            if n_bn < n_layers - 1:
                warnings.warn(f"fast_ibp: the model has {n_bn} BatchNorm layer(s) for {n_layers} Linear/Conv layers; "
                              "Shi et al. 2021 put BatchNorm after every layer but the last and found it crucial for "
                              "short warm-ups (e.g. model=cnn_7layer_bn)", stacklevel=2)
        self.net = nn.Sequential(Normalize(mean, std), model)
        sched = dict(schedule or {"name": "constant"})
        self.eps_schedule: Schedule = build_schedule(sched, 0.0, self.eps)
        self.kappa_schedule: Schedule = build_schedule(sched, opts["kappa_start"], opts["kappa_end"])
        self.beta_schedule: Schedule = build_schedule(sched, opts["beta_start"], opts["beta_end"])
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.milestones, self.gamma = [float(m) for m in milestones], float(gamma)
        self.val_pgd_steps, self.pgd_steps = int(val_pgd_steps), int(pgd_steps)
        self.pgd_restarts = int(pgd_restarts)
        self.pgd_step_size = None if pgd_step_size is None else float(pgd_step_size)
        if test_crown != "auto" and not isinstance(test_crown, bool):
            raise ValueError(f"test_crown must be true, false or 'auto', got {test_crown!r}")
        self.test_crown: bool | str = test_crown
        self.crown_max_neurons = int(crown_max_neurons)
        self.bound_opts = dict(bound_opts or {})
        self.val_bounds = _check_val_bounds(val_bounds)
        self.config = config
        self.loss_fusion = opts["loss_fusion"]
        self.init = opts["init"]
        self.reg_lambda, self.reg_tau = opts["reg_lambda"], opts["reg_tau"]
        self.reg_terms, self.reg_min_eps = tuple(opts["reg_terms"]), opts["reg_min_eps"]
        self.l1, self.lambda_ratio, self.alpha = opts["l1"], opts["lambda_ratio"], opts["alpha"]
        self.attack = AttackConfig.from_mapping(opts["attack"]) if opts["attack"] is not None else None
        self.__dict__["_bounded"] = None  # built lazily from the first batch; not a submodule
        self.__dict__["_bounded_loss"] = None
        self.save_hyperparameters(ignore=["model", "config"])

    # ------------------------------------------------------------------ helpers
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def bounded(self, example: Tensor) -> BoundedModule:
        """The bound engine around ``self.net`` (traced once, from one example input)."""
        if self.__dict__["_bounded"] is None:
            was_training = self.net.training
            self.net.eval()  # the check run must not touch BN statistics (batch of one)
            try:
                self.__dict__["_bounded"] = BoundedModule(self.net, example[:1].detach(), bound_opts=self.bound_opts)
            finally:
                self.net.train(was_training)
        return self.__dict__["_bounded"]

    def steps_per_epoch(self) -> int:
        """Optimizer steps per training epoch (the unit of the schedules)."""
        trainer = self._trainer
        if trainer is None:
            return 1
        n = trainer.num_training_batches
        if not math.isfinite(n) or n <= 0:  # train loader not set up yet (e.g. sanity check)
            try:
                n = len(trainer.datamodule.train_dataloader())  # type: ignore[union-attr]
            except Exception:
                return self.__dict__.get("_spe", 1)
        spe = max(1, math.ceil(n / max(1, trainer.accumulate_grad_batches)))
        self.__dict__["_spe"] = spe
        return spe

    def scheduled(self, step: int | None = None) -> tuple[float, float, float]:
        """(ε, κ, β) at global step ``step`` (default: the trainer's global step)."""
        step = self.global_step if step is None else step
        spe = self.steps_per_epoch()
        return (self.eps_schedule.value(step, spe), self.kappa_schedule.value(step, spe),
                self.beta_schedule.value(step, spe))

    def eps_reached(self) -> bool:
        """Whether the training ε has reached its target at the current global step."""
        return self.eps_schedule.value(self.global_step, self.steps_per_epoch()) >= self.eps

    def relu_neurons(self, example: Tensor) -> int:
        """Number of ReLU outputs per example (what makes CROWN expensive)."""
        count = [0]
        hooks = [m.register_forward_hook(lambda mod, inp, out: count.__setitem__(0, count[0] + out[0].numel()))
                 for m in self.net.modules() if isinstance(m, nn.ReLU)]
        try:
            with torch.no_grad():
                self.net(example[:1])
        finally:
            for h in hooks:
                h.remove()
        return count[0]

    def use_crown(self, example: Tensor) -> bool:
        """Whether test verifies with CROWN too (``test_crown``; "auto": small models only)."""
        if self.test_crown == "auto":
            self.test_crown = self.relu_neurons(example) <= self.crown_max_neurons
        return bool(self.test_crown)

    def margin_bounds(self, x: Tensor, y: Tensor, eps: float | Tensor, method: str = "IBP",
                      keep_intermediate: bool = False, perturbation: PerturbationLpNorm | None = None) -> Tensor:
        """Lower bounds (B, K-1) of the margins z_y - z_j over the ε-ball around x within [0, 1]
        (or over ``perturbation`` around x).  ``keep_intermediate``: keep the per-node bounds for
        :meth:`intermediate_bounds` (the warm-up regularizers)."""
        C = margin_spec(y, self.num_classes).to(x.dtype)
        ptb = perturbation or PerturbationLpNorm(norm=self.norm, eps=eps, x_L=0.0, x_U=1.0)
        bx = BoundedTensor(x, ptb)
        net = self.bounded(x)
        with frozen_bn_stats(self.net):  # the clean forward of self.net already updated them
            lb, _ = net.compute_bounds(x=(bx,), method=method, C=C, bound_upper=False,
                                       keep_intermediate=keep_intermediate)
        return lb

    def intermediate_bounds(self) -> tuple[tuple[Tensor, Tensor], list[tuple[Tensor, Tensor]]]:
        """(normalised input box, pre-activation boxes) of the last bound call made with
        ``keep_intermediate=True``: what the regularizers of Shi et al. 2021 read.  The input box is
        taken after ``Normalize`` (as in their code, where the data are normalised)."""
        net = self.__dict__["_bounded"]
        inter = net.save_intermediate()
        lo, hi = inter[net.input_names[0]]
        normalize = self.net[0]
        return (normalize(lo), normalize(hi)), [inter[n] for n in net.pre_activation_names() if n in inter]

    def bounded_loss(self, example: Tensor) -> BoundedModule:
        """The bound engine around the per-example cross-entropy of ``self.net`` (loss fusion)."""
        if self.__dict__["_bounded_loss"] is None:
            was_training = self.net.training
            self.net.eval()
            try:
                oh = one_hot(torch.zeros(1, dtype=torch.long, device=example.device), self.num_classes, example)
                self.__dict__["_bounded_loss"] = BoundedModule(
                    CrossEntropyBound(self.net), (example[:1].detach(), oh), bound_opts=self.bound_opts)
            finally:
                self.net.train(was_training)
        return self.__dict__["_bounded_loss"]

    def fused_loss_bound(self, x: Tensor, y: Tensor, eps: float) -> Tensor:
        """Per-example upper bound (B,) of the worst-case cross-entropy by CROWN-IBP on the loss
        itself: one backward row per example instead of K-1 (loss fusion)."""
        oh = one_hot(y, self.num_classes, x)
        bx = BoundedTensor(x, PerturbationLpNorm(norm=self.norm, eps=eps, x_L=0.0, x_U=1.0))
        net = self.bounded_loss(x)
        with frozen_bn_stats(self.net):
            _, ub = net.compute_bounds(x=(bx, oh), method="CROWN-IBP", bound_lower=False)
        return ub.squeeze(1)

    def training_bound(self, x: Tensor, y: Tensor, eps: float, beta: float, keep_intermediate: bool = False) -> Tensor:
        """The bound of the training method: IBP, or β·CROWN-IBP + (1-β)·IBP for crown_ibp."""
        if self.method == "crown_ibp" and beta > 0:
            lb_ci = self.margin_bounds(x, y, eps, "CROWN-IBP", keep_intermediate=keep_intermediate and beta >= 1)
            if beta >= 1:
                return lb_ci
            # CROWN-IBP's intermediate bounds are IBP's: keep those of the IBP call
            return beta * lb_ci + (1 - beta) * self.margin_bounds(x, y, eps, "IBP", keep_intermediate)
        return self.margin_bounds(x, y, eps, "IBP", keep_intermediate)

    def adversarial(self, x: Tensor, y: Tensor, eps: float) -> Tensor:
        """The method's attack (``self.attack``) on x in the ε-ball within [0, 1], BN statistics untouched."""
        if self.attack is None:
            raise RuntimeError(f"method {self.method!r} has no attack")
        with frozen_bn_stats(self.net):
            return self.attack.run(self.net, x, y, eps, norm=self.norm)

    def sabr_bounds(self, x: Tensor, y: Tensor, eps: float, x_adv: Tensor, keep_intermediate: bool = False) -> Tensor:
        """IBP margin lower bounds over SABR's small box (:func:`sabr_box`) around ``x_adv``."""
        centre, radius, lo, hi = sabr_box(x, x_adv, eps, self.lambda_ratio)
        ptb = PerturbationLpNorm(norm=math.inf, eps=radius, x_L=lo, x_U=hi)
        return self.margin_bounds(centre, y, eps, "IBP", keep_intermediate, perturbation=ptb)

    def adversarial_ce(self, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(mean CE, accuracy) of the model at the adversarial points (BN statistics untouched)."""
        with frozen_bn_stats(self.net):
            logits = self.net(x_adv)
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()

    def robust_loss(self, x: Tensor, y: Tensor, eps: float, beta: float, nat: Tensor, keep_intermediate: bool = False,
                    lb_ibp: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor], bool]:
        """The method's robust loss at ε (> 0) and what to log (keys without prefix); the bool says
        whether intermediate bounds were kept (``keep_intermediate``).  ``lb_ibp``: IBP margin bounds
        over the ε-ball already computed (validation reuses them)."""
        m, log = self.method, {}
        if m == "natural":
            return nat, log, False
        if m == "crown_ibp" and self.loss_fusion and beta > 0:
            # Both terms are upper bounds of the worst-case loss, so is their mix.
            rob = beta * self.fused_loss_bound(x, y, eps).mean()
            if beta < 1:
                lb = self.margin_bounds(x, y, eps, "IBP", keep_intermediate) if lb_ibp is None else lb_ibp
                rob = rob + (1 - beta) * robust_ce(lb)
                log["verified_acc_ibp"] = verified(lb).float().mean()
                return rob, log, keep_intermediate and lb_ibp is None
            return rob, log, False
        if m == "crown_ibp":
            if beta == 0 and lb_ibp is not None:
                lb = lb_ibp
            else:
                lb = self.training_bound(x, y, eps, beta, keep_intermediate)
            log["verified_acc"] = verified(lb).float().mean()
            return robust_ce(lb), log, keep_intermediate and (lb_ibp is None or beta > 0)
        if m in ("ibp", "fast_ibp", "mtl_ibp"):
            lb = self.margin_bounds(x, y, eps, "IBP", keep_intermediate) if lb_ibp is None else lb_ibp
            ibp_loss = robust_ce(lb)
            log["verified_acc"] = verified(lb).float().mean()
            if m != "mtl_ibp":
                return ibp_loss, log, keep_intermediate and lb_ibp is None
            # De Palma et al. 2024, Eq. (4): α·L_IBP + (1 - α)·L_adv
            adv_loss, adv_acc = self.adversarial_ce(self.adversarial(x, y, eps), y)
            log.update(ibp_loss=ibp_loss, adv_loss=adv_loss, adv_acc=adv_acc)
            return self.alpha * ibp_loss + (1 - self.alpha) * adv_loss, log, keep_intermediate and lb_ibp is None
        x_adv = self.adversarial(x, y, eps)
        if m == "pgd":
            adv_loss, adv_acc = self.adversarial_ce(x_adv, y)
            log.update(adv_loss=adv_loss, adv_acc=adv_acc)
            return adv_loss, log, False
        # sabr: IBP over the small box around the adversarial point (Müller et al. 2023, Eq. (3))
        lb = self.sabr_bounds(x, y, eps, x_adv, keep_intermediate)
        log["small_box_acc"] = verified(lb).float().mean()
        return robust_ce(lb), log, keep_intermediate

    def regularizer(self, x: Tensor, y: Tensor, eps: float, have_intermediate: bool) -> tuple[Tensor | None, dict]:
        """Weighted warm-up regularizers of Shi et al. 2021 at ε (None once their weight is 0).

        They read the bounds of the method's own bound computation when kept, else IBP bounds over
        the max(ε, reg_min_eps)-ball around x (during the ε = 0 epochs, as the authors' code)."""
        if self.reg_lambda <= 0:
            return None, {}
        w = warmup_weight(self.reg_lambda, eps, self.eps)
        log: dict[str, Any] = {"reg_weight": w}
        if w <= 0:
            return None, log
        if not have_intermediate:
            self.margin_bounds(x, y, max(eps, self.reg_min_eps), "IBP", keep_intermediate=True)
        inputs, pre = self.intermediate_bounds()
        terms = warmup_regularizer(inputs, pre, self.reg_tau, self.reg_terms)
        log.update({f"reg_{k}": v for k, v in terms.items() if k != "total"})
        return w * terms["total"], log

    def l1_norm(self) -> Tensor:
        """Σ |W| over the Linear / Conv weights (the L1 term of Müller et al. 2023 / De Palma et al. 2024)."""
        weights = [m.weight for m in self.net.modules()
                   if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        return torch.stack([w.abs().sum() for w in weights]).sum()

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        eps, kappa, beta = self.scheduled()
        m = self.method
        fused = self.loss_fusion and m == "crown_ibp"
        reg_on = self.reg_lambda > 0 and warmup_weight(self.reg_lambda, eps, self.eps) > 0
        # The engine's forward keeps its node values, so a following bound around x reuses this pass.
        around_x = m in ("ibp", "fast_ibp", "mtl_ibp") or (m == "crown_ibp" and not fused)
        engine = m in BOUND_METHODS and ((eps > 0 and around_x) or (eps == 0 and reg_on))
        logits = self.bounded(x)(x) if engine else self.net(x)
        nat = F.cross_entropy(logits, y)
        log: dict[str, Any] = {"nat_loss": nat, "acc": (logits.argmax(1) == y).float().mean(), "eps": eps,
                               "kappa": kappa}
        kept = False
        if m == "natural":
            loss = nat
        else:
            if eps > 0:
                rob, extra, kept = self.robust_loss(x, y, eps, beta, nat, keep_intermediate=reg_on)
                log.update(extra)
            else:  # at ε = 0 every robust loss is the clean CE
                rob = nat
            loss = kappa * nat + (1 - kappa) * rob
            log["robust_loss"] = rob
            if m == "crown_ibp":
                log["beta"] = beta
        reg, reg_log = self.regularizer(x, y, eps, kept)
        log.update(reg_log)
        if reg is not None:
            loss = loss + reg
            log["reg_loss"] = reg
        if self.l1 > 0:
            l1 = self.l1 * self.l1_norm()
            loss = loss + l1
            log["l1_loss"] = l1
        log["loss"] = loss
        self.log_dict({f"train/{k}": v for k, v in log.items()}, on_step=True, on_epoch=False, prog_bar=False,
                      batch_size=len(y))
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        eps, _, beta = self.scheduled()
        logits = self.bounded(x)(x) if eps > 0 else self.net(x)
        clean = logits.argmax(1) == y
        nat = F.cross_entropy(logits, y)
        extra: dict[str, Tensor] = {}
        if eps > 0:
            lb_cur = self.margin_bounds(x, y, eps, "IBP")
            rob, extra, _ = self.robust_loss(x, y, eps, beta, nat, lb_ibp=lb_cur)
            extra.pop("verified_acc", None)  # = val/verified_acc below
        else:
            lb_cur, rob = None, nat
        ver_cur = verified(lb_cur) if lb_cur is not None else clean
        ver_tgt = clean.clone()
        if self.eval_eps > 0:
            ver_tgt = torch.zeros_like(clean)
            for b in self.val_bounds:
                ver_tgt |= verified(self.margin_bounds(x, y, self.eval_eps, b))
        pgd = pgd_accuracy(self.net, x, y, self.eval_eps, norm=self.norm, steps=self.val_pgd_steps,
                           step_size=self.pgd_step_size, restarts=1) & clean
        f = lambda t: t.float().mean()  # noqa: E731
        self.log_dict({
            "val/clean_acc": f(clean), "val/verified_acc": f(ver_cur), "val/verified_acc_target": f(ver_tgt),
            "val/pgd_acc": f(pgd), "val/nat_loss": nat, "val/robust_loss": rob,
            **{f"val/{k}": v for k, v in extra.items()},
        }, on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log_dict({"val/eps": eps, "val/eps_reached": float(self.eps_reached())},
                      on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log("val_acc", f(ver_tgt), prog_bar=True, logger=False, batch_size=len(y), sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        eps = self.eval_eps
        clean = self.net(x).argmax(1) == y
        pgd = pgd_accuracy(self.net, x, y, eps, norm=self.norm, steps=self.pgd_steps, step_size=self.pgd_step_size,
                           restarts=self.pgd_restarts) & clean
        methods = ["ibp", "crown_ibp"] + (["crown"] if self.use_crown(x) else [])
        any_ver = torch.zeros_like(clean)
        out = {"test/clean_acc": clean.float().mean(), "test/pgd_acc": pgd.float().mean()}
        for m in methods:
            ver = verified(self.margin_bounds(x, y, eps, m)) if eps > 0 else clean
            any_ver |= ver
            out[f"test/verified_acc_{m}"] = ver.float().mean()
        out["test/verified_acc"] = any_ver.float().mean()
        out["test/unsound"] = (any_ver & ~pgd).float().mean()  # verified but attacked: must stay 0
        self.log_dict(out, on_epoch=True, batch_size=len(y), sync_dist=True)

    # ------------------------------------------------------------------ optim / ckpt
    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if not self.milestones:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(round(m)) for m in self.milestones],
                                                     gamma=self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.config is not None:
            checkpoint["certtrain_config"] = self.config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        old = checkpoint.get("certtrain_config")
        if not old or not self.config:
            return
        changed = [k for k in ("method", "perturbation", "schedule") if old.get(k) != self.config.get(k)]
        if changed:
            warnings.warn(f"resuming from a checkpoint trained with different {', '.join(changed)} settings; "
                          "the schedules follow the current config from the restored global step", stacklevel=2)


def module_from_config(cfg: Any, model: nn.Module | None = None) -> CertifiedModule:
    """Build a CertifiedModule from a composed run config (``train.yaml``); ``model`` defaults to ``cfg.model``."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    dm_cls = _locate_target("dataset", cfg.dataset._target_)
    if model is None:
        _locate_target("model", cfg.model._target_)
        model = instantiate(cfg.model, _convert_="all")
    p, m, s, o, e = cfg.perturbation, cfg.method, cfg.schedule, cfg.optim, cfg.eval
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # e.g. ${hydra:...} outside a Hydra run
        config = OmegaConf.to_container(cfg, resolve=False)
    method = OmegaConf.to_container(m, resolve=True)
    options = {k: method[k] for k in METHOD_OPTIONS if method.get(k) is not None}
    options.setdefault("kappa_start", 1.0)  # a method config without κ keeps the clean loss (as before)
    options.setdefault("kappa_end", 1.0)
    return CertifiedModule(
        model=model, mean=dm_cls.mean, std=dm_cls.std, num_classes=cfg.dataset.num_classes,
        method=m.name, norm=p.norm, eps=p.eps, eval_eps=p.get("eval_eps"),
        schedule=OmegaConf.to_container(s, resolve=True),
        lr=o.lr, weight_decay=o.get("weight_decay", 0.0), milestones=list(o.get("milestones") or []),
        gamma=o.get("gamma", 0.1), val_pgd_steps=e.get("val_pgd_steps", 5), pgd_steps=e.get("pgd_steps", 20),
        pgd_restarts=e.get("pgd_restarts", 1), pgd_step_size=e.get("pgd_step_size"),
        test_crown=e.get("crown", "auto"), crown_max_neurons=e.get("crown_max_neurons", 10_000),
        bound_opts=OmegaConf.to_container(e.bound_opts, resolve=True) if e.get("bound_opts") else None,
        val_bounds=list(e.get("val_bounds") or ["IBP"]), config=config, **options,
    )


def _locate_target(kind: str, target: str) -> Any:
    """The object named by a config's ``_target_``; ValueError naming ``kind`` and the alternatives otherwise."""
    import importlib

    parts = str(target).split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for j, attr in enumerate(parts[i:]):
            if not hasattr(obj, attr):
                names = getattr(obj, "__all__", None) or [n for n in dir(obj) if not n.startswith("_")]
                if kind == "model":  # the zoo's constructors
                    names = [n for n in names if n[:1].islower() and not n.startswith("get_")]
                elif kind == "dataset":
                    names = [n for n in names if n.endswith("DataModule") and n != "CertDataModule"] or names
                raise ValueError(f"unknown {kind} {target!r} ({kind}._target_): {'.'.join(parts[:i + j])!r} has no "
                                 f"{attr!r}; available: {', '.join(sorted(names))}") from None
            obj = getattr(obj, attr)
        return obj
    raise ValueError(f"unknown {kind} {target!r} ({kind}._target_): module {parts[0]!r} cannot be imported")


def load_certified(path: str, map_location: Any = "cpu") -> CertifiedModule:
    """Rebuild a CertifiedModule from a checkpoint's ``certtrain_config`` and load its weights.

    Raises ``FileNotFoundError`` (no such file) or :class:`certtrain.checkpoint_io.CheckpointError`
    (a ValueError: unreadable / corrupted file, no ``certtrain_config``, weights that do not fit the
    architecture the config describes).
    """
    from .checkpoint_io import CheckpointError, check_weights_fit, read_checkpoint

    ckpt = read_checkpoint(path, map_location=map_location)
    config = ckpt.get("certtrain_config")
    if not config:
        raise CheckpointError(f"checkpoint {str(path)!r} has no 'certtrain_config' (not written by certtrain's "
                              "CertifiedModule), so the model and data cannot be rebuilt from it")
    module = module_from_config(config)
    check_weights_fit(ckpt["state_dict"], module, path, config, config)
    module.load_state_dict(ckpt["state_dict"])
    return module
