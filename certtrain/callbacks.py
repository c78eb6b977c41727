"""Checkpointing that keeps the best verified accuracy only once ε has reached its target."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor

__all__ = ["VerifiedCheckpoint"]


class VerifiedCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose top-k only considers epochs with ``reached_key`` >= 0.5; last.ckpt every validation.

    Defaults: monitor ``val/verified_acc_target`` (max), top 1, file ``best-epoch=NNN.ckpt``, save_last.
    """

    def __init__(self, reached_key: str = "val/eps_reached", monitor: str = "val/verified_acc_target",
                 mode: str = "max", save_top_k: int = 1, save_last: bool = True,
                 filename: str = "best-epoch={epoch:03d}", auto_insert_metric_name: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(monitor=monitor, mode=mode, save_top_k=save_top_k, save_last=save_last,
                         filename=filename, auto_insert_metric_name=auto_insert_metric_name, **kwargs)
        self.reached_key = reached_key

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        reached = monitor_candidates.get(self.reached_key)
        if reached is None or float(reached) < 0.5:
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # The parent writes last.ckpt only together with a top-k checkpoint, and there is none before
        # ε reaches its target: without this, a run that dies during the ε ramp would leave nothing.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer) \
                and self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # the parent only writes last.ckpt when a top-k checkpoint was written at this step
        if self.save_last and not self._should_skip_saving_checkpoint(trainer) \
                and not self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
