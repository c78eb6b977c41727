"""CROWN-IBP training step with and without loss fusion, many classes (TinyImageNet shape).

    python scripts/bench_loss_fusion.py [--device cpu|cuda] [--classes 200] [--batch 8] [--width 16]

One step = forward, bounds, robust loss, backward, Adam. Unfused: CROWN-IBP lower bounds of the
K-1 margins (C = e_y - e_j), loss CE([0, -lb]). Fused: CROWN-IBP upper bound of the loss itself
(one backward row per example). Each configuration runs in its own subprocess so that the CPU peak
resident memory is its own; on CUDA, torch.cuda.max_memory_allocated. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(args) -> dict:
    import torch
    sys.path.insert(0, str(ROOT))
    from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm
    from certtrain.loss_fusion import CrossEntropyBound, one_hot
    from certtrain.losses import margin_spec, robust_ce
    from certtrain_models import cnn_7layer_bn

    torch.manual_seed(0)
    dev = torch.device(args.device)
    shape = (3, args.size, args.size)
    model = cnn_7layer_bn(in_shape=shape, num_classes=args.classes, width=args.width,
                          linear_size=8 * args.width).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.rand(args.batch, *shape, device=dev)
    y = torch.randint(0, args.classes, (args.batch,), device=dev)
    ptb = PerturbationLpNorm(norm=math.inf, eps=2 / 255, x_L=0.0, x_U=1.0)
    if args.fused:
        oh = one_hot(y, args.classes, x)
        net = BoundedModule(CrossEntropyBound(model), (x, oh))
    else:
        net = BoundedModule(model, x)
        C = margin_spec(y, args.classes).to(x)

    def step():
        opt.zero_grad()
        if args.fused:
            _, ub = net.compute_bounds(x=(BoundedTensor(x, ptb), oh), method="CROWN-IBP", bound_lower=False)
            loss = ub.mean()
        else:
            lb, _ = net.compute_bounds(x=(BoundedTensor(x, ptb),), C=C, method="CROWN-IBP", bound_upper=False)
            loss = robust_ce(lb)
        loss.backward()
        opt.step()
        return loss.item()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.reps):
        sync()
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1e9
    else:
        peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1e6
    times.sort()
    return {"fused": args.fused, "median_s": times[len(times) // 2], "peak_gb": peak, "loss": loss}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--width", type=int, default=16, help="CNN-7-BN width (64 in the literature)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--fused", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    if args.fused is not None:
        print(json.dumps(one(args)))
        return 0
    rows = []
    for fused in (0, 1):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--fused", str(fused)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            res = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else \
                {"error": f"exit {r.returncode} (killed: out of memory?)" if r.returncode < 0 else r.stderr.strip()[-200:]}
        except subprocess.TimeoutExpired:
            res = {"error": f"timeout after {args.timeout:.0f} s"}
        rows.append(("fused" if fused else "unfused", res))
    print(f"CNN-7-BN width {args.width}, {args.classes} classes, input 3x{args.size}x{args.size}, batch {args.batch}, "
          f"CROWN-IBP training step on {args.device}\n")
    print("| loss | median step time | peak memory | robust loss |\n| --- | ---: | ---: | ---: |")
    for name, r in rows:
        if "error" in r:
            print(f"| {name} | {r['error']} | | |")
        else:
            print(f"| {name} | {r['median_s'] * 1e3:.0f} ms | {r['peak_gb']:.2f} GB | {r['loss']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
