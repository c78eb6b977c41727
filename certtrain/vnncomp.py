"""Verify VNN-LIB properties of ONNX networks (VNN-COMP instances), one or a whole ``instances.csv``.

For each input box of the property (a disjunct of `certtrain.vnnlib`), the cheap methods run first
(IBP → CROWN → α-CROWN, as the verification cascade); what they cannot prove goes to branch and
bound (`certtrain.bounds.bab_verify`), which also looks for counterexamples.  The answer uses
VNN-COMP's words: ``unsat`` (the property holds: no counterexample), ``sat`` (a counterexample,
re-run on the network and checked against the property), ``timeout``, ``unknown``, ``error``.

    from certtrain.vnncomp import verify_instance
    r = verify_instance("mnist-net_256x2.onnx", "prop_0_0.03.vnnlib", timeout=120)
    r.result, r.stage, r.time          # 'unsat', 'alpha-CROWN', 0.8
"""
from __future__ import annotations

import csv
import math
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .bounds import BaBOptions, BoundedModule, bab_verify
from .bounds.methods import resolve_method
from .vnnlib import Instance, VnnlibProperty, load_instances, read_vnnlib

__all__ = ["InstanceResult", "PropertyVerifier", "verify_instance", "run_instances", "summary_table",
           "RESULTS", "DEFAULT_METHODS"]

#: VNN-COMP's result words, and what the engine's statuses map to
RESULTS = ("unsat", "sat", "timeout", "unknown", "error")
_FROM_BAB = {"verified": "unsat", "falsified": "sat", "timeout": "timeout", "unknown": "unknown", "error": "error"}
#: the incomplete stages before branch and bound ("BaB" names the search itself)
DEFAULT_METHODS = ("IBP", "CROWN", "alpha-CROWN", "BaB")


@dataclass
class InstanceResult:
    """The outcome of one property: ``result`` in `RESULTS`, the stage that decided it (a bound
    method, "attack" or "BaB"), seconds, and for ``sat`` the counterexample."""

    onnx: str
    vnnlib: str
    result: str
    stage: str = ""
    time: float = 0.0
    timeout: float = 0.0
    domains: int = 0
    message: str = ""
    counterexample: Optional[torch.Tensor] = field(default=None, repr=False)
    output: Optional[torch.Tensor] = field(default=None, repr=False)

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("counterexample")
        d.pop("output")
        d["time"] = round(self.time, 3)
        return d


def _parse_methods(methods: Sequence[str]) -> list[str]:
    out = []
    for m in methods:
        key = str(m).strip()
        if key.lower() in ("bab", "branch-and-bound", "beta-crown", "β-crown"):
            out.append("BaB")
            continue
        out.append(resolve_method(key))
    if not out:
        raise ValueError(f"methods is empty; give some of {', '.join(DEFAULT_METHODS)}")
    if "BaB" in out and out[-1] != "BaB":
        raise ValueError("BaB must be the last method of the cascade")
    return out


