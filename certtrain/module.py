"""CertifiedModule: a LightningModule training any classifier with IBP / CROWN-IBP bounds.

loss = κ · CE(clean logits) + (1 - κ) · robust_ce(lb), where lb are lower bounds of the margins
z_y - z_j over the ε-ball (in pixel space [0, 1]); for CROWN-IBP, lb = β·lb_CROWN-IBP + (1-β)·lb_IBP
(Zhang et al. 2020).  ε, κ and β follow schedules of the global step (see certtrain.schedules).
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

from .attacks import pgd_accuracy
from .bounds import BoundedModule, BoundedTensor, PerturbationLpNorm
from .loss_fusion import CrossEntropyBound, one_hot
from .losses import margin_spec, robust_ce, verified
from .schedules import Schedule, build_schedule

__all__ = ["METHODS", "CertifiedModule", "frozen_bn_stats", "load_certified", "module_from_config", "parse_norm"]

METHODS = ("natural", "ibp", "crown_ibp")
_BOUND_NAMES = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN"}


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

    ``method``: natural | ibp | crown_ibp.  ``eps`` is the training target ε, ``eval_eps`` the ε of
    evaluation (default ``eps``).  ``schedule``: config of the ramp shared by ε (0 → eps), κ
    (kappa_start → kappa_end) and β (beta_start → beta_end); see :func:`certtrain.schedules.build_schedule`.
    ``milestones`` (epochs) / ``gamma``: MultiStepLR.  ``test_crown``: also verify with CROWN in
    test (True / False / "auto": when the model has at most ``crown_max_neurons`` ReLU neurons).
    ``config``: the resolved run config, stored in checkpoints as ``checkpoint["certtrain_config"]``.
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
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
        self.method = method
        self.norm = parse_norm(norm)
        self.eps = _check_eps("eps", eps)
        self.eval_eps = self.eps if eval_eps is None else _check_eps("eval_eps", eval_eps)
        for name, v in (("kappa_start", kappa_start), ("kappa_end", kappa_end),
                        ("beta_start", beta_start), ("beta_end", beta_end)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if method == "natural":
            kappa_start = kappa_end = 1.0
        self.num_classes = int(num_classes)
        self.net = nn.Sequential(Normalize(mean, std), model)
        sched = dict(schedule or {"name": "constant"})
        self.eps_schedule: Schedule = build_schedule(sched, 0.0, self.eps)
        self.kappa_schedule: Schedule = build_schedule(sched, float(kappa_start), float(kappa_end))
        self.beta_schedule: Schedule = build_schedule(sched, float(beta_start), float(beta_end))
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
        self.config = config
        self.loss_fusion = bool(loss_fusion)
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

    def margin_bounds(self, x: Tensor, y: Tensor, eps: float, method: str = "IBP") -> Tensor:
        """Lower bounds (B, K-1) of the margins z_y - z_j over the ε-ball around x within [0, 1]."""
        C = margin_spec(y, self.num_classes).to(x.dtype)
        bx = BoundedTensor(x, PerturbationLpNorm(norm=self.norm, eps=eps, x_L=0.0, x_U=1.0))
        net = self.bounded(x)
        with frozen_bn_stats(self.net):  # the clean forward of self.net already updated them
            lb, _ = net.compute_bounds(x=(bx,), method=_BOUND_NAMES.get(method, method), C=C, bound_upper=False)
        return lb

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

    def training_bound(self, x: Tensor, y: Tensor, eps: float, beta: float) -> Tensor:
        """The bound of the training method: IBP, or β·CROWN-IBP + (1-β)·IBP for crown_ibp."""
        if self.method == "crown_ibp" and beta > 0:
            lb_ci = self.margin_bounds(x, y, eps, "CROWN-IBP")
            if beta >= 1:
                return lb_ci
            return beta * lb_ci + (1 - beta) * self.margin_bounds(x, y, eps, "IBP")
        return self.margin_bounds(x, y, eps, "IBP")

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        eps, kappa, beta = self.scheduled()
        # The engine's forward keeps its node values, so the first bound below reuses this pass.
        fused = self.loss_fusion and self.method == "crown_ibp"
        logits = self.bounded(x)(x) if self.method != "natural" and eps > 0 and not fused else self.net(x)
        nat = F.cross_entropy(logits, y)
        log = {"train/nat_loss": nat, "train/acc": (logits.argmax(1) == y).float().mean(),
               "train/eps": eps, "train/kappa": kappa}
        if self.method == "natural":
            loss = nat
        else:
            if eps > 0 and self.loss_fusion and self.method == "crown_ibp" and beta > 0:
                # Both terms are upper bounds of the worst-case loss, so is their mix.
                rob = beta * self.fused_loss_bound(x, y, eps).mean()
                if beta < 1:
                    lb = self.margin_bounds(x, y, eps, "IBP")
                    rob = rob + (1 - beta) * robust_ce(lb)
                    log["train/verified_acc_ibp"] = verified(lb).float().mean()
            elif eps > 0:
                lb = self.training_bound(x, y, eps, beta)
                rob = robust_ce(lb)
                log["train/verified_acc"] = verified(lb).float().mean()
            else:  # at ε = 0 the robust CE is exactly the clean CE
                rob = nat
            loss = kappa * nat + (1 - kappa) * rob
            log["train/robust_loss"] = rob
            if self.method == "crown_ibp":
                log["train/beta"] = beta
        log["train/loss"] = loss
        self.log_dict(log, on_step=True, on_epoch=False, prog_bar=False, batch_size=len(y))
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        eps, _, beta = self.scheduled()
        logits = self.bounded(x)(x) if eps > 0 else self.net(x)
        clean = logits.argmax(1) == y
        nat = F.cross_entropy(logits, y)
        if eps > 0:
            lb_cur = self.margin_bounds(x, y, eps, "IBP")
            lb_train = lb_cur if self.method != "crown_ibp" or beta == 0 else self.training_bound(x, y, eps, beta)
            rob = robust_ce(lb_train)
        else:
            lb_cur, rob = None, nat
        ver_cur = verified(lb_cur) if lb_cur is not None else clean
        ver_tgt = verified(self.margin_bounds(x, y, self.eval_eps, "IBP")) if self.eval_eps > 0 else clean
        pgd = pgd_accuracy(self.net, x, y, self.eval_eps, norm=self.norm, steps=self.val_pgd_steps,
                           step_size=self.pgd_step_size, restarts=1) & clean
        f = lambda t: t.float().mean()  # noqa: E731
        self.log_dict({
            "val/clean_acc": f(clean), "val/verified_acc": f(ver_cur), "val/verified_acc_target": f(ver_tgt),
            "val/pgd_acc": f(pgd), "val/nat_loss": nat, "val/robust_loss": rob,
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
    return CertifiedModule(
        model=model, mean=dm_cls.mean, std=dm_cls.std, num_classes=cfg.dataset.num_classes,
        method=m.name, norm=p.norm, eps=p.eps, eval_eps=p.get("eval_eps"),
        schedule=OmegaConf.to_container(s, resolve=True),
        kappa_start=m.get("kappa_start", 1.0), kappa_end=m.get("kappa_end", 1.0),
        beta_start=m.get("beta_start", 1.0), beta_end=m.get("beta_end", 0.0),
        lr=o.lr, weight_decay=o.get("weight_decay", 0.0), milestones=list(o.get("milestones") or []),
        gamma=o.get("gamma", 0.1), val_pgd_steps=e.get("val_pgd_steps", 5), pgd_steps=e.get("pgd_steps", 20),
        pgd_restarts=e.get("pgd_restarts", 1), pgd_step_size=e.get("pgd_step_size"),
        test_crown=e.get("crown", "auto"), crown_max_neurons=e.get("crown_max_neurons", 10_000),
        bound_opts=OmegaConf.to_container(e.bound_opts, resolve=True) if e.get("bound_opts") else None,
        config=config, loss_fusion=bool(m.get("loss_fusion", False)),
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
