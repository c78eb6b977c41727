"""Collect training + verify.py results into one markdown table (docs/results.md's rows).

    python scripts/results_table.py outputs/results/fast_ibp_0.1 outputs/results/mtl_ibp_0.1 ...

Each run folder holds ``train/`` (train.py's Hydra output: .hydra/config.yaml, checkpoints/) and
``verify/summary.json`` (verify.py).  Every figure comes from those files: clean / PGD / certified
accuracy at the verified ε, how many samples each cascade stage certified, samples not attempted
(stage caps), and wall times (training: from the run's config file to its last checkpoint).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _pct(c: int, n: int) -> str:
    return f"{100 * c / max(n, 1):.2f}"


def row(run: Path) -> list[str]:
    summary = json.loads((run / "verify" / "summary.json").read_text())
    p = next(pt for pt in summary["points"] if pt.get("kind", "full") == "full")
    cfg_file = run / "train" / ".hydra" / "config.yaml"
    last = run / "train" / "checkpoints" / "last.ckpt"
    train_s = last.stat().st_mtime - cfg_file.stat().st_mtime if cfg_file.exists() and last.exists() else float("nan")
    import yaml  # PyYAML comes with hydra-core

    cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else {}
    from certtrain.methods import method_name

    method = method_name(cfg["method"]) if cfg.get("method") else run.name
    model = cfg.get("model", {})
    n = p["n"]
    by = p["verified_by"]
    stages = " / ".join(str(by.get(m, 0)) for m in p["methods"])
    return [method, f"{model.get('_target_', '?').rsplit('.', 1)[-1]} w{model.get('width', '?')}",
            f"{cfg.get('perturbation', {}).get('eps', '?')}", f"{p['eps']:g}", _pct(p["clean"], n),
            _pct(p["pgd"], n), _pct(p["verified"], n), stages, str(p.get("not_attempted", 0)),
            f"{p['pgd_steps']}×{p['pgd_restarts']}", f"{train_s / 60:.1f}", f"{summary['total_seconds'] / 60:.1f}", str(n)]


HEADER = ["method", "model", "train ε", "test ε", "clean %", "PGD %", "certified %",
          "certified by IBP / CROWN-IBP / CROWN / α-CROWN", "not attempted", "PGD steps×restarts",
          "train (min)", "verify (min)", "test images"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for run in args.runs:
        if not (run / "verify" / "summary.json").exists():
            print(f"results_table.py: {run}/verify/summary.json not found (run verify.py first)", file=sys.stderr)
            return 2
        lines.append("| " + " | ".join(row(run)) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
