"""Verification of a trained classifier on a dataset: clean accuracy, PGD accuracy and verified accuracy.

    from certtrain.verification import make_perturbation, verify_dataset
    res = verify_dataset(model, loader, make_perturbation(0.1), methods=["IBP", "CROWN-IBP", "CROWN"])
    print(res.to_markdown())
    res.write_csv("samples.csv")

``model`` maps pixel-space inputs (e.g. ``CertifiedModule.net``, which starts with its ``Normalize``)
to logits; ``loader`` yields ``(x, y)`` in a fixed order; the perturbation is a
:class:`certtrain.bounds.PerturbationLpNorm` (L∞ or L2, scalar ε, domain ``[x_L, x_U]``).

Per sample:

* ``clean_correct``: the prediction at x is the label;
* ``pgd_robust``: clean-correct and PGD (random start, ``pgd_restarts`` restarts) finds no
  misclassified input in the ball: PGD accuracy is an *upper* bound of the robust accuracy;
* ``verified_by``: the **cascade** over ``methods`` (cheapest first): a sample is verified by the
  first method whose lower bounds of all margins z_y - z_j are > 0.  Only samples that are
  clean-correct, PGD-robust (a PGD-broken sample cannot be verified) and not verified yet go on to
  the next, more expensive method.  Verified accuracy is a *lower* bound of the robust accuracy;
* each method **alone** (``alone=True``): the method on every clean-correct sample (a misclassified
  sample cannot be verified: a sound lower bound of its margin is < 0), for comparison and timing;
* ``margin_lb[m]``: min over j of the lower bound of z_y - z_j by method m (> 0: verified), NaN
  where m did not run on the sample;
* ``seconds``: the sample's share of the cascade's time (clean pass, attack, each stage it entered).

Bounds are computed under ``torch.no_grad()`` with the model in eval mode.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .attacks import pgd_accuracy
from .bounds import BoundedModule, BoundedTensor, PerturbationLpNorm
from .losses import margin_spec

__all__ = ["METHODS", "VerificationResult", "canonical_method", "load_for_verification", "make_perturbation",
           "margin_lower_bounds", "parse_methods", "resolve_device", "verify_dataset"]

#: the bound methods, cheapest first
METHODS = ("IBP", "CROWN-IBP", "CROWN")
_ALIASES = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown_ibp": "CROWN-IBP", "crownibp": "CROWN-IBP",
            "ibp+backward": "CROWN-IBP", "crown": "CROWN", "backward": "CROWN"}


def canonical_method(name: Any) -> str:
    """``ibp`` / ``crown_ibp`` / ``IBP+backward`` / ``backward`` ... → ``IBP`` | ``CROWN-IBP`` | ``CROWN``."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown verification method {name!r}; available: {', '.join(METHODS)}")
    return _ALIASES[key]


