"""Verify a checkpoint against its own threat model (L∞ / L2 ball, L0 budget or weight ball) through
`certtrain.verification.make_task`: clean, the threat's attack, and IBP / CROWN-IBP / CROWN (cascade
and each alone) on the first N test images.

    python scripts/verify_threat.py CKPT [--eps K] [--subset 1000] [--methods IBP CROWN-IBP CROWN]
                                   [--alone IBP CROWN-IBP] [--pgd-steps 50] [--pgd-restarts 3]
                                   [--batch-size 250] [--threads 2] [--data-dir DIR] [--out DIR]

Defaults: ε the checkpoint's ``perturbation.eval_eps``, attack steps / restarts its ``eval.pgd_*``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--eps", type=float, default=None, help="radius (L0: pixels); default the checkpoint's eval_eps")
    p.add_argument("--subset", type=int, default=1000, help="first N test images")
    p.add_argument("--methods", nargs="+", default=["IBP", "CROWN-IBP", "CROWN"])
    p.add_argument("--alone", nargs="*", default=None,
                   help="methods also run alone on every clean-correct sample (default: all of --methods)")
    p.add_argument("--pgd-steps", type=int, default=None)
    p.add_argument("--pgd-restarts", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for samples.csv and summary.json")
    a = p.parse_args(argv)

    import torch

    from certtrain.verification import load_for_verification, make_task, parse_methods, run_verification

    torch.set_num_threads(a.threads)
    try:
        methods = parse_methods(a.methods)
        alone = methods if a.alone is None else (parse_methods(a.alone) if a.alone else [])
        module, dm, config = load_for_verification(a.ckpt, subset=a.subset, batch_size=a.batch_size,
                                                   data_dir=a.data_dir)
        ev = config.get("eval", {})
        steps = a.pgd_steps if a.pgd_steps is not None else int(ev.get("pgd_steps", 20))
        restarts = a.pgd_restarts if a.pgd_restarts is not None else int(ev.get("pgd_restarts", 1))
        threat = module.threat
        eps = threat.eval_eps if a.eps is None else a.eps
        eps = int(eps) if float(eps).is_integer() and getattr(threat, "norm", None) == 0 else eps
        task = make_task(module.net, threat, eps, pgd_steps=steps, pgd_restarts=restarts,
                         pgd_step_size=ev.get("pgd_step_size"), bound_opts=module.evaluation.bound_opts)
    except (ValueError, FileNotFoundError) as e:
        print(f"verify_threat.py: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    res = run_verification(task, module.net, dm.test_dataloader(), methods, num_classes=module.num_classes,
                           alone=alone, device="cpu", seed=a.seed, progress=False, pgd_steps=steps,
                           pgd_restarts=restarts)
    total = time.perf_counter() - t0
    model = config["model"]["_target_"].rsplit(".", 1)[-1]
    title = (f"{a.ckpt}\n\nTest set ({res.n} images), {threat.describe(eps)}, {model} / "
             f"{config['method'].get('_target_', '?').rsplit('.', 1)[-1]}, trained at ε = {threat.eps:g}")
    text = f"{title}\n\n{res.to_markdown()}\n\ntotal: {total:.1f} s"
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        res.write_csv(out / "samples.csv")
        (out / "summary.md").write_text(text + "\n")
        (out / "summary.json").write_text(json.dumps({"ckpt": a.ckpt, **res.summary()}, indent=2, default=str) + "\n")
    bad = res.unsound()
    if any(bad.values()):
        print(f"WARNING: verified samples broken by the attack: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
