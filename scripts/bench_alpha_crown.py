"""α-CROWN against CROWN and auto_LiRPA's CROWN-Optimized, plus a memory check on CNN-7.

    python scripts/bench_alpha_crown.py                      # every case, markdown table on stdout
    python scripts/bench_alpha_crown.py --cases vision min_max --opts '{"joint": true}'
    python scripts/bench_alpha_crown.py --cnn7-only --cnn7-iterations 2

Reference cases use the stored results of auto_LiRPA 0.7.1's own tests (``../shared/autolirpa_refs``
or ``$CERTTRAIN_AUTOLIRPA_REFS``; see its README): each runs with the options that test used
(iterations, learning rate), everything else certtrain's defaults.  Columns: the mean lower / upper
bound of CROWN (ours), of our α-CROWN and of auto_LiRPA's, the share of auto_LiRPA's gain over
CROWN that ours reaches (sum over all bounds, gains measured from our CROWN), by how much ours is
looser than auto_LiRPA's at worst (negative: tighter everywhere), and the times.  The own-model
rows (random weights) have no reference.  The CNN-7 row runs in a subprocess: its peak resident
set size (VmHWM, includes PyTorch itself) and the bytes of α with its optimizer state.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from bench_bounds import rss_peak_gb  # noqa: E402  (scripts/ is on the path: this file runs from it)
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm  # noqa: E402

REFS = Path(os.environ.get("CERTTRAIN_AUTOLIRPA_REFS", ROOT.parent / "shared" / "autolirpa_refs"))
INF = float("inf")


def _load(rel):
    return torch.load(REFS / rel, weights_only=True, map_location="cpu")


def _top(bundle):
    return [c for c in bundle["calls"] if c["depth"] == 0]


# ---------------------------------------------------------------- reference cases
# Each yields dicts: name, model, x, ptb, alpha (options of the auto_LiRPA test), bound_opts,
# ref_lb / ref_ub (None where the reference has no such side), C.

def case_vision():
    import autolirpa_models as am
    ref = _load("data/vision_test_data")
    model = am.cnn_4layer_test()
    model.load_state_dict(ref["model"])
    model.eval()
    x = ref["data"]
    for norm in ("inf", "2"):
        for relu in ("adaptive", "same-slope"):
            key = f"l_{norm}_CROWN-Optimized" + ("-same-slope" if relu == "same-slope" else "")
            yield dict(name=f"vision cnn_4layer L{norm} {relu}", model=model, x=x,
                       ptb=PerturbationLpNorm(norm=INF if norm == "inf" else 2.0, eps=0.01),
                       alpha={"lr_alpha": 0.1}, bound_opts={"relu": relu},
                       ref_lb=ref[f"{key}_lb"], ref_ub=ref[f"{key}_ub"])


def case_min_max():
    import autolirpa_models as am

    b = _load("bundles/test_min_max.py__TestMinMax__test.pt")
    ref = _load("data/min_max_test_data")
    model = am.MinMaxModel().eval()
    model.load_state_dict(b["modules"][0]["state_dict"])
    x = torch.tensor(np.load(REFS / "samples" / "mnist_test_2.npy")).float().reshape(2, 1, 28, 28) / 255
    # the tightest of auto_LiRPA's four runs per bound (unshared α)
    rl = torch.stack([r[0] for r in ref]).max(0).values
    ru = torch.stack([r[1] for r in ref]).min(0).values
    yield dict(name="min_max (5 it, lr 0.1)", model=model, x=x, ptb=PerturbationLpNorm(norm=INF, eps=0.3),
               alpha={"iteration": 5, "lr_alpha": 0.1}, bound_opts={}, ref_lb=rl, ref_ub=ru)


def case_simple_verification():
    b = _load("bundles/test_simple_verification.py__TestSimpleVerification__test.pt")
    model = nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(1568, 100), nn.ReLU(), nn.Linear(100, 10)).eval()
    model.load_state_dict(b["modules"][0]["state_dict"])
    c = _top(b)[0]
    x = c["roots"][0]["value"]
    yield dict(name="simple_verification MNIST CNN", model=model, x=x, ptb=PerturbationLpNorm(norm=INF, eps=0.3),
               alpha={"lr_alpha": 0.1}, bound_opts={}, ref_lb=c["lb"], ref_ub=c["ub"])


def case_jacobian_mlp():
    b = _load("bundles/test_jacobian.py__TestJacobian__test.pt")
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 100), nn.ReLU(), nn.Linear(100, 100), nn.Tanh(),
                          nn.Linear(100, 100), nn.Sigmoid(), nn.Linear(100, 10)).eval()
    sd = {k.removeprefix("model."): v for k, v in b["modules"][0]["state_dict"].items()}
    model.load_state_dict(sd)
    for c in _top(b):
        if c["module_idx"] != 0 or c["method"] != "CROWN-Optimized" or not c["roots"][0]["perturbation"]["eps"]:
            continue
        eps = c["roots"][0]["perturbation"]["eps"]
        yield dict(name=f"MLP relu/tanh/sigmoid eps {eps * 255:.0f}/255", model=model, x=c["roots"][0]["value"],
                   ptb=PerturbationLpNorm(norm=INF, eps=eps), alpha={}, bound_opts={},
                   ref_lb=c["lb"], ref_ub=c["ub"])


def case_s_shape():
    b = _load("bundles/test_s_shaped.py__TestSShaped__test.pt")
    c = next(c for c in _top(b) if c["module_idx"] == 2 and c["method"] != "CROWN")
    p = c["roots"][0]["perturbation"]
    x, x_L, x_U = c["roots"][0]["value"], p["x_L"], p["x_U"]
    ptb = PerturbationLpNorm(norm=INF, eps=torch.maximum(x - x_L, x_U - x), x_L=x_L, x_U=x_U)
    yield dict(name="sigmoid box (s_shape)", model=nn.Sigmoid(), x=x, ptb=ptb, alpha={}, bound_opts={},
               ref_lb=c["lb"], ref_ub=c["ub"])


def case_pow():
    import autolirpa_models as am

    ref = _load("data/pow_noninteger_test_data")
    for i, (p, lo, hi) in enumerate([(0.5, 1, 4), (1.5, 1, 4), (2.5, 1, 3)]):
        x = torch.full((1, 10), (lo + hi) / 2.0)
        yield dict(name=f"x^{p} on [{lo}, {hi}]", model=am.PowModel(p), x=x, ptb=PerturbationLpNorm(eps=(hi - lo) / 2.0),
                   alpha={"lr_alpha": 0.1}, bound_opts={}, ref_lb=ref[12 + i][0], ref_ub=ref[12 + i][1])


def case_own():
    """Random-weight models of the zoo (no reference): MLP, CNN, small ResNet, sigmoid MLP."""
    from certtrain_models import cnn_small, mlp, resnet
    torch.manual_seed(0)
    specs = [("own MLP 2x256 (MNIST)", mlp(in_shape=(1, 28, 28)), (1, 28, 28), 0.02),
             ("own CNN small (MNIST)", cnn_small(in_shape=(1, 28, 28)), (1, 28, 28), 0.02),
             ("own ResNet (2,2)x(8,16) (CIFAR 16x16)", resnet(in_shape=(3, 16, 16), widths=(8, 16)), (3, 16, 16), 2 / 255),
             ("own sigmoid MLP 3x64", nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.Sigmoid(), nn.Linear(64, 64),
                                                   nn.Tanh(), nn.Linear(64, 64), nn.Sigmoid(), nn.Linear(64, 10)),
              (1, 28, 28), 0.05)]
    for name, model, shape, eps in specs:
        model.eval()
        x = torch.rand(2, *shape)
        yield dict(name=name, model=model, x=x, ptb=PerturbationLpNorm(norm=INF, eps=eps, x_L=0.0, x_U=1.0),
                   alpha={}, bound_opts={}, ref_lb=None, ref_ub=None)


CASES = {"vision": case_vision, "min_max": case_min_max, "simple_verification": case_simple_verification,
         "jacobian_mlp": case_jacobian_mlp, "s_shape": case_s_shape, "pow": case_pow, "own": case_own}


def run_case(c, extra_opts):
    model, x = c["model"], c["x"]
    net = BoundedModule(model, x, bound_opts=c["bound_opts"])
    bx = BoundedTensor(x, c["ptb"])
    upper = c.get("ref_ub") is not None or c.get("ref_lb") is None  # a lower-bound-only reference: lb only
    with torch.no_grad():
        t = time.perf_counter()
        lc, uc = net.compute_bounds(x=(bx,), method="CROWN", bound_upper=upper)
        t_c = time.perf_counter() - t
        t = time.perf_counter()
        la, ua = net.compute_bounds(x=(bx,), method="alpha-CROWN", bound_upper=upper,
                                    optimize_bound_args={**c["alpha"], **extra_opts})
        t_a = time.perf_counter() - t
    stats = getattr(net, "last_alpha_stats", {})
    row = dict(name=c["name"], crown=(lc.mean().item(), uc.mean().item() if upper else None),
               ours=(la.mean().item(), ua.mean().item() if upper else None), t_crown=t_c, t_alpha=t_a,
               iterations=stats.get("iterations"))
    if c.get("ref_lb") is not None:
        rl = c["ref_lb"].to(la.dtype).view_as(la)
        ru = c["ref_ub"].to(la.dtype).view_as(ua) if c.get("ref_ub") is not None and upper else None
        gain_ours = (la - lc).sum().item() + ((uc - ua).sum().item() if ru is not None else 0.0)
        gain_ref = (rl - lc).sum().item() + ((uc - ru).sum().item() if ru is not None else 0.0)
        worse = (rl - la).max().item()
        if ru is not None:
            worse = max(worse, (ua - ru).max().item())
        # a share of a gain that is rounding (auto_LiRPA gains nothing) says nothing: left out
        scale = rl.abs().sum().item() + (ru.abs().sum().item() if ru is not None else 0.0)
        row.update(ref=(rl.mean().item(), ru.mean().item() if ru is not None else None),
                   frac=gain_ours / gain_ref if abs(gain_ref) > 1e-4 * scale else float("nan"), worse=worse)
    return row


def _fmt(pair):
    lo, up = pair
    return f"{lo:.4g} / {up:.4g}" if up is not None else f"{lo:.4g} / -"


def table(rows):
    out = ["| case | CROWN lb / ub (mean) | α-CROWN (ours) | auto_LiRPA CROWN-Optimized | share of auto_LiRPA's gain "
           "| ours looser by at most | iterations | time CROWN / α-CROWN |",
           "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ref = _fmt(r["ref"]) if "ref" in r else "-"
        frac = f"{100 * r['frac']:.1f} %" if "frac" in r and math.isfinite(r["frac"]) else "-"
        worse = f"{r['worse']:.2e}" if "worse" in r else "-"
        out.append(f"| {r['name']} | {_fmt(r['crown'])} | {_fmt(r['ours'])} | {ref} | {frac} | {worse} | "
                   f"{r['iterations']} | {r['t_crown']:.2f} s / {r['t_alpha']:.2f} s |")
    return "\n".join(out)


# ---------------------------------------------------------------- CNN-7 memory check

def cnn7_child(batch: int, iterations: int, eps: float, extra: dict) -> dict:
    from certtrain_models import cnn_7layer
    torch.manual_seed(0)
    model = cnn_7layer(in_shape=(3, 32, 32), num_classes=10).eval()
    x = torch.rand(batch, 3, 32, 32)
    y = model(x).argmax(1)
    eye = torch.eye(10)
    C = (eye[y].unsqueeze(1) - eye.unsqueeze(0))[torch.arange(10)[None] != y[:, None]].view(batch, 9, 10)
    net = BoundedModule(model, x)
    bx = BoundedTensor(x, PerturbationLpNorm(norm=INF, eps=eps, x_L=0.0, x_U=1.0))
    base = rss_peak_gb()
    with torch.no_grad():
        t = time.perf_counter()
        lc, _ = net.compute_bounds(x=(bx,), C=C, method="CROWN", bound_upper=False)
        t_c = time.perf_counter() - t
        peak_c = rss_peak_gb()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        t = time.perf_counter()
        la, _ = net.compute_bounds(x=(bx,), C=C, method="alpha-CROWN", bound_upper=False,
                                   optimize_bound_args={"iteration": iterations, **extra})
        t_a = time.perf_counter() - t
    stats = net.last_alpha_stats
    kinds = {}
    for _, _, kind, _, _ in stats["layouts"]:
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(batch=batch, iterations=iterations, eps=eps, before_gb=base, crown_peak_gb=peak_c,
                alpha_peak_gb=rss_peak_gb(), alpha_mb=stats["alpha_bytes"] / 1e6, layouts=kinds,
                t_crown=t_c, t_alpha=t_a, crown_lb=lc.mean().item(), alpha_lb=la.mean().item())


def cnn7(batch, iterations, eps, extra, threads, mmap_threshold=None) -> dict:
    code = (f"import sys, json, torch; sys.path.insert(0, {str(ROOT / 'scripts')!r}); torch.set_num_threads({threads});"
            f"import bench_alpha_crown as b; print('RESULT', json.dumps(b.cnn7_child({batch}, {iterations}, {eps}, "
            f"{extra!r})))")
    env = dict(os.environ)
    if mmap_threshold:  # glibc: large blocks always mmapped, so freed memory leaves the RSS at once
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[7:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--opts", default="{}", help="extra optimize_bound_args (JSON) for every case")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a shared small CPU)")
    ap.add_argument("--cnn7-batch", type=int, default=2)
    ap.add_argument("--cnn7-iterations", type=int, default=2,
                    help="α-CROWN steps in the CNN-7 memory check (memory peaks in the first one)")
    ap.add_argument("--cnn7-eps", type=float, default=1 / 255)
    ap.add_argument("--cnn7-mmap-threshold", type=int, default=None,
                    help="set glibc's MALLOC_MMAP_THRESHOLD_ for the CNN-7 run (e.g. 131072): the peak RSS then "
                         "follows the live tensors instead of the allocator's retained heap (slower)")
    ap.add_argument("--no-cnn7", action="store_true")
    ap.add_argument("--cnn7-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    extra = json.loads(args.opts)
    if not args.cnn7_only:
        rows = []
        for name in args.cases:
            for c in CASES[name]():
                rows.append(run_case(c, extra))
                print(f"done: {rows[-1]['name']} ({rows[-1]['t_alpha']:.1f} s)", file=sys.stderr, flush=True)
        print(f"torch {torch.__version__}, {args.threads} thread(s), float32; options: certtrain defaults, the "
              f"reference test's iteration / lr_alpha, and {extra or 'nothing else'}\n")
        print(table(rows))
    if not args.no_cnn7:
        r = cnn7(args.cnn7_batch, args.cnn7_iterations, args.cnn7_eps, extra, args.threads, args.cnn7_mmap_threshold)
        malloc = (f", MALLOC_MMAP_THRESHOLD_={args.cnn7_mmap_threshold}" if args.cnn7_mmap_threshold
                  else ", default malloc (the RSS includes heap the allocator keeps)")
        print(f"\nCNN-7 (cnn_7layer, random weights) at 3x32x32, batch {r['batch']}, L∞ eps {r['eps']:.4g}, 9 margin "
              f"specs, lower bounds, default options but iteration={r['iterations']}{malloc}:")
        print(f"| CROWN | α-CROWN | peak RSS before / CROWN / α-CROWN | α + Adam state | α layouts "
              f"(relaxed node, start node) |\n| --- | --- | --- | --- | --- |\n"
              f"| {r['crown_lb']:.4g} in {r['t_crown']:.1f} s | {r['alpha_lb']:.4g} in {r['t_alpha']:.1f} s | "
              f"{r['before_gb']:.2f} / {r['crown_peak_gb']:.2f} / {r['alpha_peak_gb']:.2f} GB | "
              f"{r['alpha_mb']:.0f} MB | {r['layouts']} |")


if __name__ == "__main__":
    main()
