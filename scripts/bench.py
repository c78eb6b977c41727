"""Certified-training step benchmark: natural, IBP, CROWN-IBP and CROWN-IBP + loss fusion
training steps side by side, the fast IBP paths next to the reference one, plus verification
throughput.

    python scripts/bench.py [--device cuda|cpu] [--out DIR] [--models ...] [--shapes ...]
    python scripts/bench.py --preset cnn7bn-mnist-narrow   # issue 9's CPU configuration (see below)

One training step = forward, bounds, loss, backward, Adam step. Median over --reps steps after
--warmup steps (at least one: the first call of a compiled path compiles); on CUDA timed with CUDA
events, TF32 off. The ratio is to the (eager) natural step of the same model, shape and batch.

Steps: "IBP" is the engine's reference path (clean pass + interval walk, ``ibp_skip_clean=False``);
"IBP+compile" the generated IBP program compiled by torch.compile (``ibp_compile``, backend
--compile-backend); optional extras: "natural+compile" (torch.compile'd model), "IBP+compile+bf16"
(``ibp_autocast="bfloat16"``), "IBP+compile+cudagraphs" (CUDA only).  --channels-last puts conv
models and inputs in channels_last memory format for every step.  Before a fast path is timed its
bound is compared with the reference path's on the same batch (column "max rel. diff").

--mode train|eval puts the model in that mode for the training steps (train: BatchNorm uses the
batch statistics of the clean pass, which the bounds then need); --optimizer sgd|adam; --loss mixed
(0.5·CE(clean) + 0.5·robust CE, the default) or robust (the robust CE of the margin lower bounds
alone, i.e. CE on -lb); --width / --linear-size narrow the conv models.  ``--preset
cnn7bn-mnist-narrow`` is the configuration of issue 9: CNN-7-BN with conv widths 32, 32, 64, 64, 64
and Linear 256, train mode, MNIST shape, batch 32, 2 threads, L∞ 0.1 in [0, 1], margin spec, CE on
-lb, SGD; steps natural, IBP (the default engine path), IBP-ref, CROWN-IBP.

Verification: images/s of lower bounds of the 9 (K-1) margins under torch.no_grad() on CNN-7-BN
at CIFAR shape: "IBP-ref" (reference path), "IBP" (the default: no clean pass), "IBP+compile",
"CROWN-IBP", "CROWN".  Writes DIR/bench.md and DIR/bench.json.
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
from certtrain_models import cnn_7layer_bn, densenet, mlp, resnext, wide_resnet  # noqa: E402

MODELS = {"MLP": mlp, "CNN-7-BN": cnn_7layer_bn, "ResNeXt": resnext, "DenseNet": densenet,
          "WideResNet": wide_resnet}
SHAPES = {"MNIST": ((1, 28, 28), 10), "CIFAR": ((3, 32, 32), 10), "TinyImageNet": ((3, 64, 64), 200)}
STEPS = ["natural", "IBP", "IBP+compile", "CROWN-IBP", "CROWN-IBP+fusion"]
#: "IBP-default": the engine's default path (the IBP program, no clean pass where none is needed)
EXTRA_STEPS_FIRST = ["IBP-default"]
PRESETS = {
    "cnn7bn-mnist-narrow": dict(models=["CNN-7-BN"], shapes=["MNIST"], batch=32, width=32, linear_size=256,
                                mode="train", eps=0.1, optimizer="sgd", loss="robust", threads=2,
                                steps=["natural", "IBP-default", "IBP", "CROWN-IBP"], verify=[], verify_batch=[1]),
}
EXTRA_STEPS = ["natural+compile", "IBP+compile+bf16", "IBP+compile+cudagraphs"] + EXTRA_STEPS_FIRST
VERIFY = ["IBP-ref", "IBP", "IBP+compile", "CROWN-IBP", "CROWN"]
REFERENCE = {"ibp_skip_clean": False}  # the engine's reference IBP path


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.first = 0.0  # seconds of the first call of the last measurement (compilation included)

    def once(self, fn) -> float:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def __call__(self, fn, warmup: int, reps: int) -> float:
        self.first = self.once(fn)
        for _ in range(warmup - 1):
            self.once(fn)
        return statistics.median(self.once(fn) for _ in range(reps))


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1e6


def fast_opts(kind: str, args) -> dict:
    """bound_opts of a fast IBP path (see certtrain.bounds.ibp_program)."""
    opts: dict = {}
    if "compile" in kind:
        opts["ibp_compile"] = {"backend": args.compile_backend}
    if "bf16" in kind:
        opts["ibp_autocast"] = "bfloat16"
    if "cudagraphs" in kind:
        opts["ibp_cuda_graphs"] = True
    if args.channels_last:
        opts["ibp_channels_last"] = True
    return opts


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: how far a fast path's bound is from the reference's."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def build_model(name: str, shape, num_classes: int, args):
    kw = {}
    if name != "MLP":
        if args.width:
            kw["width"] = args.width
        if args.linear_size and name in ("CNN-7-BN",):
            kw["linear_size"] = args.linear_size
    return MODELS[name](in_shape=shape, num_classes=num_classes, **kw)


def training_step(kind: str, model, x, y, num_classes, eps, args):
    """A closure running one training step of the given kind (the CertifiedModule recipe with
    κ = 0.5 natural weight; CROWN-IBP with β = 1), and for a fast IBP path the relative difference
    of its bound from the reference path's on this batch and the seconds of that first bound
    (None otherwise)."""
    opt = (torch.optim.SGD(model.parameters(), 1e-3) if args.optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), 1e-4))
    w_nat, w_rob = (0.0, 1.0) if args.loss == "robust" else (0.5, 0.5)
    ptb = PerturbationLpNorm(norm=math.inf, eps=eps, x_L=0.0, x_U=1.0)
    if kind.startswith("natural"):
        run = torch.compile(model, backend=args.compile_backend) if kind == "natural+compile" else model

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(run(x), y).backward()
            opt.step()
        return step, None
    if kind == "CROWN-IBP+fusion":
        oh = one_hot(y, num_classes, x)
        net = BoundedModule(CrossEntropyBound(model), (x[:1], oh[:1]))

        def step():
            opt.zero_grad(set_to_none=True)
            _, ub = net.compute_bounds(x=(BoundedTensor(x, ptb), oh), method="CROWN-IBP", bound_lower=False)
            loss = w_rob * ub.mean()
            if w_nat:
                loss = loss + w_nat * F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        return step, None
    C = margin_spec(y, num_classes).to(x)
    method = "CROWN-IBP" if kind == "CROWN-IBP" else "IBP"
    opts = fast_opts(kind, args) if kind.startswith("IBP+") else {} if kind in ("IBP-default", "CROWN-IBP") \
        else REFERENCE
    net = BoundedModule(model, x[:1], bound_opts=opts)

    def bound():
        # With a clean loss the engine reuses this forward pass for the bounds.
        nat = F.cross_entropy(net(x), y) if w_nat else None
        lb, _ = net.compute_bounds(x=(BoundedTensor(x, ptb),), C=C, method=method, bound_upper=False)
        return nat, lb

    def step():
        opt.zero_grad(set_to_none=True)
        nat, lb = bound()
        loss = w_rob * robust_ce(lb)
        if nat is not None:
            loss = loss + w_nat * nat
        loss.backward()
        opt.step()

    check = None
    if kind.startswith("IBP+"):
        ref = BoundedModule(model, x[:1], bound_opts=REFERENCE)
        ref(x)
        lb_ref, _ = ref.compute_bounds(x=(BoundedTensor(x, ptb),), C=C, method="IBP", bound_upper=False)
        t = time.perf_counter()
        lb = bound()[1].detach()  # compiles the forward; the first step then compiles the backward
        check = (rel_diff(lb, lb_ref.detach()), time.perf_counter() - t)
    return step, check


def verification_call(method: str, model, x, C, eps, args):
    """A closure computing the lower margin bounds by one verification method."""
    kind = "IBP" if method in ("IBP-ref", "IBP+compile") else method
    opts = REFERENCE if method == "IBP-ref" else fast_opts(method, args) if method == "IBP+compile" else {}
    net = BoundedModule(model, x[:1], bound_opts=opts)
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps, x_L=0.0, x_U=1.0))
    return lambda: net.compute_bounds(x=(bx,), C=C, method=kind, bound_upper=False)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), help="a named configuration (overrides the options it sets)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mode", choices=["train", "eval"], default="train", help="model mode during the training steps")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    p.add_argument("--loss", choices=["mixed", "robust"], default="mixed",
                   help="mixed: 0.5 CE(clean) + 0.5 robust CE; robust: the robust CE alone (CE on -lb)")
    p.add_argument("--width", type=int, default=None, help="conv width of the conv models (CNN-7-BN: w, w, 2w, 2w, 2w)")
    p.add_argument("--linear-size", type=int, default=None, help="hidden Linear size of the CNN models")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--shapes", "--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--steps", nargs="+", default=STEPS, choices=STEPS + EXTRA_STEPS)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--eps", type=float, default=2 / 255)
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the +compile paths")
    p.add_argument("--channels-last", action="store_true",
                   help="conv models and inputs in channels_last memory format (every step)")
    p.add_argument("--verify", nargs="*", default=VERIFY, choices=VERIFY,
                   help="verification methods whose throughput is measured (CNN-7-BN, CIFAR shape)")
    p.add_argument("--verify-batch", nargs="+", type=int, default=[128, 128, 128, 128, 1],
                   help="one batch size per --verify method (or one for all)")
    args = p.parse_args(argv)
    if args.preset:  # the preset's values, except where the command line sets another
        defaults = vars(p.parse_args([]))
        for k, v in PRESETS[args.preset].items():
            if getattr(args, k) == defaults[k]:
                setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    if len(args.verify_batch) not in (1, len(args.verify)):
        p.error(f"--verify-batch needs 1 or {len(args.verify)} values (one per --verify method)")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first call of a compiled path compiles)")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    timer = Timer(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    rows, checks, results = [], [], []
    header = ("| model | shape | batch | " + " | ".join(args.steps) + " |\n|---|---|---:|" +
              "---:|" * len(args.steps))
    print(header, flush=True)
    for mname in args.models:
        for sname in args.shapes:
            shape, k = SHAPES[sname]
            cells, nat = [], None
            for kind in args.steps:
                torch.manual_seed(0)
                model = build_model(mname, shape, k, args).to(device, memory_format=fmt).train(args.mode == "train")
                x = torch.rand(args.batch, *shape, device=device).contiguous(memory_format=fmt)
                y = torch.randint(0, k, (args.batch,), device=device)
                if "cudagraphs" in kind and device.type != "cuda":
                    cells.append("n/a (CUDA only)")
                    continue
                try:
                    step, check = training_step(kind, model, x, y, k, args.eps, args)
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
                diff, first = check if check is not None else (None, 0.0)
                first += timer.first  # the first bound and the first step: compilation included
                results.append({"model": mname, "shape": sname, "batch": args.batch, "step": kind,
                                "median_s": t, "ratio_to_natural": t / nat if nat else None, "peak_gb": mem,
                                "first_call_s": first, "max_rel_diff_vs_reference": diff})
                if diff is not None or "compile" in kind:
                    checks.append(f"| {mname} | {kind} | {first:.1f} s | "
                                  f"{'-' if diff is None else f'{diff:.1e}'} |")
                del model, step
            row = f"| {mname} | {sname} | {args.batch} | " + " | ".join(cells) + " |"
            rows.append(row)
            print(row, flush=True)
    vrows = []
    shape, k = SHAPES["CIFAR"]
    ref_lb = {}
    for method, b in zip(args.verify, args.verify_batch * len(args.verify) if len(args.verify_batch) == 1
                         else args.verify_batch):
        torch.manual_seed(0)
        model = cnn_7layer_bn(in_shape=shape, num_classes=k).to(device, memory_format=fmt).eval()
        x = torch.rand(b, *shape, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, k, (b,), device=device)
        C = margin_spec(y, k).to(x)
        with torch.no_grad():
            call = verification_call(method, model, x, C, args.eps, args)
            peak_reset(device)
            reps = 3 if method == "CROWN" else max(3, args.reps // 5)
            t = timer(call, 1, reps)
            first = timer.first
            tf = timer(lambda: model(x), 2, reps)
            mem = peak_gb(device)
            diff = None
            if method.startswith("IBP"):
                lb = call()
                if b not in ref_lb:
                    ref_lb[b] = verification_call("IBP-ref", model, x, C, args.eps, args)()
                diff = rel_diff(lb, ref_lb[b])
        vrows.append(f"| {method} | {b} | {t * 1e3:.1f} ms | {b / t:.0f} | {t / tf:.1f}x | {mem:.2f} GB | "
                     f"{first:.1f} s | {'-' if diff is None else f'{diff:.1e}'} |")
        results.append({"verify": method, "batch": b, "median_s": t, "images_per_s": b / t,
                        "ratio_to_forward": t / tf, "peak_gb": mem, "first_call_s": first,
                        "max_rel_diff_vs_reference": diff})
        print(vrows[-1], flush=True)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    layout = ", channels_last" if args.channels_last else ""
    setup = (f"mode {args.mode}, {args.optimizer}, loss {args.loss}"
             + (f", width {args.width}" if args.width else "") + (f", linear {args.linear_size}" if args.linear_size else ""))
    md = (f"Training steps (median of {args.reps} after {args.warmup} warm-up; ratio to natural), "
          f"eps={args.eps:.4g}, {setup}, {machine}, torch {torch.__version__}{layout}, compile backend "
          f"{args.compile_backend}\n\n{header}\n" + "\n".join(rows) +
          "\n\nFast paths: first bound + first step (compilation included) and the bound's max relative "
          "difference from the reference path on the same batch\n\n| model | step | first call | max rel. diff |\n"
          "|---|---|---:|---:|\n" + "\n".join(checks) +
          "\n\nVerification, CNN-7-BN at CIFAR shape, 9 margin specs, lower bounds\n\n"
          "| method | batch | time | images/s | ratio to forward | peak memory | first call | max rel. diff |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(vrows) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text(md)
    (args.out / "bench.json").write_text(json.dumps({"machine": machine, "torch": torch.__version__,
                                                     "channels_last": args.channels_last,
                                                     "compile_backend": args.compile_backend,
                                                     "results": results}, indent=1))
    print(f"\nwrote {args.out / 'bench.md'} and {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
