"""CertifiedModule: a LightningModule training any classifier with a certified-training method.

loss = κ · CE(clean logits) + (1 - κ) · L_robust (+ warm-up regularizers + L1), where L_robust is
the robust loss of the training method (a `certtrain.methods.TrainingMethod`: ibp, fast_ibp,
crown_ibp, sabr, mtl_ibp, pgd, natural) over the threat model (a `certtrain.threat.ThreatModel`,
e.g. the ε-ball within [0, 1] in pixel space).

ε, κ and β follow schedules of the global step (see certtrain.schedules).  The bound maths lives in
certtrain.bounds, the methods' losses in certtrain.methods, the attacks in certtrain.attacks, the
regularizers in certtrain.regularizers and the initialization in certtrain.initialization.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, Union

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bounds import BoundedModule, BoundedTensor, Perturbation, PerturbationLpNorm
from .initialization import count_batchnorm, ibp_init
from .loss_fusion import CrossEntropyBound, one_hot
from .losses import margin_spec, verified
from .methods import METHODS, TrainingMethod, build_method
from .normalize import Normalize
from .regularizers import warmup_regularizer, warmup_weight
from .schedules import Schedule, build_schedule
from .settings import EvalSettings, OptimSettings
from .threat import ThreatModel, build_threat

__all__ = ["METHODS", "CertifiedModule", "frozen_bn_stats", "load_certified", "module_from_config", "sabr_box"]


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

    ``method``: a `TrainingMethod` (or its name, or a config mapping); ``perturbation``: a
    `ThreatModel` (or a mapping; default the L∞ ball of radius 0.1 in [0, 1]) with the training
    target ``eps`` and the evaluation radius ``eval_eps``; ``schedule``: config of the ramp shared
    by ε (0 → eps), κ and β (see :func:`certtrain.schedules.build_schedule`); ``optim`` /
    ``evaluation``: `OptimSettings` / `EvalSettings` (or their mappings, the ``optim`` / ``eval``
    sections of ``conf/train.yaml``).  ``config``: the resolved run config, stored in checkpoints
    as ``checkpoint["certtrain_config"]``.

    BatchNorm: the running statistics are updated by the clean forward pass of each training step
    only; attacks (``attack.bn_eval``) run in eval mode, and bound / adversarial passes use their own
    batch statistics without updating the running ones.
    """

    def __init__(self, model: nn.Module, mean: tuple, std: tuple, num_classes: int,
                 method: Union[TrainingMethod, str, Mapping[str, Any]] = "ibp",
                 perturbation: Union[ThreatModel, Mapping[str, Any], None] = None,
                 schedule: Mapping[str, Any] | None = None,
                 optim: Union[OptimSettings, Mapping[str, Any], None] = None,
                 evaluation: Union[EvalSettings, Mapping[str, Any], None] = None,
                 config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.method: TrainingMethod = build_method(method)
        self.threat: ThreatModel = build_threat(perturbation)
        self.method.check_threat(self.threat)
        if self.threat.input_kind == "text" and mean is not None:
            raise ValueError("word substitutions perturb a text classifier's embeddings: use a text dataset "
                             "(dataset=movie_reviews or sst2) and model (model=lstm or transformer), which "
                             "certtrain.text_module.TextCertifiedModule trains")
        self.optim = OptimSettings.from_mapping(optim)
        self.evaluation = EvalSettings.from_mapping(evaluation)
        self.num_classes = int(num_classes)
        if self.method.init == "ibp":
            ibp_init(model)
        if self.method.name == "fast_ibp":
            n_bn, n_layers = count_batchnorm(model)
            if n_bn < n_layers - 1:
                warnings.warn(f"fast_ibp: the model has {n_bn} BatchNorm layer(s) for {n_layers} Linear/Conv layers; "
                              "Shi et al. 2021 put BatchNorm after every layer but the last and found it crucial for "
                              "short warm-ups (e.g. model=cnn_7layer_bn)", stacklevel=2)
        self.threat.prepare_model(model)  # e.g. a weight ball's BoundedParameters, before any tracing
        # mean None: the model takes its inputs as they are (text models, `certtrain.text_module`)
        self.net = nn.Sequential(Normalize(mean, std), model) if mean is not None else model
        sched = dict(schedule or {"name": "constant"})
        m = self.method
        self.eps_schedule: Schedule = build_schedule(sched, 0.0, self.eps)
        self.kappa_schedule: Schedule = build_schedule(sched, m.kappa_start, m.kappa_end)
        beta = m.beta() or (0.0, 0.0)
        self.beta_schedule: Schedule = build_schedule(sched, beta[0], beta[1])
        self.test_crown: bool | str = self.evaluation.crown
        self.config = config
        self.__dict__["_bounded"] = None  # built lazily from the first batch; not a submodule
        self.__dict__["_bounded_loss"] = None
        # Plain values only (checkpoints load with weights_only=True).
        self.save_hyperparameters({"method": {"name": m.name, **m.options()}, "perturbation": repr(self.threat),
                                   "schedule": sched, "optim": self.optim.as_dict(), "eval": self.evaluation.as_dict(),
                                   "num_classes": self.num_classes})

    # ------------------------------------------------------------------ the run's settings
    @property
    def eps(self) -> float:
        """The training target ε."""
        return self.threat.eps

    @property
    def eval_eps(self) -> float:
        """The ε of validation and test."""
        return self.threat.eval_eps

    @property
    def val_bounds(self) -> tuple[str, ...]:
        return tuple(self.evaluation.val_bounds)

    # ------------------------------------------------------------------ helpers
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def clean_logits(self, x: Tensor, engine: bool = False) -> Tensor:
        """Logits at the clean input; ``engine``: through the bound engine, whose forward keeps its
        node values so that a following bound computation around x reuses the pass."""
        return self.bounded(x)(x) if engine else self.net(x)

    def perturbation_at(self, eps: float | Tensor, x: Tensor | None = None) -> Perturbation:
        """The threat model's set of radius ``eps`` (what the bound engine gets; ``x``: the clean
        input, for sets built around it such as the L0 ramp's)."""
        return self.threat.at(eps, x=x)

    def _bound_input(self, x: Tensor, eps: float | Tensor, perturbation: Perturbation | None = None
                     ) -> tuple[Tensor, Any]:
        """(the engine's input, a context for the bound call): the set around x, or for a weight
        threat the plain x with the model's BoundedParameters perturbed during the call."""
        if perturbation is None and self.threat.perturbs == "weights":
            return x, self.threat.perturbing(self.net, eps)
        return BoundedTensor(x, perturbation or self.perturbation_at(eps, x)), nullcontext()

    def bounded(self, example: Tensor) -> BoundedModule:
        """The bound engine around ``self.net`` (traced once, from one example input)."""
        if self.__dict__["_bounded"] is None:
            was_training = self.net.training
            self.net.eval()  # the check run must not touch BN statistics (batch of one)
            try:
                self.__dict__["_bounded"] = BoundedModule(self.net, example[:1].detach(),
                                                          bound_opts=self.evaluation.bound_opts)
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
                self(self.first_example(example))
        finally:
            for h in hooks:
                h.remove()
        return count[0]

    def first_example(self, x: Tensor) -> Tensor:
        """The batch's first example, as a batch of one."""
        return x[:1]

    def use_crown(self, example: Tensor) -> bool:
        """Whether test verifies with CROWN too (``eval.crown``; "auto": small models only)."""
        if self.test_crown == "auto":
            self.test_crown = self.relu_neurons(example) <= self.evaluation.crown_max_neurons
        return bool(self.test_crown)

    def margin_bounds(self, x: Tensor, y: Tensor, eps: float | Tensor, method: str = "IBP",
                      keep_intermediate: bool = False, perturbation: Perturbation | None = None) -> Tensor:
        """Lower bounds (B, K-1) of the margins z_y - z_j over the threat model's set of radius ε
        around x (or over ``perturbation`` around x; for a weight threat: over its parameter set, x
        fixed).  ``keep_intermediate``: keep the per-node bounds for :meth:`intermediate_bounds` (the
        warm-up regularizers)."""
        C = margin_spec(y, self.num_classes).to(x.dtype)
        bx, perturbing = self._bound_input(x, eps, perturbation)
        net = self.bounded(x)
        with perturbing, frozen_bn_stats(self.net):  # the clean forward of self.net already updated them
            lb, _ = net.compute_bounds(x=(bx,), method=method, C=C, bound_upper=False,
                                       keep_intermediate=keep_intermediate)
        return lb

    def intermediate_bounds(self) -> tuple[tuple[Tensor, Tensor], list[tuple[Tensor, Tensor]]]:
        """(normalised input box, pre-activation boxes) of the last bound call made with
        ``keep_intermediate=True``: what the regularizers of Shi et al. 2021 read.  The input box is
        taken after ``Normalize`` (as in their code, where the data are normalised)."""
        net = self.__dict__["_bounded"]
        inter = net.save_intermediate()
        pre = [inter[n] for n in net.pre_activation_names() if n in inter]
        if net.input_names[0] not in inter:  # a weight threat: the input is a point
            zero = pre[0][0].new_zeros(1) if pre else torch.zeros(1)
            return (zero, zero), pre
        lo, hi = inter[net.input_names[0]]
        normalize = self.net[0]
        return (normalize(lo), normalize(hi)), pre

    def bounded_loss(self, example: Tensor) -> BoundedModule:
        """The bound engine around the per-example cross-entropy of ``self.net`` (loss fusion)."""
        if self.__dict__["_bounded_loss"] is None:
            was_training = self.net.training
            self.net.eval()
            try:
                oh = one_hot(torch.zeros(1, dtype=torch.long, device=example.device), self.num_classes, example)
                self.__dict__["_bounded_loss"] = BoundedModule(
                    CrossEntropyBound(self.net), (example[:1].detach(), oh), bound_opts=self.evaluation.bound_opts)
            finally:
                self.net.train(was_training)
        return self.__dict__["_bounded_loss"]

    def fused_loss_bound(self, x: Tensor, y: Tensor, eps: float) -> Tensor:
        """Per-example upper bound (B,) of the worst-case cross-entropy by CROWN-IBP on the loss
        itself: one backward row per example instead of K-1 (loss fusion)."""
        oh = one_hot(y, self.num_classes, x)
        bx, perturbing = self._bound_input(x, eps)
        net = self.bounded_loss(x)
        with perturbing, frozen_bn_stats(self.net):
            _, ub = net.compute_bounds(x=(bx, oh), method="CROWN-IBP", bound_lower=False)
        return ub.squeeze(1)

    def adversarial(self, x: Tensor, y: Tensor, eps: float) -> Tensor:
        """The method's attack on x in the threat model's set of radius ε, BN statistics untouched."""
        attack = self.method.attack
        if attack is None:
            raise RuntimeError(f"method {self.method.name!r} has no attack")
        if self.threat.attack_norm is None:
            raise RuntimeError(f"the threat model {self.threat!r} has no attack")
        with frozen_bn_stats(self.net):
            return attack.run(self.net, x, y, eps, norm=self.threat.attack_norm)

    def adversarial_ce(self, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(mean CE, accuracy) of the model at the adversarial points (BN statistics untouched)."""
        with frozen_bn_stats(self.net):
            logits = self.net(x_adv)
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()

    def sabr_bounds(self, x: Tensor, y: Tensor, eps: float, x_adv: Tensor, lambda_ratio: float | None = None,
                    keep_intermediate: bool = False) -> Tensor:
        """IBP margin lower bounds over SABR's small box (:func:`sabr_box`) around ``x_adv``
        (``lambda_ratio``: default the method's)."""
        if lambda_ratio is None:
            lambda_ratio = self.method.lambda_ratio
        centre, radius, lo, hi = sabr_box(x, x_adv, eps, lambda_ratio, self.threat.x_L, self.threat.x_U)
        ptb = PerturbationLpNorm(norm=math.inf, eps=radius, x_L=lo, x_U=hi)
        return self.margin_bounds(centre, y, eps, "IBP", keep_intermediate, perturbation=ptb)

    def robust_loss(self, x: Tensor, y: Tensor, eps: float, beta: float, nat: Tensor, keep_intermediate: bool = False,
                    lb_ibp: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor], bool]:
        """The method's robust loss at ε (see `TrainingMethod.robust_loss`)."""
        return self.method.robust_loss(self, x, y, eps, beta, nat, keep_intermediate, lb_ibp)

    def regularizer(self, x: Tensor, y: Tensor, eps: float, have_intermediate: bool) -> tuple[Tensor | None, dict]:
        """Weighted warm-up regularizers of Shi et al. 2021 at ε (None once their weight is 0).

        They read the bounds of the method's own bound computation when kept, else IBP bounds over
        the max(ε, reg_min_eps)-ball around x (during the ε = 0 epochs, as the authors' code)."""
        m = self.method
        if m.reg_lambda <= 0:
            return None, {}
        w = warmup_weight(m.reg_lambda, eps, self.eps)
        log: dict[str, Any] = {"reg_weight": w}
        if w <= 0:
            return None, log
        if not have_intermediate:
            self.margin_bounds(x, y, max(eps, m.reg_min_eps), "IBP", keep_intermediate=True)
        inputs, pre = self.intermediate_bounds()
        terms = warmup_regularizer(inputs, pre, m.reg_tau, m.reg_terms)
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
        reg_on = m.reg_lambda > 0 and warmup_weight(m.reg_lambda, eps, self.eps) > 0
        # The engine's forward keeps its node values, so a following bound around x reuses this pass.
        engine = m.needs_bounds and ((eps > 0 and m.bounds_around_x()) or (eps == 0 and reg_on))
        logits = self.clean_logits(x, engine)
        nat = F.cross_entropy(logits, y)
        log: dict[str, Any] = {"nat_loss": nat, "acc": (logits.argmax(1) == y).float().mean(), "eps": eps,
                               "kappa": kappa}
        kept = False
        if m.name == "natural":
            loss = nat
        else:
            if eps > 0:
                rob, extra, kept = self.robust_loss(x, y, eps, beta, nat, keep_intermediate=reg_on)
                log.update(extra)
            else:  # at ε = 0 every robust loss is the clean CE
                rob = nat
            loss = kappa * nat + (1 - kappa) * rob
            log["robust_loss"] = rob
            if m.beta() is not None:
                log["beta"] = beta
        reg, reg_log = self.regularizer(x, y, eps, kept)
        log.update(reg_log)
        if reg is not None:
            loss = loss + reg
            log["reg_loss"] = reg
        if m.l1 > 0:
            l1 = m.l1 * self.l1_norm()
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
        logits = self.clean_logits(x, eps > 0)
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
        e = self.evaluation
        pgd = self.pgd_robust(x, y, self.eval_eps, e.val_pgd_steps, 1) & clean
        f = lambda t: t.float().mean()  # noqa: E731
        self.log_dict({
            "val/clean_acc": f(clean), "val/verified_acc": f(ver_cur), "val/verified_acc_target": f(ver_tgt),
            "val/pgd_acc": f(pgd), "val/nat_loss": nat, "val/robust_loss": rob,
            **{f"val/{k}": v for k, v in extra.items()},
        }, on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log_dict({"val/eps": eps, "val/eps_reached": float(self.eps_reached())},
                      on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log("val_acc", f(ver_tgt), prog_bar=True, logger=False, batch_size=len(y), sync_dist=True)

    def pgd_robust(self, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int) -> Tensor:
        """Per example: the threat model's attack (PGD for Lp balls, `certtrain.attacks.l0_attack`,
        PGD on the weights) finds no misclassified point in its set (True where no attack applies:
        nothing is known against the certificate then)."""
        ok = self.threat.attack_accuracy(self.net, x, y, eps, steps=steps, restarts=restarts,
                                         step_size=self.evaluation.pgd_step_size)
        return torch.ones_like(y, dtype=torch.bool) if ok is None else ok

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        eps = self.eval_eps
        e = self.evaluation
        clean = self(x).argmax(1) == y
        pgd = self.pgd_robust(x, y, eps, e.pgd_steps, e.pgd_restarts) & clean
        methods = ["ibp", "crown_ibp"] + (["crown"] if self.use_crown(x) else [])
        any_ver = torch.zeros_like(clean)
        out = {"test/clean_acc": clean.float().mean(), "test/pgd_acc": pgd.float().mean()}
        for name in methods:
            ver = verified(self.margin_bounds(x, y, eps, name)) if eps > 0 else clean
            any_ver |= ver
            out[f"test/verified_acc_{name}"] = ver.float().mean()
        out["test/verified_acc"] = any_ver.float().mean()
        out["test/unsound"] = (any_ver & ~pgd).float().mean()  # verified but attacked: must stay 0
        self.log_dict(out, on_epoch=True, batch_size=len(y), sync_dist=True)

    # ------------------------------------------------------------------ optim / ckpt
    def configure_optimizers(self) -> Any:
        o = self.optim
        opt = torch.optim.Adam(self.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        if not o.milestones:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(round(m)) for m in o.milestones],
                                                     gamma=o.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.config is not None:
            checkpoint["certtrain_config"] = self.config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        old = checkpoint.get("certtrain_config")
        if not old or not self.config:
            return
        from .checkpoint_io import upgrade_config

        old = upgrade_config(old)
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
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # e.g. ${hydra:...} outside a Hydra run
        config = OmegaConf.to_container(cfg, resolve=False)
    plain = lambda x: OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x  # noqa: E731
    if getattr(dm_cls, "is_text", False):
        from .text_module import TextCertifiedModule

        return TextCertifiedModule(
            model=model, num_classes=cfg.dataset.num_classes, method=plain(cfg.method),
            perturbation=plain(cfg.perturbation), schedule=plain(cfg.schedule), optim=plain(cfg.optim),
            evaluation=plain(cfg.get("eval")), config=config)
    return CertifiedModule(
        model=model, mean=dm_cls.mean, std=dm_cls.std, num_classes=cfg.dataset.num_classes,
        method=plain(cfg.method), perturbation=plain(cfg.perturbation), schedule=plain(cfg.schedule),
        optim=plain(cfg.optim), evaluation=plain(cfg.get("eval")), config=config)


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