class PropertyVerifier:
    """An ONNX network loaded once (`certtrain.onnx_model.load_onnx`), bounded by `BoundedModule`,
    against any number of VNN-LIB properties."""

    def __init__(self, onnx_path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                 methods: Sequence[str] = DEFAULT_METHODS, bab: Optional[Mapping[str, Any]] = None,
                 alpha: Optional[Mapping[str, Any]] = None):
        from .onnx_model import load_onnx

        self.onnx_path = str(onnx_path)
        self.device = torch.device(device)
        self.methods = _parse_methods(methods)
        self.bab_opts = dict(bab or {})
        BaBOptions.from_dict(self.bab_opts)  # unknown keys fail now, before any work
        self.alpha = dict(alpha or {})
        self.model: nn.Module = load_onnx(onnx_path).to(self.device).eval()
        self.input_shape = tuple(self.model.input_shape)
        self.dtype = next(self.model.parameters()).dtype
        self.net = BoundedModule(self.model, torch.zeros(self.input_shape, dtype=self.dtype, device=self.device))

    def verify(self, prop: Union[VnnlibProperty, str, Path], timeout: float = 60.0) -> InstanceResult:
        """Decide one property within ``timeout`` seconds (see the module docstring)."""
        t0 = time.perf_counter()
        name = str(prop) if not isinstance(prop, VnnlibProperty) else prop.source
        res = InstanceResult(self.onnx_path, name, "unknown", timeout=float(timeout))
        try:
            if not isinstance(prop, VnnlibProperty):
                prop = read_vnnlib(prop, n_inputs=math.prod(self.input_shape))
            if prop.n_inputs != math.prod(self.input_shape):
                raise ValueError(f"the property has {prop.n_inputs} inputs, the network {math.prod(self.input_shape)}")
            stages = []
            for dj in prop.disjuncts:
                r = self._disjunct(prop, dj, t0 + timeout)
                stages.append(r)
                if r[0] != "unsat":
                    break
            worst = next((s for s in stages if s[0] != "unsat"), None)
            if worst is None:  # every box proved
                res.result = "unsat"
                order = {m: i for i, m in enumerate(self.methods + ["attack"])}
                res.stage = max((s[1] for s in stages), key=lambda m: order.get(m, 0))
                res.domains = sum(s[2] for s in stages)
            else:
                res.result, res.stage, res.domains, res.message = worst[0], worst[1], worst[2], worst[3]
                if res.result == "sat":
                    res.counterexample, res.output = worst[4], worst[5]
        except Exception as e:  # noqa: BLE001 - an instance's failure is its result, never a crash
            res.result, res.stage = "error", "load"
            res.message = f"{type(e).__name__}: {e} | " + traceback.format_exc(limit=3).replace("\n", " ")
        res.time = time.perf_counter() - t0
        if res.result in ("unsat", "sat") and res.time > timeout:
            res.message = (res.message + "; " if res.message else "") + f"decided after the timeout ({res.time:.1f} s)"
        return res

    def _disjunct(self, prop: VnnlibProperty, dj, deadline: float):
        """(result, stage, domains, message, x, y) for one input box, by ``deadline`` (perf_counter)."""
        shape, dev = self.input_shape, self.device
        x_lo, x_hi = dj.input_box(shape, self.dtype, dev)
        C, d, groups_t = dj.spec(self.dtype, dev)
        groups = [torch.nonzero(groups_t == k).flatten().tolist() for k in range(len(dj.conjunctions))]
        if any(not g for g in groups):
            return self._sat_check(prop, (x_lo + x_hi) / 2, "attack",
                                   "a conjunction without output constraints: the whole box is unsafe")
        # the centre first: a property that fails there needs no bound
        hit = self._sat_check(prop, torch.clamp((x_lo + x_hi) / 2, x_lo, x_hi), "attack", "the box centre")
        if hit[0] == "sat":
            return hit
        bx = dj.bounded_input(shape, self.dtype, dev)
        for m in self.methods:
            left = deadline - time.perf_counter()
            if left <= 0:
                return ("timeout", m, 0, f"no time left for {m}", None, None)
            if m == "BaB":
                r = bab_verify(self.net, x_lo, x_hi, C, d, groups, {**self.bab_opts, "timeout": left})
                if r.status == "falsified":
                    res = self._sat_check(prop, r.counterexample, "attack" if r.stage == "attack" else "BaB",
                                          r.message)
                    return (res[0], res[1], r.domains, *res[3:])
                return (_FROM_BAB[r.status], "BaB", r.domains, r.message, None, None)
            with torch.no_grad():
                kw = {"optimize_bound_args": self.alpha} if (m == "alpha-CROWN" and self.alpha) else {}
                lb, _ = self.net.compute_bounds(x=(bx,), C=C, method=m, bound_upper=False, **kw)
            if dj.is_proved(lb.detach()):
                return ("unsat", m, 0, "", None, None)
        return ("unknown", self.methods[-1], 0, "the incomplete methods could not prove it", None, None)

    def _sat_check(self, prop: VnnlibProperty, x: torch.Tensor, stage: str, msg: str):
        """Run the network on x; ``sat`` only if (x, f(x)) satisfies the property's unsafe condition."""
        with torch.no_grad():
            y = self.model(x.to(self.device, self.dtype))
        if prop.counterexample_holds(y.double().cpu(), x.double().cpu()):
            return ("sat", stage, 0, msg, x.detach().cpu(), y.detach().cpu())
        return ("unknown", stage, 0, msg + " (the candidate does not violate the property)", None, None)


