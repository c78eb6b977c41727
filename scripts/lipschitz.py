"""Certified local Lipschitz constants of a trained certtrain checkpoint (Shi et al., NeurIPS 2022).

    python scripts/lipschitz.py --ckpt outputs/<date>/<time>/checkpoints/last.ckpt
    python scripts/lipschitz.py --ckpt last.ckpt --eps 0.01 0.05 --images 20 --out docs/lipschitz

For the first ``--images`` test images and each radius ε, the local Lipschitz constant in the L∞
norm of the true class's logit, L = max over the ball ||x' - x||_∞ <= ε of ||d y_label / dx'||_1, is
bounded from above by bound propagation on the gradient graph (`certtrain.bounds.BoundedJacobian`):
IBP, CROWN, CROWN with the forward network's bounds from α-CROWN, and α-CROWN on the gradient graph
(with those forward bounds).  Next to them: a sampled lower
bound (the largest gradient norm found by random points and, for smooth networks, gradient ascent)
and the naive global bound, the product of the layers' induced ∞-norms (Lipschitz constants of the
activations: 1, or 1/4 for Sigmoid).  Every column is the mean over the images; times are totals.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from certtrain.bounds import (AlphaCROWN, BoundedJacobian, BoundedTensor, PerturbationLpNorm,  # noqa: E402
                              gradient_l1_norms)
from certtrain.normalize import Normalize  # noqa: E402

METHODS = ("IBP", "CROWN", "CROWN+αfwd", "α-CROWN")


def naive_bound(model: nn.Module, row: torch.Tensor) -> float:
    """Product of the layers' induced ∞→∞ norms, the last Linear's replaced by ||row^T W||_1, for
    networks whose leaf modules run in registration order; NaN for a layer it does not know."""
    layers = [m for m in model.modules() if not list(m.children()) and not isinstance(m, (nn.Sequential, nn.ModuleList))]
    if not layers or not isinstance(layers[-1], nn.Linear):
        return float("nan")
    w_last = layers[-1].weight.detach()
    prod = float((row.to(w_last) @ w_last).abs().sum())
    for m in layers[:-1]:
        if isinstance(m, nn.Linear):
            prod *= float(m.weight.detach().abs().sum(1).max())  # max row ℓ1 norm
        elif isinstance(m, nn.Conv2d):
            # each output is one kernel's inner product with a window: |.| <= sum |w_o| ||x||_∞
            prod *= float(m.weight.detach().abs().flatten(1).sum(1).max())
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            s = torch.rsqrt(m.running_var + m.eps) * (m.weight.detach() if m.affine else 1.0)
            prod *= float(s.abs().max())
        elif isinstance(m, nn.Sigmoid):
            prod *= 0.25
        elif isinstance(m, Normalize):
            prod *= float(m.std.abs().reciprocal().max())
        elif not isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Flatten, nn.Identity, nn.Dropout,
                                nn.AvgPool2d, nn.MaxPool2d)):
            return float("nan")
    return prod


def sampled_lower(model: nn.Module, x: torch.Tensor, eps: float, C: torch.Tensor, samples: int, steps: int) -> torch.Tensor:
    """(N,) the largest ||d(C y)/dx||_1 at sampled points of each ball (a lower bound of L)."""
    best = gradient_l1_norms(model, x, C)[:, 0]
    starts = []
    for _ in range(math.ceil(samples / 256)):
        pts = x.unsqueeze(1) + eps * (2 * torch.rand(x.shape[0], 256, *x.shape[1:], dtype=x.dtype) - 1)
        vals = gradient_l1_norms(model, pts.flatten(0, 1), C)[:, 0].view(x.shape[0], 256)
        best = torch.maximum(best, vals.max(1).values)
        starts.append(pts[torch.arange(x.shape[0]), vals.argmax(1)])
    if steps and starts:  # gradient ascent on the norm (double backward; zero for piecewise-linear nets)
        z = starts[-1].clone()
        for _ in range(steps):
            z.requires_grad_(True)
            with torch.enable_grad():
                y = (model(z).flatten(1) * C[0]).sum()
                (g,) = torch.autograd.grad(y, z, create_graph=True)
                (step,) = torch.autograd.grad(g.flatten(1).abs().sum(), z)
            z = (z.detach() + eps / 10 * step.sign()).clamp(x - eps, x + eps)
            best = torch.maximum(best, gradient_l1_norms(model, z, C)[:, 0])
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a checkpoint written by train.py")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.0, 0.01, 0.05, 0.1],
                    help="L∞ radii, in the model's input units (default: 0 0.01 0.05 0.1)")
    ap.add_argument("--images", type=int, default=10, help="first N test images (default 10)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--alpha-iterations", type=int, default=20)
    ap.add_argument("--samples", type=int, default=1024, help="random points per ball for the sampled lower bound")
    ap.add_argument("--ascent-steps", type=int, default=20, help="gradient-ascent steps on the sampled lower bound")
    ap.add_argument("--data-dir", default=None, help="where the dataset lives now (default: the checkpoint's)")
    ap.add_argument("--out", default=None, help="write <out>.md, <out>.csv and <out>.png")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.images <= 0 or any(e < 0 or not math.isfinite(e) for e in args.eps):
        ap.error("--images must be positive and every --eps a finite number >= 0")
    if not Path(args.ckpt).is_file():
        ap.error(f"checkpoint {args.ckpt!r} not found")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from tqdm import tqdm

    from certtrain.verification import load_for_verification
    module, dm, config = load_for_verification(args.ckpt, subset=args.images, data_dir=args.data_dir)
    model = module.net.eval()
    xs, ys = [], []
    for x, y in dm.test_dataloader():
        xs.append(x)
        ys.append(y)
    x_all, y_all = torch.cat(xs)[: args.images], torch.cat(ys)[: args.images]
    n_out = model(x_all[:1]).flatten(1).shape[1]
    labels = sorted(set(y_all.tolist()))
    bjs = {c: BoundedJacobian(model, x_all[:1], C=torch.eye(n_out)[c:c + 1]) for c in labels}
    alpha = AlphaCROWN(iteration=args.alpha_iterations)
    settings = {"IBP": ("IBP", None), "CROWN": ("CROWN", None), "CROWN+αfwd": ("CROWN", alpha),
                "α-CROWN": (alpha, alpha)}  # column: (method, forward_method)
    rows = []
    for eps in args.eps:
        sums = {k: 0.0 for k in (*args.methods, "sampled", "naive")}
        times = {k: 0.0 for k in sums}
        for c in tqdm(labels, desc=f"ε = {eps:g}", file=sys.stderr):
            x = x_all[y_all == c]
            bj, C = bjs[c], bjs[c].C
            t0 = time.perf_counter()
            low = sampled_lower(model, x, eps, C, args.samples, args.ascent_steps)
            times["sampled"] += time.perf_counter() - t0
            sums["sampled"] += float(low.sum())
            sums["naive"] += naive_bound(model, C[0]) * x.shape[0]
            bx = BoundedTensor(x, PerturbationLpNorm(norm=float("inf"), eps=eps))
            for m in args.methods:
                t0 = time.perf_counter()
                method, fwd = settings[m]
                with torch.no_grad():
                    ub = bj.lipschitz(bx, method, forward_method=fwd)
                times[m] += time.perf_counter() - t0
                ub = ub[:, 0]
                bad = low > ub * (1 + 1e-5) + 1e-6
                if bool(bad.any()):  # a sampled gradient above a certified bound: never acceptable
                    raise RuntimeError(f"UNSOUND: {m} bound {ub[bad].tolist()} below sampled {low[bad].tolist()} at ε={eps}")
                sums[m] += float(ub.sum())
        n = x_all.shape[0]
        row = {"eps": eps, **{k: v / n for k, v in sums.items()}, **{f"t_{k}": v for k, v in times.items()}}
        rows.append(row)
    cols = ["sampled", *args.methods, "naive"]
    head = ("| ε | sampled (lower) | " + " | ".join(c for c in cols[1:]) + " |\n|---:|" + "---:|" * len(cols))
    lines = [head]
    for r in rows:
        cells = [f"{r['eps']:g}"]
        for c in cols:
            t = "" if c == "naive" else f" ({r['t_' + c]:.1f} s)"
            cells.append(f"{r[c]:.4g}{t}")
        lines.append("| " + " | ".join(cells) + " |")
    desc = (f"{Path(args.ckpt).name}: {config['model'].get('_target_', '?')} {dict(config['model']).get('activation', '')}, "
            f"{config['dataset'].get('_target_', '?').split('.')[-1]}, first {x_all.shape[0]} test images; "
            f"mean L∞ local Lipschitz constant of the true class's logit (upper bounds unless marked), total times")
    text = desc + "\n\n" + "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text + "\n")
        with open(out.with_suffix(".csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["eps", *cols, *(f"time_{c}" for c in cols if c != "naive")])
            for r in rows:
                w.writerow([r["eps"], *(r[c] for c in cols), *(r["t_" + c] for c in cols if c != "naive")])
        plot(rows, cols, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.md')}, .csv, .png", file=sys.stderr)
    return {"rows": rows, "table": text}


def plot(rows, cols, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    eps = [r["eps"] for r in rows]
    for c in cols:
        if c == "naive":
            continue
        ax.plot(eps, [r[c] for r in rows], marker="o", label=c + (" (lower bound)" if c == "sampled" else ""))
    ax.set_xlabel("L∞ radius ε")
    ax.set_ylabel("local Lipschitz constant (mean)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
