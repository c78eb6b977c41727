"""Verification of a trained classifier on a dataset: clean accuracy, PGD accuracy and verified accuracy.

    from certtrain.verification import make_perturbation, verify_dataset
    res = verify_dataset(model, loader, make_perturbation(0.1),
                         methods=["IBP", "CROWN-IBP", "CROWN", "alpha-CROWN"])
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
* ``status``: ``verified`` | ``not verified`` (every stage ran, none proved it) | ``not attempted``
  (a stage limit skipped it and no other stage proved it: undecided, never counted as verified) |
  ``PGD-broken`` | ``misclassified``;
* each method **alone** (``alone``): the method on every clean-correct sample (a misclassified
  sample cannot be verified: a sound lower bound of its margin is < 0), for comparison and timing;
* ``margin_lb[m]``: min over j of the lower bound of z_y - z_j by method m (> 0: verified), NaN
  where m did not run on the sample (the cascade's value where both the cascade and alone ran);
* ``seconds``: the sample's share of the cascade's time (clean pass, attack, each stage it entered).

Cost control for the expensive stages (CROWN, α-CROWN), per method: ``method_batch_size`` splits
what the method sees into sub-batches (memory; the bounds are per sample, so verdicts do not
change); ``max_samples`` / ``time_limit`` (seconds) cap a stage per call, counted over the whole
loader in its order and checked before each sub-batch (so a stage may overrun its time by one
sub-batch).  The samples a capped stage skips go on to the next stage; those that no stage
verifies are ``not attempted``.  The same caps apply, separately, to each method's alone run.

Bounds are computed under ``torch.no_grad()`` with the model in eval mode.  α-CROWN (Xu et al.
2021, "Fast and complete", §3.1: CROWN with the lower slopes α of unstable ReLUs optimised by
gradient ascent on the bound) runs its own gradient steps inside the engine.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .attacks import l0_accuracy, pgd_accuracy
from .bounds import (BoundedModule, BoundedTensor, Perturbation, PerturbationL0Norm, PerturbationLpNorm,
                     bab_verify)
from .bounds.methods import ALPHA_RULES, CHEAP_METHODS, METHOD_NAMES, check_alpha_opts, resolve_method
from .losses import margin_spec
from .threat import L0Ball, LpBall, ThreatModel, WeightBall, WeightBallSet, check_eps, check_l0_budget

__all__ = ["ALPHA_CROWN_OPTIONS", "CHEAP_METHODS", "METHODS", "STATUSES", "InputSetTask", "VerificationResult",
           "VerificationTask", "WeightSetTask", "accuracy_curve", "canonical_method", "check_engine_supports",
           "eps_table", "load_for_verification", "make_perturbation", "make_task", "margin_lower_bounds",
           "parse_alpha_crown_options", "parse_method_options", "parse_methods", "resolve_device", "run_verification",
           "verify_dataset", "write_samples_csv"]

#: the bound methods, cheapest first (the engine's registry, certtrain.bounds.methods), then branch
#: and bound ("BaB": certtrain.bounds.bab_verify per sample, complete for ReLU networks on L∞ boxes)
BAB = "BaB"
METHODS = (*METHOD_NAMES, BAB)
#: per-sample verdicts (``VerificationResult.status``)
STATUSES = ("verified", "not verified", "not attempted", "PGD-broken", "misclassified")
#: α-CROWN options (the engine's ``optimize_bound_args``) and what each must be here (a stage of 0
#: steps would be CROWN again, so at least one)
ALPHA_CROWN_OPTIONS = {**ALPHA_RULES, "iteration": "an integer >= 1"}


def canonical_method(name: Any) -> str:
    """``ibp`` / ``crown_ibp`` / ``backward`` / ``alpha_crown`` ... → ``IBP`` | ``CROWN-IBP`` | ``CROWN`` | ``alpha-CROWN``."""
    if str(name).strip().lower().replace("_", "-") in ("bab", "branch-and-bound", "beta-crown", "β-crown"):
        return BAB
    try:
        return resolve_method(str(name))
    except (ValueError, NotImplementedError):
        raise ValueError(f"unknown verification method {name!r}; available: {', '.join(METHODS)}") from None


def parse_methods(methods: str | Iterable[Any]) -> list[str]:
    """A list (or a comma-separated string) of method names → canonical names, in the given order."""
    items = [m for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    out = [canonical_method(m) for m in items if str(m).strip()]
    if not out:
        raise ValueError(f"methods is empty; give one or more of {', '.join(METHODS)}")
    dup = sorted({m for m in out if out.count(m) > 1})
    if dup:
        raise ValueError(f"methods lists {', '.join(dup)} more than once")
    if BAB in out and out[-1] != BAB:
        raise ValueError(f"{BAB} (branch and bound) must be the last method of the cascade, got {', '.join(out)}")
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_method_options(name: str, values: Mapping[str, Any] | None, *, integer: bool, minimum: float,
                         methods: Sequence[str] | None = None) -> dict[str, Any]:
    """``{method: value}`` (e.g. ``method_batch_size``) → canonical method names, None values dropped.

    ValueError for a value that is not an integer (``integer``) / a finite number ``>= minimum``, a
    method named twice, an unknown one, or (``methods`` given) one that is not among ``methods``.
    """
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{name} must map methods to values, e.g. {name}={{CROWN:16}}, got {values!r}")
    kind = "an integer" if integer else "a number"
    out: dict[str, Any] = {}
    for key, v in values.items():
        try:
            m = canonical_method(key)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if v is None:
            continue
        if not _is_number(v) or (integer and not isinstance(v, int)) or v < minimum:
            raise ValueError(f"{name}.{m} must be {kind} >= {minimum:g} (or null: no limit), got {v!r}")
        if m in out:
            raise ValueError(f"{name} sets {m} more than once")
        if methods is not None and m not in methods:
            raise ValueError(f"{name} sets {m}, which is not among the methods ({', '.join(methods)}); "
                             f"add it to methods or drop it from {name}")
        out[m] = int(v) if integer else float(v)
    return out


def parse_alpha_crown_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """α-CROWN options (:data:`ALPHA_CROWN_OPTIONS`, None values dropped) → ``optimize_bound_args``,
    checked by the engine's own rules (plus iteration >= 1: a stage of 0 steps would be CROWN again)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"alpha_crown must be a mapping of options ({', '.join(ALPHA_CROWN_OPTIONS)}), got {options!r}")
    out = {k: v for k, v in options.items() if v is not None}
    check_alpha_opts(out, where="alpha_crown")
    it = out.get("iteration")
    if it is not None and it < 1:
        raise ValueError(f"alpha_crown.iteration must be {ALPHA_CROWN_OPTIONS['iteration']}, got {it!r}")
    return out