def verify_instance(onnx: Union[str, Path], vnnlib: Union[str, Path], timeout: float = 60.0,
                    **kw: Any) -> InstanceResult:
    """One instance: load the network (`PropertyVerifier`) and decide the property."""
    t0 = time.perf_counter()
    try:
        v = PropertyVerifier(onnx, **kw)
    except Exception as e:  # noqa: BLE001
        return InstanceResult(str(onnx), str(vnnlib), "error", "load", time.perf_counter() - t0, timeout,
                              message=f"{type(e).__name__}: {e}")
    return v.verify(vnnlib, timeout - (time.perf_counter() - t0))


def run_instances(csv_path: Union[str, Path], out: Optional[Union[str, Path]] = None, *,
                  timeout_scale: float = 1.0, max_timeout: Optional[float] = None,
                  select: Optional[Iterable[int]] = None, progress: bool = True,
                  **kw: Any) -> list[InstanceResult]:
    """Every instance of a VNN-COMP ``instances.csv`` (networks loaded once each); with ``out`` one
    CSV line per instance is appended as it finishes (``onnx, vnnlib, result, stage, time, ...``)
    and each counterexample saved as ``counterexamples/<network>__<property>.pt`` next to it.
    ``timeout_scale`` / ``max_timeout`` shrink the csv's timeouts (reported)."""
    insts: list[Instance] = load_instances(csv_path)
    if select is not None:
        keep = list(select)
        insts = [insts[i] for i in keep]
    verifiers: dict[str, PropertyVerifier] = {}
    results: list[InstanceResult] = []
    writer = fh = None
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fh = open(out, "w", newline="", encoding="utf-8")
    try:
        from tqdm.auto import tqdm
        bar = tqdm(insts, desc=Path(csv_path).stem, unit="instance", disable=not progress, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        bar = insts
    try:
        for inst in bar:
            t = inst.timeout * timeout_scale
            if max_timeout is not None:
                t = min(t, max_timeout)
            key = str(inst.onnx)
            if key not in verifiers:
                try:
                    verifiers[key] = PropertyVerifier(inst.onnx, **kw)
                except Exception as e:  # noqa: BLE001
                    results.append(InstanceResult(str(inst.onnx), str(inst.vnnlib), "error", "load", 0.0, t,
                                                  message=f"{type(e).__name__}: {e}"))
                    continue
            r = verifiers[key].verify(inst.vnnlib, t)
            r.onnx, r.vnnlib = Path(inst.onnx).name, Path(inst.vnnlib).name
            results.append(r)
            if out is not None and r.counterexample is not None:
                cdir = Path(out).parent / "counterexamples"
                cdir.mkdir(exist_ok=True)
                torch.save({"x": r.counterexample, "y": r.output, "onnx": str(inst.onnx), "vnnlib": str(inst.vnnlib)},
                           cdir / f"{Path(r.onnx).stem}__{Path(r.vnnlib).stem}.pt")
            if fh is not None:
                row = r.row()
                if writer is None:
                    writer = csv.DictWriter(fh, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
                fh.flush()
            if hasattr(bar, "set_postfix"):
                counts = {k: sum(x.result == k for x in results) for k in RESULTS}
                bar.set_postfix({k: v for k, v in counts.items() if v})
    finally:
        if fh is not None:
            fh.close()
    return results


def summary_table(results: Sequence[InstanceResult], methods: Sequence[str] = DEFAULT_METHODS) -> str:
    """Markdown: per network, the instances verified (cumulatively by each stage of the cascade),
    falsified, unsolved, and the time per instance."""
    methods = _parse_methods(methods)
    nets = sorted({r.onnx for r in results})
    head = ["network", "instances"] + [f"verified ≤ {m}" for m in methods] + \
        ["falsified", "timeout", "unknown", "error", "mean time (s)", "max time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for net in nets + ["all"]:
        rs = [r for r in results if net == "all" or r.onnx == net]
        if not rs:
            continue
        cells = [net, str(len(rs))]
        for i, m in enumerate(methods):
            upto = set(methods[: i + 1])
            cells.append(str(sum(r.result == "unsat" and r.stage in upto for r in rs)))
        cells += [str(sum(r.result == k for r in rs)) for k in ("sat", "timeout", "unknown", "error")]
        ts = [r.time for r in rs]
        cells += [f"{sum(ts) / len(ts):.2f}", f"{max(ts):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
