"""Verify a checkpoint on its test split: clean, PGD and verified accuracy (cascade and per method), against ε.

    python verify.py ckpt=outputs/<date>/<time>/checkpoints/last.ckpt
    python verify.py ckpt=PATH eps=0.2 methods=[IBP,CROWN] subset=1000 batch_size=200 device=cuda
    python verify.py ckpt=PATH eps=[0.05,0.1,0.2,0.3]           # the full cascade at each ε
    python verify.py ckpt=PATH method_batch_size.alpha-CROWN=16 max_samples.alpha-CROWN=500

Rebuilds model and data from the checkpoint alone (its ``certtrain_config``).  At each ``eps`` it
runs the full cascade (default IBP → CROWN-IBP → CROWN → α-CROWN); at the extra ε of the accuracy
curve (``curve.eps``, by default 0, ¼ ... 1½ × eps) only the cheap first stages (``curve.methods``).
It prints a table per ε and a combined one, and writes ``summary.md``, ``summary.json``,
``samples.csv`` (one row per ε and test image) and ``accuracy_vs_eps.png`` into ``out=`` (default
``outputs/verify/<date>/<time>``).  Bad input (no such checkpoint, an unreadable one, one without
certtrain_config, a bad ε list, an unknown method, a bad limit ...) prints one line and exits with
code 2 before any long work.  The logic lives in :mod:`certtrain.verification`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
#: curve.eps=auto with a single eps: these multiples of it
AUTO_CURVE = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
PLOT_NAME = "accuracy_vs_eps.png"
BUDGET_PLOT_NAME = "accuracy_vs_budget.png"
#: methods=null: the cascade for images; text (word substitutions): the cheap stages (CROWN through
#: attention costs seconds per sentence on a CPU; ask for it with methods=[IBP,CROWN-IBP,CROWN])
DEFAULT_METHODS = ["IBP", "CROWN-IBP", "CROWN", "alpha-CROWN"]
TEXT_METHODS = ["IBP", "CROWN-IBP"]
#: word substitutions: the budgets verified when budget=null
DEFAULT_BUDGETS = [1, 2, 3, 4, 5, 6]


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def eps_list(name: str, value: Any) -> list[float] | None:
    """A number or a list of numbers → the distinct ε, ascending; None stays None.  ValueError otherwise."""
    from certtrain.threat import check_eps

    value = _plain(value)
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError(f"{name} is an empty list; give one ε (e.g. {name}=0.1) or several ({name}=[0.05,0.1])")
    out: list[float] = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name} must be a number or a list of numbers, got {v!r} in {value!r}")
        e = check_eps(name, v)
        if any(math.isclose(e, o, rel_tol=1e-9, abs_tol=1e-12) for o in out):
            raise ValueError(f"{name} lists {v:g} more than once")
        out.append(e)
    return sorted(out)


def budget_list(value: Any) -> list[int] | None:
    """A budget or a list of budgets (words substituted) → distinct integers >= 0, ascending; None stays None."""
    from certtrain.threat import check_budget

    value = _plain(value)
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("budget is an empty list; give one budget (budget=3) or several (budget=[1,2,3])")
    out = sorted({check_budget("budget", v) for v in items})
    if len(out) != len(items):
        raise ValueError(f"budget lists a value more than once: {value!r}")
    return out


def _int_option(key: str, v: Any, low: int) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
        raise ValueError(f"{key} must be an integer >= {low}, got {v!r}")


def curve_methods(spec: Any, methods: list[str]) -> list[str]:
    """``auto``: the leading cheap stages of ``methods`` (at least the first); ``all``; or a prefix of ``methods``."""
    from certtrain.verification import CHEAP_METHODS, parse_methods

    spec = _plain(spec)
    if spec is None or str(spec).lower() == "auto":
        k = 0
        while k < len(methods) and methods[k] in CHEAP_METHODS:
            k += 1
        return methods[:max(k, 1)]
    if str(spec).lower() == "all":
        return list(methods)
    cm = parse_methods(spec if isinstance(spec, (list, str)) else [spec])
    if methods[:len(cm)] != cm:
        raise ValueError(f"curve.methods {cm} must be the first stages of methods {methods} (the curve's cascade "
                         f"is the main one cut short), e.g. curve.methods=[{methods[0]}], auto or all")
    return cm


def check_options(cfg: DictConfig) -> dict[str, Any]:
    """Everything that needs no checkpoint: methods, ε lists, limits, α-CROWN options; ValueError on bad input."""
    from certtrain.threat import parse_norm
    from certtrain.verification import (
        check_engine_supports, parse_alpha_crown_options, parse_method_options, parse_methods)

    if not cfg.get("ckpt"):
        raise ValueError("no checkpoint given: python verify.py ckpt=PATH")
    methods = cfg.methods if cfg.methods is not None else DEFAULT_METHODS
    methods = parse_methods(list(methods) if isinstance(methods, (list, ListConfig)) else str(methods))
    eps = eps_list("eps", cfg.eps)
    budget = budget_list(cfg.get("budget"))
    _int_option("beam", cfg.get("beam"), 1)
    if cfg.norm is not None:
        parse_norm(cfg.norm)
    for key, low in (("pgd_steps", 0), ("pgd_restarts", 1), ("batch_size", 1), ("subset", 1)):
        _int_option(key, cfg.get(key), low)
    alone = _plain(cfg.alone)
    if not isinstance(alone, bool):
        alone_m = parse_methods(alone) if alone not in (None, [], "") else []
        extra = [m for m in alone_m if m not in methods]
        if extra:
            raise ValueError(f"alone lists {', '.join(extra)}, which is not among the methods ({', '.join(methods)})")
        alone = alone_m
    limits = {
        "method_batch_size": parse_method_options("method_batch_size", _plain(cfg.get("method_batch_size")),
                                                  integer=True, minimum=1, methods=methods),
        "max_samples": parse_method_options("max_samples", _plain(cfg.get("max_samples")), integer=True,
                                            minimum=0, methods=methods),
        "time_limit": parse_method_options("time_limit", _plain(cfg.get("time_limit")), integer=False,
                                           minimum=0, methods=methods),
    }
    alpha = parse_alpha_crown_options(_plain(cfg.get("alpha_crown")))
    curve = _plain(cfg.get("curve"))
    if curve is None or curve is False:
        curve = {"eps": None}
    if not isinstance(curve, Mapping):
        raise ValueError(f"curve must be a mapping (eps, methods, pgd_steps, pgd_restarts) or false, got {curve!r}")
    unknown = set(curve) - {"eps", "methods", "pgd_steps", "pgd_restarts"}
    if unknown:
        raise ValueError(f"unknown curve option(s) {', '.join(sorted(unknown))}; available: eps, methods, "
                         "pgd_steps, pgd_restarts")
    c_eps = curve.get("eps")
    c_eps = "auto" if isinstance(c_eps, str) and c_eps.lower() == "auto" else (
        [] if c_eps in (None, False, []) else eps_list("curve.eps", c_eps))
    c_methods = curve_methods(curve.get("methods"), methods)
    _int_option("curve.pgd_steps", curve.get("pgd_steps"), 0)
    _int_option("curve.pgd_restarts", curve.get("pgd_restarts"), 1)
    check_engine_supports([m for m in methods if m != "BaB"], alpha)
    bab = bab_options(cfg)
    return {"methods": methods, "eps": eps, "budget": budget, "alone": alone, "limits": limits, "alpha_crown": alpha,
            "bab": bab,
            "curve_eps": c_eps, "curve_methods": c_methods,
            "curve_pgd": (curve.get("pgd_steps"), curve.get("pgd_restarts"))}


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """Check the arguments and load checkpoint, model and data; ValueError / FileNotFoundError on bad input."""
    from certtrain.threat import L0Ball, LpBall, build_threat
    from certtrain.verification import load_for_verification, make_task, resolve_device

    opts = check_options(cfg)
    device = resolve_device(cfg.device)
    if cfg.get("torch_threads"):
        import torch

        torch.set_num_threads(int(cfg.torch_threads))
    module, datamodule, config = load_for_verification(cfg.ckpt, subset=cfg.subset, batch_size=cfg.batch_size,
                                                       data_dir=cfg.data_dir)
    p, e = config.get("perturbation", {}), config.get("eval", {})
    threat = build_threat(p)
    if threat.input_kind == "text":
        return _prepare_text(cfg, opts, module, datamodule, config, threat, device)
    if opts["budget"] is not None or cfg.get("beam") is not None:
        raise ValueError("budget= and beam= are for word-substitution checkpoints; this one was trained against "
                         f"{threat!r}: give eps=")
    eps = opts["eps"]
    if eps is None:
        default = _pick(p.get("eval_eps"), p.get("eps"))
        if default is None:
            raise ValueError("the checkpoint has no perturbation.eps: give eps=")
        eps = eps_list("eps (the checkpoint's perturbation.eval_eps / eps)", default)
    # the checkpoint's threat model (certtrain.threat), at the ε asked for
    if cfg.norm is not None:  # another norm of the same ball family
        if not isinstance(threat, LpBall):
            raise ValueError(f"norm= switches between L∞ and L2 balls; this checkpoint was trained against "
                             f"{threat.describe()}: drop norm=")
        threat = LpBall(norm=cfg.norm, eps=threat.eps, eval_eps=threat.eval_eps, x_L=threat.x_L, x_U=threat.x_U)
    norm = getattr(threat, "norm", None)
    pgd_steps = int(_pick(cfg.pgd_steps, e.get("pgd_steps", 20)))
    pgd_restarts = int(_pick(cfg.pgd_restarts, e.get("pgd_restarts", 1)))
    c_eps = opts["curve_eps"]
    if c_eps == "auto":  # multiples of the one ε asked for (L0: 0 .. k + 2 pixels); an ε list is its own curve
        if len(eps) != 1:
            c_eps = []
        elif isinstance(threat, L0Ball):
            c_eps = [float(k) for k in range(0, int(eps[0]) + 3)]
        else:
            c_eps = [round(eps[0] * f, 12) for f in AUTO_CURVE]
    c_eps = [c for c in c_eps if not any(math.isclose(c, f, rel_tol=1e-9, abs_tol=1e-12) for f in eps)]
    c_steps, c_restarts = opts["curve_pgd"]
    alone, cm = opts["alone"], opts["curve_methods"]
    curve_alone = [m for m in cm if alone is True or (alone and m in alone)]
    points = [{"eps": x, "methods": opts["methods"], "alone": alone, "pgd_steps": pgd_steps,
               "pgd_restarts": pgd_restarts, "kind": "full"} for x in eps]
    points += [{"eps": x, "methods": cm, "alone": curve_alone, "pgd_steps": int(_pick(c_steps, pgd_steps)),
                "pgd_restarts": int(_pick(c_restarts, pgd_restarts)), "kind": "curve"} for x in c_eps]
    points.sort(key=lambda q: q["eps"])
    step_size = _pick(cfg.pgd_step_size, e.get("pgd_step_size"))
    for pt in points:  # every point's task now, so that a bad ε (e.g. a fractional L0 k) fails before any work
        pt["task"] = make_task(module.net, threat, pt["eps"], pgd_steps=pt["pgd_steps"], pgd_restarts=pt["pgd_restarts"],
                               pgd_step_size=step_size, bound_opts=module.evaluation.bound_opts)
        if "BaB" in pt["methods"]:
            if not (hasattr(pt["task"], "bab_options") and getattr(pt["task"], "lp", False)
                    and pt["task"].norm == math.inf):
                raise ValueError(f"BaB verifies sets around the input (L∞ boxes), not {threat.describe()}: drop BaB "
                                 "from methods")
            pt["task"].bab_options = dict(opts["bab"])
    return {"module": module, "datamodule": datamodule, "config": config, "methods": opts["methods"],
            "curve_methods": cm, "device": device, "norm": norm, "threat": threat, "points": points,
            "limits": opts["limits"], "alpha_crown": opts["alpha_crown"],
            "pgd_steps": pgd_steps, "pgd_restarts": pgd_restarts, "pgd_step_size": step_size,
            "trained_eps": p.get("eps")}


def _prepare_text(cfg: DictConfig, opts: dict[str, Any], module: Any, datamodule: Any, config: dict[str, Any],
                  threat: Any, device: Any) -> dict[str, Any]:
    """The budgets (words substituted) of a word-substitution checkpoint; ValueError for image-only options."""
    for key in ("eps", "norm", "pgd_steps", "pgd_restarts", "pgd_step_size"):
        if cfg.get(key) is not None:
            raise ValueError(f"{key}= is for image checkpoints; this one was trained against word substitutions "
                             f"({threat!r}): give budget= (e.g. budget=[1,2,3]) and beam= (the attack's beam width)")
    budgets = opts["budget"] or DEFAULT_BUDGETS
    methods = opts["methods"] if cfg.methods is not None else TEXT_METHODS
    beam = int(_pick(cfg.get("beam"), threat.beam))
    alone = opts["alone"]
    if isinstance(alone, list):
        alone = [m for m in alone if m in methods]
    points = [{"eps": float(b), "methods": methods, "alone": alone, "pgd_steps": 0, "pgd_restarts": 1,
               "kind": "full"} for b in budgets]
    return {"module": module, "datamodule": datamodule, "config": config, "methods": methods, "curve_methods": methods,
            "device": device, "norm": "synonym", "threat": threat, "points": points, "limits": opts["limits"],
            "alpha_crown": opts["alpha_crown"], "pgd_steps": 0, "pgd_restarts": 1,
            "pgd_step_size": None, "trained_eps": threat.budget, "text": True, "beam": beam,
            "max_budget": max(budgets)}


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
    """Verify at every ε as configured, print the tables, write the outputs; returns the results and the paths."""
    from certtrain.methods import method_name
    from certtrain.threat import LpBall
    from certtrain.verification import accuracy_curve, eps_table, run_verification, write_samples_csv

    prepared = prepare(cfg) if prepared is None else prepared
    module, dm, config = prepared["module"], prepared["datamodule"], prepared["config"]
    text = prepared.get("text", False)
    loader = dm.test_dataloader()
    limits = prepared["limits"]
    cache = None
    if text:
        from certtrain.text_verification import AttackCache, verify_text_dataset

        cache = AttackCache(prepared["max_budget"], prepared["beam"])  # one search serves every budget
    t0 = time.perf_counter()
    results, kinds = [], []
    for pt in prepared["points"]:
        ms = pt["methods"]
        lim = {k: {m: v for m, v in d.items() if m in ms} for k, d in limits.items()}
        common = dict(num_classes=module.num_classes, alone=pt["alone"], device=prepared["device"],
                      optimize_bound_args=prepared["alpha_crown"], seed=cfg.seed, progress=bool(cfg.progress), **lim)
        if text:
            res = verify_text_dataset(module.net, loader, int(pt["eps"]), ms, beam=prepared["beam"], cache=cache,
                                      bound_opts=module.evaluation.bound_opts, desc=f"budget={int(pt['eps'])}",
                                      **common)
        else:
            res = run_verification(pt["task"], module.net, loader, ms, pgd_steps=pt["pgd_steps"],
                                   pgd_restarts=pt["pgd_restarts"], desc=f"{pt['task'].radius_name}={pt['eps']:g}",
                                   **common)
        results.append(res)
        kinds.append(pt["kind"])
    total = time.perf_counter() - t0

    first = results[0]
    threat = prepared["threat"]
    if text:
        norm = "word substitutions"
    elif isinstance(threat, LpBall):
        norm = "L∞" if first.norm == math.inf else f"L{int(first.norm)}"
    else:
        norm = threat.describe().split(":")[0]  # "L0", "weights (...)"
    ds = config["dataset"]["_target_"].rsplit(".", 1)[-1]
    ds_short = ds.removesuffix("DataModule") or ds
    model = config["model"]["_target_"].rsplit(".", 1)[-1]
    method = method_name(config.get("method", {}))
    trained = prepared.get("trained_eps")
    radius = first.radius_name
    trained_txt = f" (trained at {radius} = {trained:g})" if isinstance(trained, (int, float)) else ""
    title = (f"Verification of {cfg.ckpt}\n\nTest set ({first.n} {'sentences' if text else 'images'}), {norm}, {ds} / {model} / {method}"
             f"{trained_txt}, device {first.info['device']}")
    cm = prepared["curve_methods"]
    curve = accuracy_curve(results, cm)
    blocks = [title]
    if len(results) > 1:
        if text:
            blocks.append(f"Accuracy against the budget (verified: the cascade {' → '.join(cm)})\n\n"
                          + eps_table(results, trained))
        else:
            blocks.append("Accuracy against ε (verified: the cascade at that ε; the full one at "
                          + ", ".join(f"{r.eps:g}" for r, k in zip(results, kinds) if k == "full")
                          + f", {' → '.join(cm)} elsewhere)\n\n" + eps_table(results, trained))
    details = [f"### {radius} = {r.eps:.4g}{' (curve point)' if k == 'curve' else ''}\n\n{r.to_markdown()}"
               for r, k in zip(results, kinds)]
    full_details = [d for d, k in zip(details, kinds) if k == "full"]
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_samples_csv(results, out / "samples.csv")
    png = None
    if len(results) > 1 and cfg.get("plot", True):
        from certtrain.plots import plot_accuracy_vs_eps

        png = plot_accuracy_vs_eps(
            curve, out / (BUDGET_PLOT_NAME if text else PLOT_NAME), curve_methods=cm,
            trained_eps=trained if isinstance(trained, (int, float)) else None, norm=first.norm,
            xlabel="budget (words substituted by synonym candidates)" if text else (
                None if isinstance(threat, LpBall) else f"{first.radius_name} ({threat.describe().split(':')[0]})"),
            title=f"{model} on {ds_short} ({first.n} test {'sentences' if text else 'images'}), trained with {method}"
                  + (f" at {radius} = {trained:g}" if trained_txt else "")
                  + f"\n{norm}; full cascade: {' → '.join(prepared['methods'])}")
    text = "\n\n".join(blocks + details) + f"\n\ntotal: {total:.1f} s"
    (out / "summary.md").write_text(text + "\n")
    summary = {"ckpt": str(cfg.ckpt), "total_seconds": total, "trained_eps": trained,
               "norm": "inf" if first.norm == math.inf else first.norm,
               "methods": prepared["methods"], "curve_methods": cm,
               "eps": [r.eps for r, k in zip(results, kinds) if k == "full"],
               "curve_eps": [r.eps for r, k in zip(results, kinds) if k == "curve"],
               "plot": png.name if png else None, "curve": curve,
               "points": [{**r.summary(), "kind": k} for r, k in zip(results, kinds)]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    files = ", ".join(["samples.csv", "summary.md", "summary.json"] + ([png.name] if png else []))
    shown = "\n\n".join(blocks + full_details)
    print("\n" + shown + f"\n\ntotal: {total:.1f} s\n\noutput: {out} ({files})"
          + (f"\nplot: {png}" if png else "") + ("\ncurve points' details: summary.md" if len(details) > len(full_details)
                                                 else ""))
    bad = {r.eps: r.unsound() for r in results if any(r.unsound().values())}
    if bad:
        print(f"WARNING: verified samples broken by PGD: {bad}", file=sys.stderr)
    main = results[kinds.index("full")]
    return {"result": main, "results": results, "summary": summary, "out": out, "csv": csv_path, "text": text,
            "png": png}


#: methods=null for onnx / vnnlib / instances
VNNLIB_METHODS = ["IBP", "CROWN", "alpha-CROWN", "BaB"]
#: options that only make sense for a checkpoint (refused with onnx / vnnlib / instances)
CKPT_ONLY = ("eps", "norm", "budget", "beam", "subset", "batch_size", "pgd_steps", "pgd_restarts", "pgd_step_size",
             "data_dir")


def bab_options(cfg: DictConfig) -> dict[str, Any]:
    """The non-null ``bab.*`` options, checked by `certtrain.bounds.BaBOptions` (unknown keys are errors)."""
    from certtrain.bounds import BaBOptions

    opts = {k: v for k, v in (_plain(cfg.get("bab")) or {}).items() if v is not None}
    BaBOptions.from_dict(opts)
    return opts


def check_vnnlib_options(cfg: DictConfig) -> dict[str, Any]:
    """onnx= / vnnlib= / instances=: which mode, the files, the methods; ValueError on bad input."""
    from certtrain.vnncomp import _parse_methods

    onnx, vnnlib, inst = cfg.get("onnx"), cfg.get("vnnlib"), cfg.get("instances")
    if cfg.get("ckpt"):
        raise ValueError("give either ckpt= (a certtrain checkpoint) or onnx=/vnnlib=/instances=, not both")
    if inst and (onnx or vnnlib):
        raise ValueError("instances= runs every line of the csv: drop onnx= and vnnlib=")
    if not inst and not (onnx and vnnlib):
        raise ValueError("one instance needs both onnx=NETWORK.onnx and vnnlib=PROPERTY.vnnlib")
    set_ckpt_only = [k for k in CKPT_ONLY if cfg.get(k) is not None]
    if set_ckpt_only:
        raise ValueError(f"{', '.join(set_ckpt_only)} apply to checkpoints; a VNN-LIB property defines its own "
                         "input set and outputs")
    for f in ([inst] if inst else [onnx, vnnlib]):
        if not Path(str(f)).is_file():
            raise FileNotFoundError(f"no such file: {f}")
    methods = _parse_methods(list(cfg.methods) if cfg.methods is not None else VNNLIB_METHODS)
    t = cfg.get("timeout")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {t!r}")
    sc = cfg.get("timeout_scale", 1.0)
    if isinstance(sc, bool) or not isinstance(sc, (int, float)) or sc <= 0:
        raise ValueError(f"timeout_scale must be a positive number, got {sc!r}")
    from certtrain.verification import parse_alpha_crown_options, resolve_device

    alpha = {k: v for k, v in parse_alpha_crown_options(_plain(cfg.get("alpha_crown")) or {}).items() if v is not None}
    return {"methods": methods, "bab": bab_options(cfg), "alpha": alpha, "device": str(resolve_device(cfg.device))}


def run_vnnlib(cfg: DictConfig, opts: dict[str, Any]) -> dict[str, Any]:
    """One instance (onnx= vnnlib=) or a whole instances.csv: a line per instance, a summary table,
    ``results.csv`` and ``summary.md`` in ``out``."""
    from certtrain.vnncomp import InstanceResult, run_instances, summary_table, verify_instance

    if cfg.get("torch_threads"):
        import torch

        torch.set_num_threads(int(cfg.torch_threads))
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    kw = {"methods": opts["methods"], "bab": opts["bab"], "alpha": opts["alpha"], "device": opts["device"]}
    t0 = time.perf_counter()
    if cfg.get("instances"):
        results = run_instances(cfg.instances, out / "results.csv", timeout_scale=float(cfg.timeout_scale),
                                max_timeout=cfg.get("timeout"), progress=bool(cfg.progress), **kw)
        title = f"Instances of {cfg.instances}"
    else:
        timeout = float(cfg.timeout) if cfg.get("timeout") is not None else 60.0
        r: InstanceResult = verify_instance(cfg.onnx, cfg.vnnlib, timeout, **kw)
        r.onnx, r.vnnlib = Path(str(cfg.onnx)).name, Path(str(cfg.vnnlib)).name
        results = [r]
        title = f"{cfg.onnx} with {cfg.vnnlib}"
        if r.counterexample is not None:
            import torch

            torch.save({"x": r.counterexample, "y": r.output}, out / "counterexample.pt")
    lines = [f"# {title}", "", f"methods: {' → '.join(opts['methods'])}; device {opts['device']}; "
             f"total {time.perf_counter() - t0:.1f} s", "",
             "| onnx | vnnlib | result | decided by | time (s) | timeout (s) | domains | note |", "|---|---|---|---|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.onnx} | {r.vnnlib} | {r.result} | {r.stage} | {r.time:.2f} | {r.timeout:g} | {r.domains} "
                     f"| {r.message[:120]} |")
    lines += ["", summary_table(results, opts["methods"])]
    text = "\n".join(lines)
    print(text)
    (out / "summary.md").write_text(text + "\n", encoding="utf-8")
    if not cfg.get("instances"):
        import csv

        with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(results[0].row()))
            w.writeheader()
            w.writerow(results[0].row())
    print(f"\noutput: {out} (summary.md, results.csv{', counterexample.pt' if (out / 'counterexample.pt').exists() else ''})")
    return {"results": results, "out": out}


@hydra.main(config_path=CONF_DIR, config_name="verify", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: bad input → one line on stderr and exit code 2."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.get("onnx") or cfg.get("vnnlib") or cfg.get("instances"):
        try:
            opts = check_vnnlib_options(cfg)
        except (ValueError, FileNotFoundError) as e:
            print(f"verify.py: error: {e}", file=sys.stderr)
            sys.exit(2)
        run_vnnlib(cfg, opts)
        return
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
