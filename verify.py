"""Verify a checkpoint on its test split: clean, PGD and verified accuracy (cascade and per method).

    python verify.py ckpt=outputs/<date>/<time>/checkpoints/last.ckpt
    python verify.py ckpt=PATH eps=0.2 methods=[IBP,CROWN] subset=1000 batch_size=200 device=cuda
    python verify.py -m ckpt=PATH eps=0.05,0.1,0.2          # one output folder per ε

Rebuilds model and data from the checkpoint alone (its ``certtrain_config``), prints a markdown
summary and writes ``summary.md``, ``summary.json`` and ``samples.csv`` (one row per test image)
into ``out=`` (default ``outputs/verify/<date>/<time>``).  Bad input (no such checkpoint, an
unreadable one, one without certtrain_config, eps < 0, an unknown method ...) prints one line and
exits with code 2 before any long work.  The logic lives in :mod:`certtrain.verification`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig

CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """Check the arguments and load checkpoint, model and data; ValueError / FileNotFoundError on bad input."""
    from certtrain.module import _check_eps, parse_norm
    from certtrain.verification import load_for_verification, make_perturbation, parse_methods, resolve_device

    if not cfg.get("ckpt"):
        raise ValueError("no checkpoint given: python verify.py ckpt=PATH")
    methods = cfg.methods if cfg.methods is not None else []
    methods = parse_methods(list(methods) if isinstance(methods, (list, ListConfig)) else str(methods))
    if cfg.eps is not None:
        _check_eps("eps", cfg.eps)
    if cfg.norm is not None:
        parse_norm(cfg.norm)
    for key, low in (("pgd_steps", 0), ("pgd_restarts", 1), ("batch_size", 1), ("subset", 1)):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise ValueError(f"{key} must be an integer >= {low}, got {v!r}")
    device = resolve_device(cfg.device)
    if cfg.get("torch_threads"):
        import torch

        torch.set_num_threads(int(cfg.torch_threads))
    module, datamodule, config = load_for_verification(cfg.ckpt, subset=cfg.subset, batch_size=cfg.batch_size,
                                                       data_dir=cfg.data_dir)
    p, e = config.get("perturbation", {}), config.get("eval", {})
    eps = cfg.eps if cfg.eps is not None else _pick(p.get("eval_eps"), p.get("eps"))
    if eps is None:
        raise ValueError("the checkpoint has no perturbation.eps: give eps=")
    perturbation = make_perturbation(float(eps), _pick(cfg.norm, p.get("norm", "inf")))
    return {"module": module, "datamodule": datamodule, "config": config, "methods": methods, "device": device,
            "perturbation": perturbation,
            "pgd_steps": int(_pick(cfg.pgd_steps, e.get("pgd_steps", 20))),
            "pgd_restarts": int(_pick(cfg.pgd_restarts, e.get("pgd_restarts", 1))),
            "pgd_step_size": _pick(cfg.pgd_step_size, e.get("pgd_step_size"))}


def output_dir(cfg: DictConfig) -> Path:
    """``out``, except in a -m sweep without an explicit out=: the job's own subdirectory."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN and not any(o.startswith("out=") for o in hc.overrides.task):
            return Path(hc.runtime.output_dir)
    except Exception:  # not inside a Hydra app (tests)
        pass
    return Path(str(cfg.out))


def run(cfg: DictConfig, prepared: dict[str, Any] | None = None) -> dict[str, Any]:
    """Verify as configured, print the summary, write the outputs; returns the result and the paths."""
    from certtrain.verification import verify_dataset

    prepared = prepare(cfg) if prepared is None else prepared
    module, dm, config = prepared["module"], prepared["datamodule"], prepared["config"]
    ptb = prepared["perturbation"]
    loader = dm.test_dataloader()
    t0 = time.perf_counter()
    res = verify_dataset(module.net, loader, ptb, prepared["methods"], num_classes=module.num_classes,
                         pgd_steps=prepared["pgd_steps"], pgd_restarts=prepared["pgd_restarts"],
                         pgd_step_size=prepared["pgd_step_size"], alone=bool(cfg.alone), device=prepared["device"],
                         bound_opts=module.bound_opts, seed=cfg.seed, progress=bool(cfg.progress))
    total = time.perf_counter() - t0
    norm = "L∞" if ptb.norm == math.inf else f"L{int(ptb.norm)}"
    ds = config["dataset"]["_target_"].rsplit(".", 1)[-1]
    model = config["model"]["_target_"].rsplit(".", 1)[-1]
    title = (f"Verification of {cfg.ckpt}\n\nTest set ({res.n} images), {norm} ε = {res.eps:.4g}, {ds} / {model} / "
             f"{config.get('method', {}).get('name', '?')}, device {res.info['device']}")
    text = res.to_markdown(title) + f"\n\ntotal: {total:.1f} s"
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = res.write_csv(out / "samples.csv")
    (out / "summary.md").write_text(text + "\n")
    summary = {**res.summary(), "ckpt": str(cfg.ckpt), "total_seconds": total}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + text + f"\n\noutput: {out} (samples.csv, summary.md, summary.json)")
    if any(res.unsound().values()):
        print(f"WARNING: verified samples broken by PGD: {res.unsound()}", file=sys.stderr)
    return {"result": res, "summary": summary, "out": out, "csv": csv_path, "text": text}


@hydra.main(config_path=CONF_DIR, config_name="verify", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: bad input → one line on stderr and exit code 2."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        prepared = prepare(cfg)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError, DatasetNotFoundError are among them
        print(f"verify.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    run(cfg, prepared)


if __name__ == "__main__":
    from certtrain.checkpoint_io import quote_path_overrides

    sys.argv[1:] = quote_path_overrides(sys.argv[1:])  # paths like best-epoch=059.ckpt
    main()