def make_perturbation(eps: float, norm: float | str = math.inf, x_L: float = 0.0,
                      x_U: float = 1.0) -> PerturbationLpNorm:
    """The ε-ball (L∞ or L2) within the pixel domain [x_L, x_U]; ValueError for ε < 0 or another norm."""
    return LpBall(norm=norm, eps=check_eps("eps", eps), x_L=x_L, x_U=x_U).at(eps)


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


def bab_margin_lower_bounds(bounded: BoundedModule, x: Tensor, C: Tensor, perturbation: PerturbationLpNorm,
                            options: Mapping[str, Any] | None = None) -> Tensor:
    """Branch and bound per sample over the L∞ box of ``perturbation`` around x: (B, rows) lower
    bounds of the margins ``C @ f(x)``, each row the sample's proved bound of its worst margin when
    verified (> 0), else the search's last bound (≤ 0; -inf with a counterexample)."""
    if not (isinstance(perturbation, PerturbationLpNorm) and perturbation.norm == math.inf):
        raise ValueError(f"{BAB} (branch and bound) verifies L∞ boxes, not {type(perturbation).__name__} "
                         f"(norm {getattr(perturbation, 'norm', '?')}): drop {BAB} from methods")
    eps = perturbation.eps if isinstance(perturbation.eps, Tensor) else torch.tensor(float(perturbation.eps))
    lo, hi = x - eps.to(x), x + eps.to(x)
    if perturbation.x_L is not None:
        lo = torch.maximum(lo, torch.as_tensor(perturbation.x_L, dtype=x.dtype, device=x.device))
    if perturbation.x_U is not None:
        hi = torch.minimum(hi, torch.as_tensor(perturbation.x_U, dtype=x.dtype, device=x.device))
    out = torch.empty(C.shape[:2], dtype=torch.float64)
    for i in range(x.shape[0]):
        r = bab_verify(bounded, lo[i:i + 1], hi[i:i + 1], C[i:i + 1], options=dict(options or {}))
        out[i] = r.lower_bound if r.status == "verified" else min(r.lower_bound, 0.0)
    return out.to(x.dtype)


def margin_lower_bounds(bounded: BoundedModule, x: Tensor, y: Tensor, perturbation: PerturbationLpNorm,
                        method: str, num_classes: int,
                        optimize_bound_args: Mapping[str, Any] | None = None,
                        bab_options: Mapping[str, Any] | None = None) -> Tensor:
    """Lower bounds (B, K-1) of the margins z_y - z_j over the perturbation set around x (no autograd).

    ``method``: a name :func:`canonical_method` knows; ``optimize_bound_args``: α-CROWN's options;
    ``bab_options``: branch and bound's (`certtrain.bounds.BaBOptions`, ``timeout`` per sample).
    """
    method = canonical_method(method)
    C = margin_spec(y, num_classes).to(x.dtype)
    if method == BAB:
        return bab_margin_lower_bounds(bounded, x, C, perturbation, bab_options)
    kwargs: dict[str, Any] = {}
    if method == "alpha-CROWN" and optimize_bound_args:
        kwargs["optimize_bound_args"] = dict(optimize_bound_args)
    with torch.no_grad():
        lb, _ = bounded.compute_bounds(x=(BoundedTensor(x, perturbation),), method=method, C=C, bound_upper=False,
                                       **kwargs)
    return lb


def check_engine_supports(methods: Sequence[str], optimize_bound_args: Mapping[str, Any] | None = None) -> None:
    """ValueError if the bound engine lacks one of ``methods`` or rejects α-CROWN's options (tried on a tiny net).

    Costs milliseconds and leaves the global RNG as it was; run it before any long work.
    """
    methods = parse_methods(methods)
    with torch.random.fork_rng(devices=[]):
        net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    x, y = torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)
    bounded = BoundedModule(net, x)
    for m in methods:
        args = {**dict(optimize_bound_args or {}), "iteration": 1} if m == "alpha-CROWN" else None
        try:
            margin_lower_bounds(bounded, x, y, make_perturbation(0.1), m, 2, args)
        except NotImplementedError as e:
            raise ValueError(f"the bound engine does not implement {m} yet ({e}); drop it from methods, "
                             f"e.g. methods=[{','.join(k for k in methods if k != m)}]") from None
        except (TypeError, ValueError) as e:
            if m != "alpha-CROWN":
                raise
            raise ValueError(f"the bound engine rejects the alpha_crown options {dict(optimize_bound_args or {})}: "
                             f"{e}") from None


def _pct(count: int, n: int) -> str:
    return f"{100 * count / max(n, 1):.2f}"


