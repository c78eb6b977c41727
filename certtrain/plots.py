"""Plots of verification results (matplotlib's Agg canvas: files only, no display, no pyplot state)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_accuracy_vs_eps"]


def _pgd_label(points: Sequence[Mapping[str, Any]]) -> str:
    """'PGD, 100 steps × 5 restarts' or, when the attack differs between ε, each setting with its ε;
    another attack (``attack_name`` not PGD): its own description."""
    other = [p for p in points if p.get("attack_name", "PGD") != "PGD"]
    if other:
        return f"{other[0]['attack']} (upper bound)"
    groups: dict[tuple[int, int], list[float]] = {}
    for p in points:
        if p["eps"] > 0:
            groups.setdefault((p["pgd_steps"], p["pgd_restarts"]), []).append(p["eps"])
    attack = lambda s, r: f"{s} steps × {r} restart{'' if r == 1 else 's'}"  # noqa: E731
    if len(groups) <= 1:
        (s, r), = groups or {(0, 1): []}
        return f"PGD, {attack(s, r)} (upper bound)"
    main = max(groups, key=lambda k: len(groups[k]))
    rest = "; ".join(f"{attack(s, r)} at ε = {', '.join(f'{e:g}' for e in es)}"
                     for (s, r), es in groups.items() if (s, r) != main)
    return f"PGD, {attack(*main)}; {rest} (upper bound)"


def plot_accuracy_vs_eps(points: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str,
                         curve_methods: Sequence[str], trained_eps: float | None = None,
                         norm: Any = math.inf, xlabel: str | None = None) -> Path:
    """Clean, PGD and certified accuracy against ε (points from :func:`certtrain.verification.accuracy_curve`).

    The line "certified" is the cascade over ``curve_methods`` at every ε; where a point ran a
    longer cascade, its certified accuracy is a separate marker.  The band between certified and
    PGD accuracy holds the (unknown) true robust accuracy.  ``trained_eps``: a vertical line.  ``xlabel``: the axis label (default: the ε of ``norm``);
    the points' ``radius_name`` (ε, budget) names the trained value.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = sorted(points, key=lambda p: p["eps"])
    if len(pts) < 2:
        raise ValueError(f"an accuracy-vs-ε plot needs at least 2 values of ε, got {len(pts)}")
    eps = [p["eps"] for p in pts]
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    fig = Figure(figsize=(10.5, 5.2), dpi=120)
    FigureCanvasAgg(fig)  # the Agg canvas, whatever pyplot's backend is
    ax = fig.subplots()
    ax.plot(eps, [pct(p["clean_acc"]) for p in pts], color="0.45", ls="--", lw=1.3, label="clean")
    pgd = [pct(p["pgd_acc"]) for p in pts]
    ax.plot(eps, pgd, color="tab:red", marker="o", ms=4, lw=1.8, label=_pgd_label(pts))
    curve = [(e, pct(p["curve_acc"])) for e, p in zip(eps, pts) if p.get("curve_acc") is not None]
    if curve:
        ce, cv = zip(*curve)
        ax.plot(ce, cv, color="tab:blue", marker="o", ms=4, lw=2.0,
                label=f"certified: {' → '.join(curve_methods)} (lower bound)")
        pgd_at = {e: v for e, v in zip(eps, pgd)}
        ax.fill_between(ce, cv, [pgd_at[e] for e in ce], color="tab:blue", alpha=0.10, lw=0,
                        label="robust accuracy lies in this band")
    longer = [p for p in pts if list(p["methods"]) != list(curve_methods)]
    for cascade in dict.fromkeys(tuple(p["methods"]) for p in longer):
        sel = [p for p in longer if tuple(p["methods"]) == cascade]
        ax.plot([p["eps"] for p in sel], [pct(p["verified_acc"]) for p in sel], ls="none", marker="*", ms=13,
                color="navy", label=f"certified: {' → '.join(cascade)}")
    styles = iter([("tab:green", (0, (1, 1.5))), ("tab:orange", (0, (4, 2))), ("tab:brown", (0, (4, 1.5, 1, 1.5))),
                   ("tab:pink", (0, (2, 3)))])
    for m in dict.fromkeys(m for p in pts for m in p["alone_acc"]):
        sel = [(p["eps"], pct(p["alone_acc"][m])) for p in pts if m in p["alone_acc"]]
        if len(sel) >= 2:
            color, ls = next(styles, ("0.3", ":"))
            ax.plot(*zip(*sel), ls=ls, lw=1.3, color=color, label=f"certified: {m} alone")
    radius = pts[0].get("radius_name", "ε")
    if trained_eps is not None and trained_eps > 0:
        ax.axvline(trained_eps, color="tab:purple", ls="-.", lw=1.2, label=f"trained at {radius} = {trained_eps:g}")
    if xlabel is None:
        nm = "L∞" if norm == math.inf else f"L{norm:g}"
        xlabel = f"ε ({nm} radius, pixel scale [0, 1])"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_xlim(min(eps) - 0.02 * (max(eps) - min(eps)), max(eps) * 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)  # beside the axes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path
