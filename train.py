"""Certified training entry point (Hydra): fit, then evaluate on the test set and print a table.

    python train.py                                   # digits, cnn_small, IBP, L∞ ε=0.1, CPU
    python train.py method=crown_ibp trainer.max_epochs=5
    python train.py experiment=mnist_ibp_0.3 trainer=gpu
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def check_config(cfg: DictConfig) -> None:
    """Fail fast (ValueError) on settings that cannot work, before any data or model is built: the
    method, threat model, schedule, optimizer and evaluation settings are built (and so checked)
    exactly as the module will build them (`certtrain.settings.check_run_config`)."""
    from certtrain.settings import check_run_config

    check_run_config(cfg)
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist")


def format_table(results: dict[str, float], cfg: DictConfig, n_test: int | None, ckpt: str | None) -> str:
    """Markdown table of the test metrics at the evaluation ε."""
    from certtrain.methods import method_name
    from omegaconf import OmegaConf

    from certtrain.threat import LpBall, build_threat

    threat = build_threat(OmegaConf.to_container(cfg.perturbation, resolve=True))
    if threat.input_kind == "text":
        where = threat.describe()
        attack = f"{threat.attack_name} ({'greedy' if threat.beam == 1 else f'beam {threat.beam}'})"
        unit = "sentences"
    else:
        if isinstance(threat, LpBall):
            where = f"{'L∞' if threat.norm == math.inf else f'L{int(threat.norm)}'} ε = {threat.eval_eps:.4g}"
        else:
            where = threat.describe()
        attack = f"{threat.attack_name} ({cfg.eval.pgd_steps} steps, {cfg.eval.pgd_restarts} restart(s))"
        unit = "images"
    rows = [("clean", "test/clean_acc"),
            (attack, "test/pgd_acc"),
            ("verified: IBP", "test/verified_acc_ibp"),
            ("verified: CROWN-IBP", "test/verified_acc_crown_ibp"),
            ("verified: CROWN", "test/verified_acc_crown"),
            ("verified: best of the above", "test/verified_acc")]
    lines = [f"Test set ({n_test if n_test is not None else '?'} {unit}), {where}, "
             f"{cfg.dataset._target_.rsplit('.', 1)[-1]} / {cfg.model._target_.rsplit('.', 1)[-1]} / "
             f"{method_name(cfg.method)}", "", "| metric | accuracy (%) |", "|---|---:|"]
    for label, key in rows:
        if key in results:
            lines.append(f"| {label} | {100 * float(results[key]):.2f} |")
    lines.append("")
    lines.append(f"checkpoint: {ckpt if ckpt else '(final weights, no checkpoint written)'}")
    return "\n".join(lines)


def setup(cfg: DictConfig) -> dict[str, Any]:
    """Everything that can fail fast, before a trainer exists or a file is written: the config, the
    data files (DatasetNotFoundError naming them), the model, and for a resume (``ckpt_path``) that the
    checkpoint is readable and its weights fit this run's model (CheckpointError naming both models).
    Returns ``{"datamodule", "module"}``; raises ValueError / FileNotFoundError."""
    check_config(cfg)
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from certtrain.checkpoint_io import check_weights_fit, read_checkpoint
    from certtrain.certified_module import _locate_target, module_from_config

    if cfg.get("torch_threads"):
        import torch

        torch.set_num_threads(int(cfg.torch_threads))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    _locate_target("dataset", cfg.dataset._target_)
    datamodule = instantiate(cfg.dataset, _convert_="all")  # plain lists: checkpoints load with weights_only
    if not getattr(datamodule, "download", False) and hasattr(datamodule, "locate"):
        datamodule.locate()  # files on disk? (cheap; DatasetNotFoundError names the missing files)
    module = module_from_config(cfg)
    if cfg.get("ckpt_path"):
        ckpt = read_checkpoint(cfg.ckpt_path)
        check_weights_fit(ckpt["state_dict"], module, cfg.ckpt_path, ckpt.get("certtrain_config"), module.config)
        del ckpt
    return {"datamodule": datamodule, "module": module}


def run(cfg: DictConfig, prepared: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and test as configured; returns the test metrics, checkpoint paths and the trainer.

    ``prepared``: the result of :func:`setup` (computed here when None)."""
    prepared = setup(cfg) if prepared is None else prepared
    import pytorch_lightning as pl
    from hydra.utils import instantiate
    from pytorch_lightning.callbacks import LearningRateMonitor

    from certtrain.callbacks import VerifiedCheckpoint
    from certtrain.checkpoint_io import AtomicCheckpointIO

    datamodule, module = prepared["datamodule"], prepared["module"]
    out_dir = Path(cfg.paths.output_dir)
    ckpt_cb = VerifiedCheckpoint(dirpath=str(out_dir / "checkpoints"), monitor=cfg.checkpoint.monitor,
                                 mode=cfg.checkpoint.mode)
    callbacks: list[Any] = [ckpt_cb]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    # checkpoints are written to a temporary file and renamed: a killed run never leaves a corrupt one
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger,
                                      plugins=[AtomicCheckpointIO()])
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_time = time.perf_counter() - t0
    result: dict[str, Any] = {"trainer": trainer, "module": module, "fit_time": fit_time,
                              "best_ckpt": ckpt_cb.best_model_path or None,
                              "last_ckpt": ckpt_cb.last_model_path or None, "test": {}}
    if cfg.get("test", True):
        ckpt = result["best_ckpt"] or result["last_ckpt"]
        metrics = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
        result["test"] = {k: float(v) for k, v in (metrics[0] if metrics else {}).items()}
        result["test_ckpt"] = ckpt
        if trainer.is_global_zero:
            n_test = len(datamodule.test_set) if datamodule.test_set is not None else None
            print("\n" + format_table(result["test"], cfg, n_test, ckpt))
            print(f"\nfit: {fit_time:.1f} s, output: {out_dir}")
    return result


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        prepared = setup(cfg)
    except (ValueError, FileNotFoundError) as e:  # incl. DatasetNotFoundError, CheckpointError
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    run(cfg, prepared)


if __name__ == "__main__":
    from certtrain.checkpoint_io import quote_path_overrides

    sys.argv[1:] = quote_path_overrides(sys.argv[1:])  # paths like best-epoch=059.ckpt
    main()