def _sig(v: float) -> float:
    return float(f"{v:.3g}")  # seconds, 3 significant digits


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
    #: per sample, the cascade stages whose limit skipped it
    skipped_by: list[tuple[str, ...]] = field(default_factory=list)
    #: per alone method, the samples it ran on (the clean-correct ones its limits left)
    alone_attempted: dict[str, Tensor] = field(default_factory=dict)
    cascade_skipped: dict[str, int] = field(default_factory=dict)
    #: the limits in force: {"method_batch_size": {...}, "max_samples": {...}, "time_limit": {...}}
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the attack's description (None: PGD with pgd_steps x pgd_restarts), what the tables call the
    #: set's size ("ε", "budget") and the attack ("PGD", "attack")
    attack: Optional[str] = None
    radius_name: str = "ε"
    attack_name: str = "PGD"

    @property
    def n(self) -> int:
        return len(self.label)

    @property
    def verified(self) -> Tensor:
        """Boolean (N,): verified by the cascade."""
        return torch.tensor([bool(v) for v in self.verified_by], dtype=torch.bool)

    @property
    def not_attempted(self) -> Tensor:
        """Boolean (N,): PGD-robust, not verified, and skipped by a stage limit (undecided)."""
        skipped = torch.tensor([bool(s) for s in self.skipped_by] if self.skipped_by else [False] * self.n,
                               dtype=torch.bool)
        return skipped & ~self.verified & self.pgd_robust

    @property
    def status(self) -> list[str]:
        """Per sample, one of :data:`STATUSES`."""
        na = self.not_attempted.tolist()
        out = []
        for i, (c, r, v) in enumerate(zip(self.clean_correct.tolist(), self.pgd_robust.tolist(), self.verified_by)):
            out.append("misclassified" if not c else "PGD-broken" if not r else "verified" if v
                       else "not attempted" if na[i] else "not verified")
        return out

    def verified_by_stages(self, methods: Sequence[str]) -> int | None:
        """Samples verified by the first ``len(methods)`` stages, if ``methods`` is a prefix of the cascade.

        That is what the shorter cascade over ``methods`` verifies (later stages never change what
        earlier ones see); None if ``methods`` is not a prefix.
        """
        methods = list(methods)
        if self.methods[:len(methods)] != methods:
            return None
        return sum(1 for b in self.verified_by if b in methods)

    def unsound(self) -> dict[str, int]:
        """Per method alone and for the cascade: verified samples that PGD broke (must all be 0)."""
        out = {m: int((v & ~self.pgd_robust).sum()) for m, v in self.alone_verified.items()}
        out["cascade"] = int((self.verified & ~self.pgd_robust).sum())
        return out

    def summary(self) -> dict[str, Any]:
        """Counts, accuracies (fractions) and seconds, JSON-serialisable."""
        n = max(self.n, 1)
        status = self.status
        s: dict[str, Any] = {
            "n": self.n, "eps": self.eps, "norm": "inf" if self.norm == math.inf else self.norm,
            "methods": list(self.methods), "pgd_steps": self.pgd_steps, "pgd_restarts": self.pgd_restarts,
            "clean": int(self.clean_correct.sum()), "pgd": int(self.pgd_robust.sum()),
            "verified": int(self.verified.sum()), "not_attempted": int(self.not_attempted.sum()),
            "verified_by": {m: sum(v == m for v in self.verified_by) for m in self.methods},
            "status": {k: status.count(k) for k in STATUSES},
            "alone": {m: int(v.sum()) for m, v in self.alone_verified.items()},
            "alone_attempted": {m: int(v.sum()) for m, v in self.alone_attempted.items()},
            "cascade_in": dict(self.cascade_in), "cascade_verified": dict(self.cascade_verified),
            "cascade_skipped": dict(self.cascade_skipped), "limits": {k: dict(v) for k, v in self.limits.items()},
            "time": dict(self.time), "seconds": sum(self.time.values()), "unsound": self.unsound(),
            "attack": self._pgd_label(), **self.info,
        }
        s["gap"] = s["pgd"] - s["verified"]
        s["clean_acc"], s["pgd_acc"], s["verified_acc"] = s["clean"] / n, s["pgd"] / n, s["verified"] / n
        s["gap_acc"] = s["gap"] / n
        s["alone_acc"] = {m: c / n for m, c in s["alone"].items()}
        return s

    def _pgd_label(self) -> str:
        if self.attack:
            return self.attack
        rs = "restart" if self.pgd_restarts == 1 else "restarts"
        return f"PGD ({self.pgd_steps} steps, {self.pgd_restarts} {rs})"

    def to_markdown(self, title: str | None = None) -> str:
        """Two markdown tables: accuracies (with times) and the cascade's stages."""
        n = self.n
        t = {k: _sig(v) for k, v in self.time.items()}
        cascade_time = _sig(sum(self.time.get(f"cascade:{m}", 0.0) for m in self.methods))
        clean, pgd, ver = int(self.clean_correct.sum()), int(self.pgd_robust.sum()), int(self.verified.sum())
        lines = [title, ""] if title else []
        lines += ["| metric | accuracy (%) | count | time (s) |", "|---|---:|---:|---:|",
                  f"| clean | {_pct(clean, n)} | {clean}/{n} | {t.get('clean', 0.0):g} |",
                  f"| {self._pgd_label()}: upper bound | {_pct(pgd, n)} | {pgd}/{n} | {t.get('pgd', 0.0):g} |",
                  f"| verified: cascade {' → '.join(self.methods)} | {_pct(ver, n)} | {ver}/{n} | {cascade_time:g} |",
                  f"| gap: {self.attack_name} − verified | {_pct(pgd - ver, n)} | {pgd - ver}/{n} | |"]
        na = int(self.not_attempted.sum())
        if na or any(self.cascade_skipped.values()):
            lines.append(f"| not attempted (stage limits; not verified) | {_pct(na, n)} | {na}/{n} | |")
        for m, v in self.alone_verified.items():
            att = self.alone_attempted.get(m)
            note = ""
            if att is not None and int(att.sum()) < clean:
                note = f" ({clean - int(att.sum())} not attempted)"
            lines.append(f"| verified: {m} alone{note} | {_pct(int(v.sum()), n)} | {int(v.sum())}/{n} | "
                         f"{t.get(f'alone:{m}', 0.0):g} |")
        bad = self.unsound()
        if any(bad.values()):
            lines.append(f"| **verified but broken by {self.attack_name} (unsound!)** | | {bad} | |")
        lines += ["", "| cascade stage | method | samples in | skipped (limit) | verified | time (s) | ms / sample |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        for i, m in enumerate(self.methods, 1):
            k, sec = self.cascade_in.get(m, 0), t.get(f"cascade:{m}", 0.0)
            lines.append(f"| {i} | {m} | {k} | {self.cascade_skipped.get(m, 0)} | {self.cascade_verified.get(m, 0)} | "
                         f"{sec:g} | {1000 * sec / k if k else 0.0:.3g} |")
        active = {k: v for k, v in self.limits.items() if v}
        if active:
            lines += ["", "limits: " + "; ".join(f"{k} {v}" for k, v in active.items())]
        return "\n".join(lines)

    def csv_columns(self) -> list[str]:
        return _csv_columns(self.methods)

    def write_csv(self, path: str | os.PathLike) -> Path:
        """One row per sample (empty margin cell: the method did not run on that sample)."""
        return write_samples_csv([self], path)


def _csv_columns(methods: Sequence[str]) -> list[str]:
    return (["eps", "index", "label", "pred", "clean_correct", "pgd_robust", "status", "verified_by", "skipped_by"]
            + [f"margin_lb_{m}" for m in methods] + ["seconds"])


def write_samples_csv(results: Sequence[VerificationResult], path: str | os.PathLike) -> Path:
    """One row per (ε, sample), ε in the given order: columns :meth:`VerificationResult.csv_columns`.

    ``skipped_by``: the cascade stages whose limit skipped the sample (``;``-separated); an empty
    margin cell: the method did not run on that sample at that ε.
    """
    methods: list[str] = []
    for r in results:
        methods += [m for m in r.methods if m not in methods]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_csv_columns(methods))
        for r in results:
            status = r.status
            for i in range(r.n):
                lbs = []
                for m in methods:
                    v = float(r.margin_lb[m][i]) if m in r.margin_lb else math.nan
                    lbs.append("" if math.isnan(v) else f"{v:.6g}")
                skipped = ";".join(r.skipped_by[i]) if r.skipped_by else ""
                w.writerow([f"{r.eps:g}", int(r.index[i]), int(r.label[i]), int(r.pred[i]), int(r.clean_correct[i]),
                            int(r.pgd_robust[i]), status[i], r.verified_by[i], skipped, *lbs,
                            f"{float(r.seconds[i]):.6f}"])
    return path


