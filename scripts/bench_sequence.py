"""Cost of bounds through attention and LSTM cells: median time of forward, IBP,
CROWN-IBP and CROWN for a one-block Transformer (nn.MultiheadAttention with softmax, LayerNorm
full or mean-only, GELU FFN) and an LSTMCell classifier over input embeddings, under an L∞ ball.

    python scripts/bench_sequence.py                          # CPU, markdown table on stdout
    python scripts/bench_sequence.py --seq 8 16 32 --dim 32 --batch 8

Bounds under torch.no_grad() (verification); random weights; CROWN's intermediate bounds go
through every product of two bounded tensors (Q Kᵀ, P V) as matrix products.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm  # noqa: E402


class MeanOnlyLayerNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) * self.weight + self.bias


class Transformer(nn.Module):
    def __init__(self, d, heads, mean_only):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        norm = MeanOnlyLayerNorm if mean_only else nn.LayerNorm
        self.ln1, self.ln2 = norm(d), norm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        h = self.ln1(x + a)
        h = self.ln2(h + self.ffn(h))
        return self.head(h.mean(1))


class LSTM(nn.Module):
    def __init__(self, d, steps):
        super().__init__()
        self.steps, self.cell, self.head = steps, nn.LSTMCell(d, d), nn.Linear(d, 2)

    def forward(self, x):
        h, c = self.cell(x[:, 0])
        for t in range(1, self.steps):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


def _time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"L∞ eps={args.eps}, batch {args.batch}, dim {args.dim}, {args.heads} heads, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU\n")
    print("| model | T | forward | IBP | CROWN-IBP | CROWN | CROWN width / IBP width |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for T in args.seq:
        for name, model in (("Transformer (LayerNorm)", Transformer(args.dim, args.heads, False)),
                            ("Transformer (mean-only LN)", Transformer(args.dim, args.heads, True)),
                            ("LSTMCell", LSTM(args.dim, T))):
            model.eval()
            x0 = torch.randn(args.batch, T, args.dim)
            net = BoundedModule(model, x0)
            x = BoundedTensor(x0, PerturbationLpNorm(eps=args.eps))
            cells, widths = [], {}
            with torch.no_grad():
                cells.append(f"{_time(lambda: model(x0), args.reps) * 1e3:.1f} ms")
                for method in ("IBP", "CROWN-IBP", "CROWN"):
                    t = _time(lambda: net.compute_bounds(x=(x,), method=method), args.reps)
                    lb, ub = net.compute_bounds(x=(x,), method=method)
                    widths[method] = (ub - lb).mean().item()
                    cells.append(f"{t * 1e3:.1f} ms")
            ratio = widths["CROWN"] / widths["IBP"] if widths["IBP"] > 0 and math.isfinite(widths["IBP"]) else float("nan")
            print(f"| {name} | {T} | " + " | ".join(cells) + f" | {ratio:.2g} |")


if __name__ == "__main__":
    main()
