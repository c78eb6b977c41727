"""Benchmark of the bound engine: median time and peak memory of forward, IBP, CROWN-IBP and
CROWN for MLP, CNN-7-BN and a ResNet at MNIST and CIFAR shapes, batch 1/32/256, CPU and CUDA.

    python scripts/bench_bounds.py                 # all devices present, markdown table on stdout
    python scripts/bench_bounds.py --device cpu --batches 1 32 --out bench.md

Bounds are computed under torch.no_grad() (verification). Random weights, BN in eval mode,
9 margin specifications (C = e_y - e_j). A cell whose predicted time exceeds --cell-budget seconds
(from the same method at a smaller batch) is skipped and marked with its estimate.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm  # noqa: E402
from certtrain_models import cnn_7layer_bn, mlp, resnet  # noqa: E402

MODELS = {"MLP": lambda s: mlp(in_shape=s, num_classes=10),
          "CNN-7-BN": lambda s: cnn_7layer_bn(in_shape=s, num_classes=10),
          "ResNet": lambda s: resnet(in_shape=s, num_classes=10)}
SHAPES = {"MNIST": (1, 28, 28), "CIFAR": (3, 32, 32)}
METHODS = ["forward", "IBP", "CROWN-IBP", "CROWN"]


def rss_peak_gb() -> float:
    """Peak resident set size of this process in GB (VmHWM; NaN where /proc is missing)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return rss_peak_gb()


def measure(fn, device, budget: float, min_reps: int = 3, max_reps: int = 20):
    """Median seconds and peak memory (GB) over repeated calls after one warm-up."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    _reset_peak(device)
    t = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t
    peak = _peak(device)
    if first > budget / 2:
        return first, peak, 1
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget / 4):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), max(peak, _peak(device)), len(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--eps", type=float, default=1 / 255)
    p.add_argument("--cell-budget", type=float, default=60.0, help="seconds allowed per table cell")
    p.add_argument("--memory-budget", type=float, default=1.0, help="GiB for CROWN's coefficient chunks")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = p.parse_args(argv)

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    header = ("| device | model | shape | batch | " + " | ".join(args.methods) + " |\n"
              "| --- | --- | --- | ---: | " + " | ".join("---:" for _ in args.methods) + " |")
    print(header, flush=True)
    for dev_name in devices:
        device = torch.device(dev_name)
        for model_name in args.models:
            for shape_name in args.shapes:
                shape = SHAPES[shape_name]
                torch.manual_seed(0)
                model = MODELS[model_name](shape).to(device).eval()
                x_ex = torch.rand(1, *shape, device=device)
                net = BoundedModule(model, x_ex, bound_opts={"memory_budget": int(args.memory_budget * 2**30)})
                last = {}
                for batch in args.batches:
                    x0 = torch.rand(batch, *shape, device=device)
                    y = torch.randint(0, 10, (batch,), device=device)
                    eye = torch.eye(10, device=device)
                    C = eye[y].unsqueeze(1) - eye.unsqueeze(0)
                    C = C[eye[y] == 0].view(batch, 9, 10)
                    x = BoundedTensor(x0, PerturbationLpNorm(norm=math.inf, eps=args.eps, x_L=0.0, x_U=1.0))
                    cells = []
                    for method in args.methods:
                        if method in last:
                            b0, t0 = last[method]
                            est = t0 * batch / b0
                            if est > args.cell_budget:
                                cells.append(f"skipped (est. {est:.0f} s)")
                                continue
                        if method == "forward":
                            fn = lambda: model(x0)  # noqa: E731
                        else:
                            fn = lambda m=method: net.compute_bounds(x=(x,), C=C, method=m, bound_upper=False)  # noqa: E731
                        with torch.no_grad():
                            t, mem, reps = measure(fn, device, args.cell_budget)
                        last[method] = (batch, t)
                        unit = f"{t * 1e3:.1f} ms" if t < 10 else f"{t:.1f} s"
                        cells.append(f"{unit}, {mem:.2f} GB")
                    row = f"| {dev_name} | {model_name} | {shape_name} | {batch} | " + " | ".join(cells) + " |"
                    rows.append(row)
                    print(row, flush=True)
    mem_note = ("peak memory: CUDA max_memory_allocated; CPU: peak resident set size of the process "
                "(includes PyTorch itself, about 0.3-0.7 GB)")
    table = header + "\n" + "\n".join(rows) + f"\n\n{mem_note}; eps={args.eps:.4g} (L-inf), 9 margin specs, lower bounds only.\n"
    print("\n" + mem_note)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