def accuracy_curve(results: Sequence[VerificationResult], curve_methods: Sequence[str] | None = None
                   ) -> list[dict[str, Any]]:
    """One point per result, sorted by ε: accuracies (fractions) for a table or a plot.

    ``verified_acc``: the result's own cascade; ``curve_acc``: the cascade over ``curve_methods``
    (a prefix of every result's methods; None where it is not one); ``alone_acc``: per method alone.
    """
    out = []
    for r in sorted(results, key=lambda r: r.eps):
        n = max(r.n, 1)
        c = r.verified_by_stages(curve_methods) if curve_methods else None
        out.append({"eps": r.eps, "n": r.n, "methods": list(r.methods), "pgd_steps": r.pgd_steps,
                    "pgd_restarts": r.pgd_restarts, "clean_acc": int(r.clean_correct.sum()) / n,
                    "pgd_acc": int(r.pgd_robust.sum()) / n, "verified_acc": int(r.verified.sum()) / n,
                    "curve_acc": None if c is None else c / n,
                    "alone_acc": {m: int(v.sum()) / n for m, v in r.alone_verified.items()},
                    "not_attempted": int(r.not_attempted.sum()), "seconds": sum(r.time.values()),
                    "attack": r._pgd_label(), "attack_name": r.attack_name, "radius_name": r.radius_name})
    return out