def parse_methods(methods: str | Iterable[Any]) -> list[str]:
    """A list (or a comma-separated string) of method names → canonical names, in the given order."""
    items = [m for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    out = [canonical_method(m) for m in items if str(m).strip()]
    if not out:
        raise ValueError(f"methods is empty; give one or more of {', '.join(METHODS)}")
    dup = sorted({m for m in out if out.count(m) > 1})
    if dup:
        raise ValueError(f"methods lists {', '.join(dup)} more than once")
    return out


def make_perturbation(eps: float, norm: float | str = math.inf, x_L: float = 0.0,
                      x_U: float = 1.0) -> PerturbationLpNorm:
    """The ε-ball (L∞ or L2) within the pixel domain [x_L, x_U]; ValueError for ε < 0 or another norm."""
    from .module import _check_eps, parse_norm

    return PerturbationLpNorm(eps=_check_eps("eps", eps), norm=parse_norm(norm), x_L=x_L, x_U=x_U)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` / None → cuda when available, else cpu; ValueError for an unavailable / unknown device."""
    if device is None or str(device).lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} but CUDA is not available on this machine (use device=cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def margin_lower_bounds(bounded: BoundedModule, x: Tensor, y: Tensor, perturbation: PerturbationLpNorm,
                        method: str, num_classes: int) -> Tensor:
    """Lower bounds (B, K-1) of the margins z_y - z_j over the perturbation set around x (no autograd)."""
    C = margin_spec(y, num_classes).to(x.dtype)
    with torch.no_grad():
        lb, _ = bounded.compute_bounds(x=(BoundedTensor(x, perturbation),), method=method, C=C, bound_upper=False)
    return lb


@dataclass
class VerificationResult:
    """Per-sample results of :func:`verify_dataset` (tensors on CPU, in loader order) and timings."""

    methods: list[str]
    eps: float
    norm: float
    pgd_steps: int
    pgd_restarts: int
    index: Tensor
    label: Tensor
    pred: Tensor
    clean_correct: Tensor
    pgd_robust: Tensor
    verified_by: list[str]
    margin_lb: dict[str, Tensor]
    alone_verified: dict[str, Tensor]
    seconds: Tensor
    time: dict[str, float]
    cascade_in: dict[str, int]
    cascade_verified: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.label)

    @property
    def verified(self) -> Tensor:
        """Boolean (N,): verified by the cascade."""
        return torch.tensor([bool(v) for v in self.verified_by], dtype=torch.bool)

    def unsound(self) -> dict[str, int]:
        """Per method alone and for the cascade: verified samples that PGD broke (must all be 0)."""
        out = {m: int((v & ~self.pgd_robust).sum()) for m, v in self.alone_verified.items()}
        out["cascade"] = int((self.verified & ~self.pgd_robust).sum())
        return out

    def summary(self) -> dict[str, Any]:
        """Counts, accuracies (fractions) and seconds, JSON-serialisable."""
        n = max(self.n, 1)
        s: dict[str, Any] = {
            "n": self.n, "eps": self.eps, "norm": "inf" if self.norm == math.inf else self.norm,
            "methods": list(self.methods), "pgd_steps": self.pgd_steps, "pgd_restarts": self.pgd_restarts,
            "clean": int(self.clean_correct.sum()), "pgd": int(self.pgd_robust.sum()),
            "verified": int(self.verified.sum()),
            "verified_by": {m: sum(v == m for v in self.verified_by) for m in self.methods},
            "alone": {m: int(v.sum()) for m, v in self.alone_verified.items()},
            "cascade_in": dict(self.cascade_in), "cascade_verified": dict(self.cascade_verified),
            "time": dict(self.time), "unsound": self.unsound(), **self.info,
        }
        s["clean_acc"], s["pgd_acc"], s["verified_acc"] = s["clean"] / n, s["pgd"] / n, s["verified"] / n
        s["alone_acc"] = {m: c / n for m, c in s["alone"].items()}
        return s

    def to_markdown(self, title: str | None = None) -> str:
        """Two markdown tables: accuracies (with times) and the cascade's stages."""
        n = self.n
        pct = lambda c: f"{100 * c / max(n, 1):.2f}"  # noqa: E731
        t = {k: float(f"{v:.3g}") for k, v in self.time.items()}  # seconds, 3 significant digits
        cascade_time = float(f"{sum(self.time.get(f'cascade:{m}', 0.0) for m in self.methods):.3g}")
        rs = "restart" if self.pgd_restarts == 1 else "restarts"
        lines = [title, ""] if title else []
        lines += ["| metric | accuracy (%) | count | time (s) |", "|---|---:|---:|---:|",
                  f"| clean | {pct(int(self.clean_correct.sum()))} | {int(self.clean_correct.sum())}/{n} | "
                  f"{t.get('clean', 0.0):g} |",
                  f"| PGD ({self.pgd_steps} steps, {self.pgd_restarts} {rs}): upper bound | "
                  f"{pct(int(self.pgd_robust.sum()))} | {int(self.pgd_robust.sum())}/{n} | {t.get('pgd', 0.0):g} |",
                  f"| verified: cascade {' → '.join(self.methods)} | {pct(int(self.verified.sum()))} | "
                  f"{int(self.verified.sum())}/{n} | {cascade_time:g} |"]
        for m, v in self.alone_verified.items():
            lines.append(f"| verified: {m} alone | {pct(int(v.sum()))} | {int(v.sum())}/{n} | "
                         f"{t.get(f'alone:{m}', 0.0):g} |")
        bad = self.unsound()
        if any(bad.values()):
            lines.append(f"| **verified but broken by PGD (unsound!)** | | {bad} | |")
        lines += ["", "| cascade stage | method | samples in | verified | time (s) | ms / sample |",
                  "|---:|---|---:|---:|---:|---:|"]
        for i, m in enumerate(self.methods, 1):
            k, sec = self.cascade_in.get(m, 0), t.get(f"cascade:{m}", 0.0)
            lines.append(f"| {i} | {m} | {k} | {self.cascade_verified.get(m, 0)} | {sec:g} | "
                         f"{1000 * sec / k if k else 0.0:.3g} |")
        return "\n".join(lines)

    def csv_columns(self) -> list[str]:
        return (["index", "label", "pred", "clean_correct", "pgd_robust", "verified_by"]
                + [f"margin_lb_{m}" for m in self.methods] + ["seconds"])

    def write_csv(self, path: str | os.PathLike) -> Path:
        """One row per sample (empty margin cell: the method did not run on that sample)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.csv_columns())
            for i in range(self.n):
                lbs = []
                for m in self.methods:
                    v = float(self.margin_lb[m][i])
                    lbs.append("" if math.isnan(v) else f"{v:.6g}")
                w.writerow([int(self.index[i]), int(self.label[i]), int(self.pred[i]), int(self.clean_correct[i]),
                            int(self.pgd_robust[i]), self.verified_by[i], *lbs, f"{float(self.seconds[i]):.6f}"])
        return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def verify_dataset(model: nn.Module, loader: Iterable[Sequence[Tensor]], perturbation: PerturbationLpNorm,
                   methods: Sequence[str] = METHODS, *, num_classes: int | None = None, pgd_steps: int = 20,
                   pgd_restarts: int = 1, pgd_step_size: float | None = None, alone: bool = True,
                   device: str | torch.device | None = None, bound_opts: Mapping[str, Any] | None = None,
                   seed: int | None = 0, progress: bool = True, desc: str = "verify") -> VerificationResult:
    """Clean, PGD and verified accuracy of ``model`` on ``loader`` (see the module docstring).

    ``perturbation``: a :class:`PerturbationLpNorm` with a scalar ε (L∞ or L2; its ``x_L``/``x_U`` also
    bound the attack).  ``methods``: the cascade's order (names as :func:`canonical_method`).
    ``alone``: also run every method on all clean-correct samples.  ``device``: auto / cpu / cuda[:N]
    (default: where the model is).  ``seed``: seeds PGD's random starts (None: leave the RNG alone).
    """
    from .module import parse_norm

    methods = parse_methods(methods)
    if not isinstance(perturbation, PerturbationLpNorm) or isinstance(perturbation.eps, Tensor):
        raise ValueError("perturbation must be a PerturbationLpNorm with a scalar eps")
    eps, norm = float(perturbation.eps), parse_norm(perturbation.norm)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {perturbation.eps!r}")
    if int(pgd_steps) < 0 or int(pgd_restarts) < 1:
        raise ValueError(f"need pgd_steps >= 0 and pgd_restarts >= 1, got {pgd_steps}, {pgd_restarts}")
    if device is None:
        p = next(iter(model.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
    else:
        dev = resolve_device(device)
    x_min = float(perturbation.x_L) if perturbation.x_L is not None else -math.inf
    x_max = float(perturbation.x_U) if perturbation.x_U is not None else math.inf
    if seed is not None:
        torch.manual_seed(int(seed))

    was_training = model.training
    model = model.to(dev).eval()
    bounded: BoundedModule | None = None
    times = {"clean": 0.0, "pgd": 0.0, **{f"cascade:{m}": 0.0 for m in methods},
             **({f"alone:{m}": 0.0 for m in methods} if alone else {})}
    cascade_in = {m: 0 for m in methods}
    cascade_ver = {m: 0 for m in methods}
    cols: dict[str, list[Tensor]] = {k: [] for k in ("label", "pred", "clean", "pgd", "seconds", "by")}
    lbs: dict[str, list[Tensor]] = {m: [] for m in methods}
    alone_v: dict[str, list[Tensor]] = {m: [] for m in methods}
    n_seen = n_clean = n_pgd = n_ver = 0

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(loader, total=total, desc=desc, unit="batch", disable=not progress or tqdm is None,
               dynamic_ncols=True) if tqdm is not None else loader

    def timed(fn):
        _sync(dev)
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        return out, time.perf_counter() - t0

    try:
        for batch in bar:
            x, y = batch[0].to(dev), batch[1].to(dev).long()
            B = len(y)
            sec = torch.zeros(B, dtype=torch.float64)
            with torch.no_grad():
                logits, t = timed(lambda: model(x))
            K = int(num_classes) if num_classes is not None else int(logits.shape[1])
            times["clean"] += t
            sec += t / B
            pred = logits.argmax(1)
            clean = pred == y
            robust = clean.clone()
            ci = clean.nonzero().flatten()
            if eps > 0 and len(ci) and pgd_steps > 0:
                ok, t = timed(lambda: pgd_accuracy(model, x[ci], y[ci], eps, norm=norm, steps=int(pgd_steps),
                                                   step_size=pgd_step_size, restarts=int(pgd_restarts),
                                                   x_min=x_min, x_max=x_max))
                robust[ci] = ok
                times["pgd"] += t
                sec[ci.cpu()] += t / len(ci)
            batch_lb = {m: torch.full((B,), math.nan, dtype=torch.float64) for m in methods}
            by = [""] * B
            if eps == 0:  # the ball is the point itself: the margins are exact
                true = (logits.gather(1, y[:, None]) - logits).masked_fill(
                    torch.nn.functional.one_hot(y, K).bool(), math.inf).min(1).values.double().cpu()
                for m in methods:
                    batch_lb[m] = true.clone()
                    if alone:
                        alone_v[m].append(clean.cpu())
                by = [methods[0] if c else "" for c in clean.tolist()]
                cascade_in[methods[0]] += int(clean.sum())
                cascade_ver[methods[0]] += int(clean.sum())
            else:
                if bounded is None:
                    bounded = BoundedModule(model, x[:1], bound_opts=dict(bound_opts or {}))
                # the cascade: clean-correct, PGD-robust, not yet verified
                todo = robust.nonzero().flatten()
                for m in methods:
                    if len(todo) == 0:
                        break
                    lb, t = timed(lambda: margin_lower_bounds(bounded, x[todo], y[todo], perturbation, m, K))
                    mins = lb.min(1).values.double().cpu()
                    times[f"cascade:{m}"] += t
                    cascade_in[m] += len(todo)
                    tc = todo.cpu()
                    sec[tc] += t / len(todo)
                    batch_lb[m][tc] = mins
                    ok = mins > 0
                    for i in tc[ok].tolist():
                        by[i] = m
                    cascade_ver[m] += int(ok.sum())
                    todo = todo[~ok.to(todo.device)]
                if alone:
                    for m in methods:
                        v = torch.zeros(B, dtype=torch.bool)
                        if len(ci):
                            lb, t = timed(lambda: margin_lower_bounds(bounded, x[ci], y[ci], perturbation, m, K))
                            mins = lb.min(1).values.double().cpu()
                            times[f"alone:{m}"] += t
                            batch_lb[m][ci.cpu()] = mins
                            v[ci.cpu()] = mins > 0
                        alone_v[m].append(v)
            cols["label"].append(y.cpu())
            cols["pred"].append(pred.cpu())
            cols["clean"].append(clean.cpu())
            cols["pgd"].append(robust.cpu())
            cols["seconds"].append(sec)
            cols["by"].append(by)  # type: ignore[arg-type]
            for m in methods:
                lbs[m].append(batch_lb[m])
            n_seen += B
            n_clean += int(clean.sum())
            n_pgd += int(robust.sum())
            n_ver += sum(1 for b in by if b)
            if tqdm is not None and hasattr(bar, "set_postfix"):
                bar.set_postfix(clean=f"{100 * n_clean / n_seen:.1f}%", pgd=f"{100 * n_pgd / n_seen:.1f}%",
                                verified=f"{100 * n_ver / n_seen:.1f}%")
    finally:
        if hasattr(bar, "close"):
            bar.close()
        model.train(was_training)

    cat = lambda v, dtype: torch.cat(v) if v else torch.zeros(0, dtype=dtype)  # noqa: E731
    label = cat(cols["label"], torch.long)
    return VerificationResult(
        methods=methods, eps=eps, norm=norm, pgd_steps=int(pgd_steps), pgd_restarts=int(pgd_restarts),
        index=torch.arange(len(label)), label=label, pred=cat(cols["pred"], torch.long),
        clean_correct=cat(cols["clean"], torch.bool), pgd_robust=cat(cols["pgd"], torch.bool),
        verified_by=[b for bs in cols["by"] for b in bs],  # type: ignore[union-attr]
        margin_lb={m: cat(v, torch.float64) for m, v in lbs.items()},
        alone_verified={m: cat(v, torch.bool) for m, v in alone_v.items()} if alone else {},
        seconds=cat(cols["seconds"], torch.float64), time=times, cascade_in=cascade_in,
        cascade_verified=cascade_ver, info={"device": str(dev)})


def load_for_verification(ckpt_path: str | os.PathLike, *, subset: int | None = None, batch_size: int | None = None,
                          data_dir: str | os.PathLike | None = None, map_location: Any = "cpu"):
    """Rebuild the module and the datamodule from a checkpoint alone (its ``certtrain_config``).

    Returns ``(module, datamodule, config)``; the datamodule is set up for the test split and its
    files are checked (DatasetNotFoundError).  ``subset``: the first N test images (default: the
    checkpoint's ``dataset.test_subset``); ``batch_size``: test batch size (default: the
    checkpoint's ``dataset.eval_batch_size``); ``data_dir``: where the dataset lives now.
    Raises FileNotFoundError / :class:`certtrain.checkpoint_io.CheckpointError` (a ValueError).
    """
    from hydra.utils import instantiate

    from .checkpoint_io import CheckpointError, check_weights_fit, read_checkpoint
    from .module import _locate_target, module_from_config

    if subset is not None and (int(subset) != subset or int(subset) <= 0):
        raise ValueError(f"subset must be a positive integer, got {subset!r}")
    if batch_size is not None and (int(batch_size) != batch_size or int(batch_size) <= 0):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    ckpt = read_checkpoint(ckpt_path, map_location=map_location)
    config = ckpt.get("certtrain_config")
    if not config:
        raise CheckpointError(f"checkpoint {str(ckpt_path)!r} has no 'certtrain_config' (not written by certtrain's "
                              "CertifiedModule), so the model and data cannot be rebuilt from it")
    if not isinstance(config.get("dataset"), Mapping) or not isinstance(config.get("model"), Mapping):
        raise CheckpointError(f"checkpoint {str(ckpt_path)!r}: its certtrain_config has no dataset / model section")
    ds = dict(config["dataset"])
    _locate_target("dataset", ds["_target_"])
    module = module_from_config(config)
    check_weights_fit(ckpt["state_dict"], module, ckpt_path, config, config)
    module.load_state_dict(ckpt["state_dict"])
    del ckpt
    if subset is not None:
        ds["test_subset"] = int(subset)
    if batch_size is not None:
        ds["eval_batch_size"] = int(batch_size)
    if data_dir is not None:
        ds["data_dir"] = str(data_dir)
    ds["num_workers"] = 0  # in-memory tensors: workers only add start-up time
    ds["download"] = False
    datamodule = instantiate(ds, _convert_="all")
    datamodule.setup("test")
    return module, datamodule, config
