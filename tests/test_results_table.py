"""scripts/results_table.py: the docs/results.md rows come from verify.py's summary.json and the run's config."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "fast_ibp_0.1"
    (run / "train" / ".hydra").mkdir(parents=True)
    (run / "train" / "checkpoints").mkdir()
    (run / "train" / ".hydra" / "config.yaml").write_text(
        "method: {_target_: certtrain.methods.FastIBP}\nmodel: {_target_: certtrain_models.cnn_7layer_bn, width: 16}\nperturbation: {eps: 0.2}\n")
    (run / "train" / "checkpoints" / "last.ckpt").write_bytes(b"")
    point = {"kind": "full", "n": 200, "eps": 0.1, "clean": 190, "pgd": 170, "verified": 150, "not_attempted": 3,
             "methods": ["IBP", "CROWN-IBP", "CROWN", "alpha-CROWN"], "pgd_steps": 50, "pgd_restarts": 1,
             "verified_by": {"IBP": 140, "CROWN-IBP": 6, "CROWN": 3, "alpha-CROWN": 1}}
    (run / "verify").mkdir()
    (run / "verify" / "summary.json").write_text(json.dumps({"total_seconds": 120.0, "points": [point]}))
    return run


def test_row_from_files(tmp_path):
    run = _run(tmp_path)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_table.py"), str(run)],
                         capture_output=True, text=True, check=True).stdout
    row = out.strip().splitlines()[-1].split(" | ")
    assert row[0] == "| fast_ibp" and row[1] == "cnn_7layer_bn w16" and row[2] == "0.2" and row[3] == "0.1"
    assert row[4:8] == ["95.00", "85.00", "75.00", "140 / 6 / 3 / 1"]
    assert row[8] == "3" and row[9] == "50×1" and row[11] == "2.0"


def test_missing_summary_fails_with_a_message(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_table.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "summary.json not found" in res.stderr