def eps_table(results: Sequence[VerificationResult], trained_eps: float | None = None) -> str:
    """A markdown table, one row per ε: clean, PGD, each method alone, the cascade, the gap, time."""
    pts = accuracy_curve(results)
    alone = [m for m in METHODS if any(m in p["alone_acc"] for p in pts)]
    na = any(p["not_attempted"] for p in pts)
    radius = pts[0]["radius_name"] if pts else "ε"
    atk = pts[0]["attack_name"] if pts else "PGD"
    pgd_like = atk == "PGD"
    head = ([radius, "clean (%)", f"{atk} (%)", "PGD steps × restarts" if pgd_like else "attack"]
            + [f"{m} alone (%)" for m in alone]
            + ["verified (%)", "cascade", f"gap {atk} − verified"] + (["not attempted"] if na else []) + ["time (s)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:"] * 4 + ["---:"] * len(alone)
                                                            + ["---:", "---", "---:"] + (["---:"] if na else [])
                                                            + ["---:"]) + "|"]
    for p in pts:
        e = f"{p['eps']:.4g}" + (" (trained)" if trained_eps is not None and math.isclose(p["eps"], trained_eps)
                                 else "")
        cells = [e, f"{100 * p['clean_acc']:.2f}", f"{100 * p['pgd_acc']:.2f}",
                 ("–" if p["eps"] <= 0 else f"{p['pgd_steps']} × {p['pgd_restarts']}" if pgd_like else p["attack"])]
        cells += [f"{100 * p['alone_acc'][m]:.2f}" if m in p["alone_acc"] else "–" for m in alone]
        cells += [f"{100 * p['verified_acc']:.2f}", " → ".join(p["methods"]),
                  f"{100 * (p['pgd_acc'] - p['verified_acc']):.2f}"]
        cells += [str(p["not_attempted"])] if na else []
        cells.append(f"{_sig(p['seconds']):g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class VerificationTask:
    """How the cascade runs on one kind of input (the cascade itself is `run_verification`): move a
    batch to the device, its logits, the attack (an upper bound of robust accuracy), and the margin
    lower bounds of a sub-batch by one method."""

    #: what the result tables call the set's size and the attack
    radius_name: str = "ε"
    attack_name: str = "PGD"
    #: the set's size (ε, budget) and norm, as `VerificationResult` records them
    eps: float = math.nan
    norm: Any = None

    def inputs(self, batch: Sequence[Any], device: torch.device) -> tuple[Any, Tensor]:
        return batch[0].to(device), batch[1].to(device).long()

    def take(self, x: Any, idx: Tensor) -> Any:
        return x[idx]

    def logits(self, x: Any) -> Tensor:
        raise NotImplementedError

    def attack(self, x: Any, y: Tensor) -> Optional[Tensor]:
        """Boolean (B,) per clean-correct example: the attack found nothing (None: no attack runs)."""
        return None

    def exact(self) -> bool:
        """The set is the clean input alone: the clean margins are the exact bounds."""
        return False

    def bounds(self, x: Any, y: Tensor, method: str, num_classes: int,
               optimize_bound_args: Mapping[str, Any] | None) -> Tensor:
        raise NotImplementedError

    def attack_label(self) -> str:
        return self.attack_name

    def describe(self) -> dict[str, Any]:
        """What the result's ``info`` records about the set and the attack."""
        return {}


class InputSetTask(VerificationTask):
    """A perturbation set around the input tensor of ``model`` (Lp balls, L0 budgets ...); PGD
    attacks Lp balls of one radius in L∞ / L2, `certtrain.attacks.l0_attack` an L0 budget
    (``pgd_steps`` / ``pgd_restarts`` its steps and restarts; result ``eps`` = k, ``norm`` 0); any
    other set is bounded but not attacked: its attack column is then the clean one."""

    def __init__(self, model: nn.Module, perturbation: Perturbation, pgd_steps: int = 20, pgd_restarts: int = 1,
                 pgd_step_size: float | None = None, bound_opts: Mapping[str, Any] | None = None):
        if not isinstance(perturbation, Perturbation):
            raise ValueError("perturbation must be a certtrain.bounds.Perturbation (e.g. PerturbationLpNorm, or "
                             f"ThreatModel.at(eps)), got {type(perturbation).__name__}")
        if isinstance(perturbation, WeightBallSet):
            raise ValueError("this perturbation is a weight ball (WeightBall.at), not a set around the input: verify "
                             "it with make_task(net, threat, eps, ...) or WeightSetTask")
        if int(pgd_steps) < 0 or int(pgd_restarts) < 1:
            raise ValueError(f"need pgd_steps >= 0 and pgd_restarts >= 1, got {pgd_steps}, {pgd_restarts}")
        lp = isinstance(perturbation, PerturbationLpNorm) and not (
            isinstance(perturbation.eps, Tensor) and perturbation.eps.numel() > 1)
        self.lp = lp
        self.eps = float(perturbation.eps) if lp else math.nan
        self.norm = perturbation.norm if lp else getattr(perturbation, "norm", None)
        if lp and (not math.isfinite(self.eps) or self.eps < 0):
            raise ValueError(f"eps must be a finite number >= 0, got {perturbation.eps!r}")
        self.attackable = lp and self.norm in (math.inf, 2.0)
        self.l0 = isinstance(perturbation, PerturbationL0Norm)
        if self.l0:  # at most k pixels: eps = k, norm 0, attacked by the L0 attack
            self.eps, self.norm = float(perturbation.eps), 0.0
            self.radius_name, self.attack_name = "k (pixels)", "L0 attack"
        self.model, self.perturbation = model, perturbation
        self.pgd_steps, self.pgd_restarts, self.pgd_step_size = int(pgd_steps), int(pgd_restarts), pgd_step_size
        self.bound_opts = dict(bound_opts or {})
        if not self.l0:  # (an L0 domain may be a tensor: the attack reads it from the set)
            self.x_min = float(perturbation.x_L) if getattr(perturbation, "x_L", None) is not None else -math.inf
            self.x_max = float(perturbation.x_U) if getattr(perturbation, "x_U", None) is not None else math.inf
        self.bounded: BoundedModule | None = None
        #: options of the BaB stage (`certtrain.bounds.BaBOptions`; ``timeout``: seconds per sample)
        self.bab_options: dict[str, Any] = {}

    def logits(self, x: Tensor) -> Tensor:
        return self.model(x)

    def attack(self, x: Tensor, y: Tensor) -> Optional[Tensor]:
        if self.l0 and self.eps > 0 and self.pgd_steps > 0:
            p = self.perturbation
            return l0_accuracy(self.model, x, y, p.eps, x_min=p.x_L, x_max=p.x_U, steps=self.pgd_steps,
                               restarts=self.pgd_restarts)
        if not (self.attackable and self.eps > 0 and self.pgd_steps > 0):
            return None
        return pgd_accuracy(self.model, x, y, self.eps, norm=self.norm, steps=self.pgd_steps,
                            step_size=self.pgd_step_size, restarts=self.pgd_restarts, x_min=self.x_min,
                            x_max=self.x_max)

    def exact(self) -> bool:
        return (self.lp or self.l0) and self.eps == 0

    def bounds(self, x, y, method, num_classes, optimize_bound_args):
        if self.bounded is None:
            self.bounded = BoundedModule(self.model, x[:1], bound_opts=self.bound_opts)
        return margin_lower_bounds(self.bounded, x, y, self.perturbation, method, num_classes, optimize_bound_args,
                                   self.bab_options)

    def attack_label(self) -> str:
        rs = "restart" if self.pgd_restarts == 1 else "restarts"
        if self.l0:
            return f"L0 attack ({self.pgd_steps} steps, {self.pgd_restarts} {rs})"
        return f"PGD ({self.pgd_steps} steps, {self.pgd_restarts} {rs})"


def verify_dataset(model: nn.Module, loader: Iterable[Sequence[Tensor]], perturbation: PerturbationLpNorm,
                   methods: Sequence[str] = METHODS, *, num_classes: int | None = None, pgd_steps: int = 20,
                   pgd_restarts: int = 1, pgd_step_size: float | None = None, alone: bool | Sequence[str] = True,
                   device: str | torch.device | None = None, bound_opts: Mapping[str, Any] | None = None,
                   method_batch_size: Mapping[str, int] | None = None, max_samples: Mapping[str, int] | None = None,
                   time_limit: Mapping[str, float] | None = None,
                   optimize_bound_args: Mapping[str, Any] | None = None,
                   seed: int | None = 0, progress: bool = True, desc: str = "verify") -> VerificationResult:
    """Clean, PGD and verified accuracy of ``model`` on ``loader`` (see the module docstring).

    ``perturbation``: a :class:`PerturbationLpNorm` with a scalar ε (L∞ or L2; its ``x_L``/``x_U`` also
    bound the attack).  ``methods``: the cascade's order (names as :func:`canonical_method`).
    ``alone``: True (every method), False, or the methods to also run alone on all clean-correct
    samples.  ``method_batch_size`` / ``max_samples`` / ``time_limit``: ``{method: value}`` (see the
    module docstring).  ``optimize_bound_args``: α-CROWN's options (:data:`ALPHA_CROWN_OPTIONS`).
    ``device``: auto / cpu / cuda[:N] (default: where the model is).  ``seed``: seeds PGD's random
    starts (None: leave the RNG alone).
    """
    task = InputSetTask(model, perturbation, pgd_steps, pgd_restarts, pgd_step_size, bound_opts)
    return run_verification(task, model, loader, methods, num_classes=num_classes, alone=alone, device=device,
                            method_batch_size=method_batch_size, max_samples=max_samples, time_limit=time_limit,
                            optimize_bound_args=optimize_bound_args, seed=seed, progress=progress, desc=desc,
                            pgd_steps=pgd_steps, pgd_restarts=pgd_restarts)


def run_verification(task: VerificationTask, model: nn.Module, loader: Iterable[Sequence[Any]],
                     methods: Sequence[str] = METHODS, *, num_classes: int | None = None,
                     alone: bool | Sequence[str] = True, device: str | torch.device | None = None,
                     method_batch_size: Mapping[str, int] | None = None, max_samples: Mapping[str, int] | None = None,
                     time_limit: Mapping[str, float] | None = None, optimize_bound_args: Mapping[str, Any] | None = None,
                     seed: int | None = 0, progress: bool = True, desc: str = "verify", pgd_steps: int = 0,
                     pgd_restarts: int = 1) -> VerificationResult:
    """The cascade of the module docstring over ``loader`` for any `VerificationTask` (``model``: the
    module the task runs, moved to the device and put in eval mode for the run)."""
    methods = parse_methods(methods)
    if alone is True or alone is False or alone is None:
        alone_m = list(methods) if alone else []
    else:
        items = [alone] if isinstance(alone, str) else list(alone)
        alone_m = parse_methods(items) if any(str(a).strip() for a in items) else []
        extra = [m for m in alone_m if m not in methods]
        if extra:
            raise ValueError(f"alone lists {', '.join(extra)}, which is not among the methods ({', '.join(methods)})")
    batch_of = parse_method_options("method_batch_size", method_batch_size, integer=True, minimum=1, methods=methods)
    max_n = parse_method_options("max_samples", max_samples, integer=True, minimum=0, methods=methods)
    max_t = parse_method_options("time_limit", time_limit, integer=False, minimum=0, methods=methods)
    alpha_args = parse_alpha_crown_options(optimize_bound_args)
    if device is None:
        p = next(iter(model.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
    else:
        dev = resolve_device(device)
    if seed is not None:
        torch.manual_seed(int(seed))

    was_training = model.training
    model = model.to(dev).eval()
    times = {"clean": 0.0, "pgd": 0.0, **{f"cascade:{m}": 0.0 for m in methods},
             **{f"alone:{m}": 0.0 for m in alone_m}}
    used = {k: 0 for k in times}  # samples each stage / alone run has bounded so far
    cascade_in = {m: 0 for m in methods}
    cascade_ver = {m: 0 for m in methods}
    cascade_skip = {m: 0 for m in methods}
    cols: dict[str, list[Any]] = {k: [] for k in ("label", "pred", "clean", "pgd", "seconds", "by", "skipped")}
    lbs: dict[str, list[Tensor]] = {m: [] for m in methods}
    alone_v: dict[str, list[Tensor]] = {m: [] for m in alone_m}
    alone_att: dict[str, list[Tensor]] = {m: [] for m in alone_m}
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

    def bound(key: str, m: str, x: Any, y: Tensor, idx: Tensor, K: int,
              sec: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Margin minima by m on the samples idx of the batch, in sub-batches, within m's limits.

        Returns (attempted idx, their minima (float64, CPU), skipped idx); adds the time to
        ``times[key]`` and each sample's share to ``sec``.
        """
        bs = batch_of.get(m) or max(len(idx), 1)
        mins: list[Tensor] = []
        start = 0
        while start < len(idx):
            room = max_n[m] - used[key] if m in max_n else len(idx)
            if room <= 0 or (m in max_t and times[key] >= max_t[m]):
                break
            sub = idx[start:start + min(bs, room)]
            lb, t = timed(lambda: task.bounds(task.take(x, sub), y[sub], m, K, alpha_args))
            mins.append(lb.min(1).values.double().cpu())
            times[key] += t
            used[key] += len(sub)
            if sec is not None:
                sec[sub.cpu()] += t / len(sub)
            start += len(sub)
        got = torch.cat(mins) if mins else torch.zeros(0, dtype=torch.float64)
        return idx[:start], got, idx[start:]

    try:
        for batch in bar:
            x, y = task.inputs(batch, dev)
            B = len(y)
            sec = torch.zeros(B, dtype=torch.float64)
            with torch.no_grad():
                logits, t = timed(lambda: task.logits(x))
            K = int(num_classes) if num_classes is not None else int(logits.shape[1])
            times["clean"] += t
            sec += t / B
            pred = logits.argmax(1)
            clean = pred == y
            robust = clean.clone()
            ci = clean.nonzero().flatten()
            if len(ci) and not task.exact():
                ok, t = timed(lambda: task.attack(task.take(x, ci), y[ci]))
                if ok is not None:
                    robust[ci] = ok
                    times["pgd"] += t
                    sec[ci.cpu()] += t / len(ci)
            batch_lb = {m: torch.full((B,), math.nan, dtype=torch.float64) for m in methods}
            by = [""] * B
            skipped: list[list[str]] = [[] for _ in range(B)]
            if task.exact():  # the set is the point itself: the margins are exact
                true = (logits.gather(1, y[:, None]) - logits).masked_fill(
                    torch.nn.functional.one_hot(y, K).bool(), math.inf).min(1).values.double().cpu()
                for m in methods:
                    batch_lb[m] = true.clone()
                for m in alone_m:
                    alone_v[m].append(clean.cpu())
                    alone_att[m].append(clean.cpu())
                by = [methods[0] if c else "" for c in clean.tolist()]
                cascade_in[methods[0]] += int(clean.sum())
                cascade_ver[methods[0]] += int(clean.sum())
            else:
                # the cascade: clean-correct, PGD-robust, not yet verified
                todo = robust.nonzero().flatten()
                for m in methods:
                    if len(todo) == 0:
                        break
                    done, mins, skip = bound(f"cascade:{m}", m, x, y, todo, K, sec)
                    cascade_in[m] += len(done)
                    cascade_skip[m] += len(skip)
                    for i in skip.tolist():
                        skipped[i].append(m)
                    dc = done.cpu()
                    batch_lb[m][dc] = mins
                    ok = mins > 0
                    for i in dc[ok].tolist():
                        by[i] = m
                    cascade_ver[m] += int(ok.sum())
                    # not verified here, or skipped by this stage's limit: on to the next stage
                    todo = torch.cat([done[~ok.to(done.device)], skip]).sort().values
                for m in alone_m:
                    v = torch.zeros(B, dtype=torch.bool)
                    att = torch.zeros(B, dtype=torch.bool)
                    if len(ci):
                        done, mins, _ = bound(f"alone:{m}", m, x, y, ci, K, None)
                        dc = done.cpu()
                        free = batch_lb[m][dc].isnan()  # keep the cascade's value where it ran
                        batch_lb[m][dc[free]] = mins[free]
                        v[dc] = mins > 0
                        att[dc] = True
                    alone_v[m].append(v)
                    alone_att[m].append(att)
            cols["label"].append(y.cpu())
            cols["pred"].append(pred.cpu())
            cols["clean"].append(clean.cpu())
            cols["pgd"].append(robust.cpu())
            cols["seconds"].append(sec)
            cols["by"].append(by)
            cols["skipped"].append([tuple(s) for s in skipped])
            for m in methods:
                lbs[m].append(batch_lb[m])
            n_seen += B
            n_clean += int(clean.sum())
            n_pgd += int(robust.sum())
            n_ver += sum(1 for b in by if b)
            if tqdm is not None and hasattr(bar, "set_postfix"):
                bar.set_postfix(clean=f"{100 * n_clean / n_seen:.1f}%",
                                **{task.attack_name.lower(): f"{100 * n_pgd / n_seen:.1f}%"},
                                verified=f"{100 * n_ver / n_seen:.1f}%")
    finally:
        if hasattr(bar, "close"):
            bar.close()
        model.train(was_training)

    cat = lambda v, dtype: torch.cat(v) if v else torch.zeros(0, dtype=dtype)  # noqa: E731
    label = cat(cols["label"], torch.long)
    return VerificationResult(
        methods=methods, eps=task.eps, norm=task.norm, pgd_steps=int(pgd_steps), pgd_restarts=int(pgd_restarts),
        index=torch.arange(len(label)), label=label, pred=cat(cols["pred"], torch.long),
        clean_correct=cat(cols["clean"], torch.bool), pgd_robust=cat(cols["pgd"], torch.bool),
        verified_by=[b for bs in cols["by"] for b in bs],
        margin_lb={m: cat(v, torch.float64) for m, v in lbs.items()},
        alone_verified={m: cat(v, torch.bool) for m, v in alone_v.items()},
        seconds=cat(cols["seconds"], torch.float64), time=times, cascade_in=cascade_in,
        cascade_verified=cascade_ver,
        info={"device": str(dev), **task.describe(),
              **({"alpha_crown": alpha_args} if "alpha-CROWN" in methods else {})},
        skipped_by=[s for ss in cols["skipped"] for s in ss],
        alone_attempted={m: cat(v, torch.bool) for m, v in alone_att.items()}, cascade_skipped=cascade_skip,
        limits={"method_batch_size": batch_of, "max_samples": max_n, "time_limit": max_t},
        attack=task.attack_label(), radius_name=task.radius_name, attack_name=task.attack_name)


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
    from .certified_module import _locate_target, module_from_config

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


class WeightSetTask(VerificationTask):
    """The parameters named by a `certtrain.threat.WeightBall`, each in its ball of radius ``eps``
    around its value, the input fixed: a sample is verified when its prediction holds for every
    parameter value in the set (the engine's bounds, one parameter copy per example), and the
    attack is PGD on the parameters per example (`certtrain.attacks.weight_pgd_attack`).

    The model's `BoundedParameter`s are the perturbed parameters; where it has none (a model not
    built by `CertifiedModule`), the ball's are installed in place (same values, unperturbed outside
    the bound calls), on the model behind a leading ``Normalize`` if there is one."""

    radius_name = "weight ε"
    attack_name = "weight PGD"

    def __init__(self, model: nn.Module, threat: WeightBall, eps: float, pgd_steps: int = 20, pgd_restarts: int = 1,
                 pgd_step_size: float | None = None, bound_opts: Mapping[str, Any] | None = None):
        if not isinstance(threat, WeightBall):
            raise ValueError(f"WeightSetTask needs a certtrain.threat.WeightBall, got {threat!r}")
        if int(pgd_steps) < 0 or int(pgd_restarts) < 1:
            raise ValueError(f"need pgd_steps >= 0 and pgd_restarts >= 1, got {pgd_steps}, {pgd_restarts}")
        self.eps, self.norm, self.threat = check_eps("eps", eps), threat.norm, threat
        from .bounds import BoundedParameter
        from .normalize import Normalize

        if not any(isinstance(p, BoundedParameter) for p in model.parameters()):
            inner = model[1] if isinstance(model, nn.Sequential) and len(model) == 2 and \
                isinstance(model[0], Normalize) else model
            threat.prepare_model(inner)
        self.params = [n for n, _ in threat.perturbed(model)]
        self.model = model
        self.pgd_steps, self.pgd_restarts, self.pgd_step_size = int(pgd_steps), int(pgd_restarts), pgd_step_size
        self.bound_opts = dict(bound_opts or {})
        self.bounded: BoundedModule | None = None

    def logits(self, x: Tensor) -> Tensor:
        return self.model(x)

    def attack(self, x: Tensor, y: Tensor) -> Optional[Tensor]:
        if self.eps == 0 or self.pgd_steps == 0:
            return None
        return self.threat.attack_accuracy(self.model, x, y, self.eps, self.pgd_steps, self.pgd_restarts,
                                           self.pgd_step_size)

    def exact(self) -> bool:
        return self.eps == 0

    def bounds(self, x, y, method, num_classes, optimize_bound_args):
        method = canonical_method(method)
        if self.bounded is None:
            self.bounded = BoundedModule(self.model, x[:1], bound_opts=self.bound_opts)
        C = margin_spec(y, num_classes).to(x.dtype)
        kwargs: dict[str, Any] = {}
        if method == "alpha-CROWN" and optimize_bound_args:
            kwargs["optimize_bound_args"] = dict(optimize_bound_args)
        with torch.no_grad(), self.threat.perturbing(self.model, self.eps):
            lb, _ = self.bounded.compute_bounds(x=(x,), method=method, C=C, bound_upper=False, **kwargs)
        return lb

    def attack_label(self) -> str:
        rs = "restart" if self.pgd_restarts == 1 else "restarts"
        return f"weight PGD ({self.pgd_steps} steps, {self.pgd_restarts} {rs})"

    def describe(self) -> dict[str, Any]:
        return {"perturbed_parameters": list(self.params), "set": self.threat.describe(self.eps)}


def make_task(net: nn.Module, threat: ThreatModel, eps: float, *, pgd_steps: int = 20, pgd_restarts: int = 1,
              pgd_step_size: float | None = None, bound_opts: Mapping[str, Any] | None = None) -> VerificationTask:
    """The verification task of an image threat model at radius ``eps``: `InputSetTask` for an
    `LpBall` (PGD) or an `L0Ball` (``eps`` an integer number of pixels; the L0 attack), and
    `WeightSetTask` for a `WeightBall` (PGD on the weights).  ValueError for a bad ``eps`` or a
    threat model without a task here (word substitutions: `certtrain.text_verification`)."""
    kw: dict[str, Any] = dict(pgd_steps=pgd_steps, pgd_restarts=pgd_restarts, pgd_step_size=pgd_step_size,
                              bound_opts=bound_opts)
    if isinstance(threat, LpBall):
        return InputSetTask(net, threat.at(check_eps("eps", eps)), **kw)
    if isinstance(threat, L0Ball):
        return InputSetTask(net, threat.at(check_l0_budget("eps", eps)), **kw)
    if isinstance(threat, WeightBall):
        return WeightSetTask(net, threat, eps, **kw)
    if getattr(threat, "input_kind", None) == "text":
        raise ValueError(f"{threat!r} perturbs a text classifier: verify it with "
                         "certtrain.text_verification.verify_text_dataset")
    raise ValueError(f"make_task knows LpBall, L0Ball and WeightBall threat models, got {threat!r}")
