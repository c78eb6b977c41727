"""VNN-COMP instances end to end (real mnistfc networks and properties): every ``sat`` answer's
counterexample is re-run through the ONNX reference evaluator (independent of the torch
conversion) and checked against the property; every ``unsat`` is attacked by PGD with restarts in
the box; the csv runner and verify.py's onnx= / vnnlib= / instances= modes."""
import csv
import math
import os
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("CERTTRAIN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MNISTFC = SHARED / "vnncomp2021" / "mnistfc"
pytestmark = pytest.mark.skipif(not MNISTFC.is_dir(), reason=f"VNN-COMP 2021 mnistfc not found at {MNISTFC}")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (property, expected answer on mnist-net_256x2 with a 30 s timeout): decided by CROWN, by the
# search, falsified by the attack and by the search (measured; the expectation is asserted)
CASES = [("prop_2_0.03.vnnlib", "unsat"), ("prop_0_0.03.vnnlib", "unsat"), ("prop_7_0.05.vnnlib", "sat"),
         ("prop_0_0.05.vnnlib", "sat")]


@pytest.fixture(scope="module")
def verifier():
    from certtrain.vnncomp import PropertyVerifier

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield PropertyVerifier(MNISTFC / "mnist-net_256x2.onnx")
    torch.set_num_threads(n)


def _onnx_reference(x: torch.Tensor):
    import numpy as np
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(MNISTFC / "mnist-net_256x2.onnx"))
    sess = ReferenceEvaluator(model)
    name = model.graph.input[0].name
    return torch.from_numpy(np.asarray(sess.run(None, {name: x.numpy().astype(np.float32).reshape(1, 784, 1)})[0]))


def _pgd_breaks(model, prop, steps=100, restarts=10) -> bool:
    dj = prop.disjuncts[0]
    lo, hi = dj.input_box((1, 784, 1), torch.float32)
    C, d, _ = dj.spec(torch.float32)
    g = torch.Generator().manual_seed(0)
    x = lo + (hi - lo) * torch.rand((restarts, 784, 1), generator=g)
    step = (hi - lo) / 4
    for _ in range(steps):
        x.requires_grad_(True)
        v = model(x).flatten(1) @ C[0].T - d  # every conjunction is one row here
        if bool((v <= 0).any()):
            return True
        grad, = torch.autograd.grad(v.min(1).values.sum(), x)
        with torch.no_grad():
            x = torch.max(torch.min(x - step * grad.sign(), hi), lo)
            step = step * 0.97
    return False


@pytest.mark.parametrize("name,expected", CASES)
def test_mnistfc_instances(verifier, name, expected):
    from certtrain.vnnlib import read_vnnlib

    prop = read_vnnlib(MNISTFC / name)
    r = verifier.verify(MNISTFC / name, timeout=30)
    assert r.result == expected, r
    if r.result == "sat":
        x = r.counterexample
        assert prop.disjuncts[0].contains(x.double().reshape(-1)), "counterexample outside the box"
        y = _onnx_reference(x)  # the original network, not our conversion
        assert prop.counterexample_holds(y.double(), x.double()), "the ONNX network does not violate the property"
    else:
        assert not _pgd_breaks(verifier.model, prop), f"{name}: {r} but PGD finds a counterexample"


def test_instances_csv_runner(tmp_path):
    from certtrain.vnncomp import run_instances, summary_table

    csv_path = tmp_path / "inst.csv"
    rows = [("mnist-net_256x2.onnx", "prop_2_0.03.vnnlib", 5), ("mnist-net_256x2.onnx", "prop_7_0.05.vnnlib", 5),
            ("mnist-net_256x2.onnx", "prop_1_0.03.vnnlib", 0.5)]
    csv_path.write_text("".join(f"{MNISTFC / a},{MNISTFC / b},{t}\n" for a, b, t in rows))
    out = tmp_path / "results.csv"
    res = run_instances(csv_path, out, progress=False)
    assert [r.result for r in res][:2] == ["unsat", "sat"]
    assert res[2].result in ("timeout", "unsat")  # 0.5 s: almost surely a timeout, never a wrong answer
    with open(out) as f:
        lines = list(csv.DictReader(f))
    assert [ln["result"] for ln in lines] == [r.result for r in res]
    assert {"onnx", "vnnlib", "result", "stage", "time", "timeout"} <= set(lines[0])
    table = summary_table(res)
    assert "| mnist-net_256x2.onnx | 3 |" in table and "verified ≤ BaB" in table


def test_verify_py_onnx_modes(tmp_path):
    from hydra import compose, initialize_config_dir

    import verify

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("verify", overrides=[f"onnx='{MNISTFC / 'mnist-net_256x2.onnx'}'",
                                           f"vnnlib='{MNISTFC / 'prop_7_0.05.vnnlib'}'", "timeout=20",
                                           f"out='{tmp_path / 'one'}'", "torch_threads=1"])
        opts = verify.check_vnnlib_options(cfg)
        r = verify.run_vnnlib(cfg, opts)
        assert r["results"][0].result == "sat"
        assert (tmp_path / "one" / "counterexample.pt").is_file()
        assert "| sat |" in (tmp_path / "one" / "summary.md").read_text()
        # bad input: named, before any work
        bad = [([f"onnx='{MNISTFC / 'mnist-net_256x2.onnx'}'"], "needs both"),
               ([f"instances='{tmp_path / 'none.csv'}'"], "no such file"),
               ([f"instances='{MNISTFC / 'mnistfc_instances.csv'}'", "eps=0.1"], "apply to checkpoints"),
               ([f"instances='{MNISTFC / 'mnistfc_instances.csv'}'", "methods=[BaB,IBP]"], "last method"),
               ([f"instances='{MNISTFC / 'mnistfc_instances.csv'}'", "+bab.speed=3"], "unknown branch-and-bound"),
               ([f"instances='{MNISTFC / 'mnistfc_instances.csv'}'", "ckpt=x.ckpt"], "not both")]
        for ov, msg in bad:
            with pytest.raises((ValueError, FileNotFoundError), match=msg):
                verify.check_vnnlib_options(compose("verify", overrides=ov))
    assert math.isfinite(r["results"][0].time)
