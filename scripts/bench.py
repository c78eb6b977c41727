"""Certified-training step benchmark: natural, IBP, CROWN-IBP and CROWN-IBP + loss fusion
training steps side by side, plus verification throughput.

    python scripts/bench.py [--device cuda|cpu] [--out DIR] [--models ...] [--shapes ...]

One training step = forward, bounds, loss, backward, Adam step. Median over --reps steps after
--warmup steps; on CUDA timed with CUDA events, TF32 off. The ratio is to the natural step of the
same model, shape and batch. Verification: images/s of IBP, CROWN-IBP and CROWN lower bounds of
the 9 (K-1) margins under torch.no_grad(). Writes DIR/bench.md and DIR/bench.json.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm  # noqa: E402
from certtrain.loss_fusion import CrossEntropyBound, one_hot  # noqa: E402
from certtrain.losses import margin_spec, robust_ce  # noqa: E402
from models import cnn_7layer_bn, densenet, mlp, resnext, wide_resnet  # noqa: E402

MODELS = {"MLP": mlp, "CNN-7-BN": cnn_7layer_bn, "ResNeXt": resnext, "DenseNet": densenet,
          "WideResNet": wide_resnet}
SHAPES = {"MNIST": ((1, 28, 28), 10), "CIFAR": ((3, 32, 32), 10), "TinyImageNet": ((3, 64, 64), 200)}
STEPS = ["natural", "IBP", "CROWN-IBP", "CROWN-IBP+fusion"]


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, warmup: int, reps: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1e6


def training_step(kind: str, model, x, y, num_classes, eps):
    """A closure running one training step of the given kind (the CertifiedModule recipe with
    κ = 0.5 natural weight; CROWN-IBP with β = 1)."""
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    ptb = PerturbationLpNorm(norm=math.inf, eps=eps, x_L=0.0, x_U=1.0)
    if kind == "natural":
        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step
    if kind == "CROWN-IBP+fusion":
        oh = one_hot(y, num_classes, x)
        net = BoundedModule(CrossEntropyBound(model), (x[:1], oh[:1]))

        def step():
            opt.zero_grad(set_to_none=True)
            nat = F.cross_entropy(model(x), y)
            _, ub = net.compute_bounds(x=(BoundedTensor(x, ptb), oh), method="CROWN-IBP", bound_lower=False)
            (0.5 * nat + 0.5 * ub.mean()).backward()
            opt.step()
        return step
    net = BoundedModule(model, x[:1])
    C = margin_spec(y, num_classes).to(x)
    method = "IBP" if kind == "IBP" else "CROWN-IBP"

    def step():
        opt.zero_grad(set_to_none=True)
        nat = F.cross_entropy(net(x), y)  # the engine reuses this forward pass for the bounds
        lb, _ = net.compute_bounds(x=(BoundedTensor(x, ptb),), C=C, method=method, bound_upper=False)
        (0.5 * nat + 0.5 * robust_ce(lb)).backward()
        opt.step()
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--steps", nargs="+", default=STEPS, choices=STEPS)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--eps", type=float, default=2 / 255)
    p.add_argument("--verify", nargs="*", default=["IBP", "CROWN-IBP", "CROWN"],
                   help="verification methods whose throughput is measured (CNN-7-BN, CIFAR shape)")
    p.add_argument("--verify-batch", nargs="+", type=int, default=[128, 128, 1])
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    timer = Timer(device)
    rows, results = [], []
    header = ("| model | shape | batch | " + " | ".join(args.steps) + " |\n|---|---|---:|" +
              "---:|" * len(args.steps))
    print(header, flush=True)
    for mname in args.models:
        for sname in args.shapes:
            shape, k = SHAPES[sname]
            cells, nat = [], None
            for kind in args.steps:
                torch.manual_seed(0)
                model = MODELS[mname](in_shape=shape, num_classes=k).to(device).train()
                x = torch.rand(args.batch, *shape, device=device)
                y = torch.randint(0, k, (args.batch,), device=device)
                try:
                    step = training_step(kind, model, x, y, k, args.eps)
                    peak_reset(device)
                    t = timer(step, args.warmup, args.reps)
                    mem = peak_gb(device)
                except torch.OutOfMemoryError:
                    cells.append("out of memory")
                    results.append({"model": mname, "shape": sname, "step": kind, "error": "oom"})
                    continue
                nat = t if kind == "natural" else nat
                ratio = f" ({t / nat:.1f}x)" if nat and kind != "natural" else ""
                cells.append(f"{t * 1e3:.1f} ms{ratio}, {mem:.1f} GB")
                results.append({"model": mname, "shape": sname, "batch": args.batch, "step": kind,
                                "median_s": t, "ratio_to_natural": t / nat if nat else None, "peak_gb": mem})
                del model, step
            row = f"| {mname} | {sname} | {args.batch} | " + " | ".join(cells) + " |"
            rows.append(row)
            print(row, flush=True)
    vrows = []
    shape, k = SHAPES["CIFAR"]
    for method, b in zip(args.verify, args.verify_batch):
        torch.manual_seed(0)
        model = cnn_7layer_bn(in_shape=shape, num_classes=k).to(device).eval()
        x = torch.rand(b, *shape, device=device)
        y = torch.randint(0, k, (b,), device=device)
        net = BoundedModule(model, x[:1])
        C = margin_spec(y, k).to(x)
        bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=args.eps, x_L=0.0, x_U=1.0))
        with torch.no_grad():
            peak_reset(device)
            reps = 3 if method == "CROWN" else max(3, args.reps // 5)
            t = timer(lambda: net.compute_bounds(x=(bx,), C=C, method=method, bound_upper=False), 1, reps)
            tf = timer(lambda: model(x), 2, reps)
            mem = peak_gb(device)
        vrows.append(f"| {method} | {b} | {t * 1e3:.1f} ms | {b / t:.0f} | {t / tf:.1f}x | {mem:.2f} GB |")
        results.append({"verify": method, "batch": b, "median_s": t, "images_per_s": b / t,
                        "ratio_to_forward": t / tf, "peak_gb": mem})
        print(vrows[-1], flush=True)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    md = (f"Training steps (median of {args.reps} after {args.warmup} warm-up; ratio to natural), "
          f"eps={args.eps:.4g}, {machine}, torch {torch.__version__}\n\n{header}\n" + "\n".join(rows) +
          "\n\nVerification, CNN-7-BN at CIFAR shape, 9 margin specs, lower bounds\n\n"
          "| method | batch | time | images/s | ratio to forward | peak memory |\n|---|---:|---:|---:|---:|---:|\n" +
          "\n".join(vrows) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text(md)
    (args.out / "bench.json").write_text(json.dumps({"machine": machine, "torch": torch.__version__,
                                                     "results": results}, indent=1))
    print(f"\nwrote {args.out / 'bench.md'} and {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
