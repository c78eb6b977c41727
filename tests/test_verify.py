"""Verification (verify.py, certtrain.verification), atomic checkpoints, DDP on CPU and fail-fast errors.

(a) train → checkpoint → verify round trip on real MNIST (skipped without ../shared/datasets/MNIST);
(a') on the bundled digits: the α-CROWN stage, per-method batch sizes, stage limits ("not
attempted"), ε lists and the accuracy-vs-ε curve and PNG; (b) DDP with 2 CPU processes (gloo) in a
subprocess; (c) bad input: missing / corrupted / foreign checkpoints, eps < 0, bad ε lists and
limits, unknown methods, models and datasets, missing data files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = Path(os.environ.get("CERTTRAIN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DATASETS = SHARED / "datasets"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from certtrain.checkpoint_io import (  # noqa: E402
    DIGEST_KEY, AtomicCheckpointIO, CheckpointError, quote_path_overrides, read_checkpoint)
from certtrain.verification import (  # noqa: E402
    METHODS, canonical_method, load_for_verification, make_perturbation, parse_methods, verify_dataset)

CLASSIC = ["IBP", "CROWN-IBP", "CROWN"]  # the methods train.py's test reports

ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
FAST = [  # digits, 64 training images, ε at its target after epoch 0
    "dataset.train_subset=64", "dataset.val_size=64", "dataset.test_subset=64", "dataset.batch_size=32",
    "schedule.start=0", "schedule.length=1", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
    "eval.val_pgd_steps=2", "eval.pgd_steps=3",
]
# the digits model the verification tests share: all 1297 training images, ε = 0.1 from epoch 2 (~15 s)
DIGITS = [*FAST, "dataset.train_subset=null", "dataset.test_subset=100", "trainer.max_epochs=4", "schedule.length=2"]
# real MNIST round trip: 1000 training images, small mlp, ε = 0.1 (ramped over epochs 1-3 of 6: ~2 s)
MNIST = [
    "dataset=mnist", f"paths.data_dir='{DATASETS}'", "dataset.train_subset=1000", "dataset.val_size=200",
    "dataset.test_subset=300", "dataset.batch_size=32", "dataset.num_workers=0", "model=mlp", "model.hidden=[64,64]",
    "perturbation.eps=0.1", "schedule.start=1", "schedule.length=3", "trainer.max_epochs=6",
    "trainer.enable_progress_bar=false", "eval.val_pgd_steps=2", "eval.pgd_steps=10",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def compose_train(out: Path, overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir='{out}'", *overrides])


def compose_verify(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("verify", overrides=list(overrides))


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_script(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> Path:
    """last.ckpt of a four-epoch mlp run on the bundled digits (no download), 100 test images."""
    import train

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train.run(compose_train(tmp_path_factory.mktemp("digits"), [*DIGITS, "test=false"]))
    finally:
        torch.set_num_threads(n)
    assert isinstance(res["trainer"].strategy.checkpoint_io, AtomicCheckpointIO)
    return Path(res["last_ckpt"])


# ---------------------------------------------------------------- (a) round trip on real MNIST
@pytest.mark.skipif(not (DATASETS / "MNIST" / "raw").is_dir(), reason="real MNIST not in ../shared/datasets")
def test_train_checkpoint_verify_round_trip(tmp_path):
    import train
    import verify

    res = train.run(compose_train(tmp_path / "train", MNIST))
    t, ckpt = res["test"], Path(res["test_ckpt"])
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert ck[DIGEST_KEY] and ck["certtrain_config"]["model"]["hidden"] == [64, 64]

    module, dm, config = load_for_verification(ckpt)  # model and data from the checkpoint alone
    n = len(dm.test_set)
    assert n == 300 and config["dataset"]["test_subset"] == 300
    r = verify_dataset(module.net, dm.test_dataloader(), make_perturbation(0.1, "inf"), CLASSIC,
                       pgd_steps=10, progress=False)
    s = r.summary()
    assert r.n == n and s["n"] == n
    # the same numbers as train.py's final test on the same images and checkpoint
    assert s["clean"] == round(t["test/clean_acc"] * n)
    names = {"IBP": "ibp", "CROWN-IBP": "crown_ibp", "CROWN": "crown"}
    for m in CLASSIC:
        assert s["alone"][m] == round(t[f"test/verified_acc_{names[m]}"] * n), m
    # the cascade proves exactly what some method proves alone, i.e. at least each of them
    union = torch.zeros(n, dtype=torch.bool)
    for m in CLASSIC:
        assert s["verified"] >= s["alone"][m]
        union |= r.alone_verified[m]
    assert s["verified"] == int(union.sum()) == round(t["test/verified_acc"] * n)
    assert s["verified"] > 0 and s["clean"] > s["verified"]
    # sound: nothing verified is broken by PGD; PGD only attacks clean-correct samples
    assert r.unsound() == {**{m: 0 for m in CLASSIC}, "cascade": 0}
    assert not (r.verified & ~r.pgd_robust).any() and not (r.pgd_robust & ~r.clean_correct).any()
    # the cascade: stage k sees the PGD-robust samples not verified by stages < k
    assert r.cascade_in["IBP"] == s["pgd"]
    assert r.cascade_in["CROWN-IBP"] == r.cascade_in["IBP"] - r.cascade_verified["IBP"]
    assert r.cascade_in["CROWN"] == r.cascade_in["CROWN-IBP"] - r.cascade_verified["CROWN-IBP"]
    for i, by in enumerate(r.verified_by):
        if by:  # verified by that method, and not by an earlier one
            assert r.margin_lb[by][i] > 0
            assert all(not r.margin_lb[m][i] > 0 for m in CLASSIC[:CLASSIC.index(by)])
    assert all(math.isnan(float(v)) for v in r.margin_lb["CROWN"][~r.clean_correct])

    # verify.py (in-process, as the CLI runs it): CSV with one row per sample, summary files
    out = tmp_path / "verify"
    v = verify.run(compose_verify([f"ckpt='{ckpt}'", "eps=0.1", f"out='{out}'", "pgd_steps=10", "progress=false",
                                   "methods=[IBP,CROWN-IBP,CROWN]", "alone=true", "curve=false"]))
    with open(v["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n and [int(row["index"]) for row in rows] == list(range(n))
    assert set(rows[0]) == {"eps", "index", "label", "pred", "clean_correct", "pgd_robust", "status", "verified_by",
                            "skipped_by", "seconds", "margin_lb_IBP", "margin_lb_CROWN-IBP", "margin_lb_CROWN"}
    assert sum(row["verified_by"] != "" for row in rows) == s["verified"]
    assert sum(row["status"] == "verified" for row in rows) == s["verified"]
    assert all(row["pgd_robust"] == "1" for row in rows if row["verified_by"])
    assert sum(int(row["clean_correct"]) for row in rows) == s["clean"]
    summary = json.loads((out / "summary.json").read_text())["points"]
    assert len(summary) == 1 and summary[0]["verified"] == s["verified"] and summary[0]["alone"] == s["alone"]
    assert not (out / "accuracy_vs_eps.png").exists()  # one ε: no curve
    assert "| verified: cascade IBP → CROWN-IBP → CROWN |" in (out / "summary.md").read_text()

    # subset= and a method subset: the first N test images, cascade over the given methods only
    v2 = verify.run(compose_verify([f"ckpt='{ckpt}'", f"out='{tmp_path / 'v2'}'", "subset=50", "batch_size=16",
                                    "methods=[crown_ibp,ibp]", "alone=false", "pgd_steps=5", "progress=false",
                                    "curve=false"]))
    r2 = v2["result"]
    assert r2.n == 50 and r2.methods == ["CROWN-IBP", "IBP"] and not r2.alone_verified
    assert torch.equal(r2.clean_correct, r.clean_correct[:50])
    assert set(r2.verified_by) <= {"", "CROWN-IBP", "IBP"}


def test_method_names():
    assert [canonical_method(m) for m in ("ibp", "crown_ibp", "IBP+backward", "backward", "Crown")] == [
        "IBP", "CROWN-IBP", "CROWN-IBP", "CROWN", "CROWN"]
    assert {canonical_method(m) for m in ("alpha-CROWN", "alpha_crown", "Alpha-Crown", "CROWN-Optimized")} == {
        "alpha-CROWN"}
    assert METHODS == ("IBP", "CROWN-IBP", "CROWN", "alpha-CROWN", "BaB")
    assert parse_methods("IBP,CROWN") == ["IBP", "CROWN"]
    assert parse_methods("IBP,bab") == ["IBP", "BaB"]
    with pytest.raises(ValueError, match="must be the last method"):
        parse_methods(["BaB", "IBP"])
    with pytest.raises(ValueError, match="unknown verification method 'FOO'.*IBP, CROWN-IBP, CROWN"):
        parse_methods(["IBP", "FOO"])
    with pytest.raises(ValueError, match="more than once"):
        parse_methods(["IBP", "ibp"])
    with pytest.raises(ValueError, match="eps must be"):
        make_perturbation(-0.1)


def test_verify_eps_zero_and_l2(digits_ckpt):
    module, dm, _ = load_for_verification(digits_ckpt)
    r0 = verify_dataset(module.net, dm.test_dataloader(), make_perturbation(0.0), progress=False)
    assert torch.equal(r0.verified, r0.clean_correct) and torch.equal(r0.pgd_robust, r0.clean_correct)
    r2 = verify_dataset(module.net, dm.test_dataloader(), make_perturbation(0.3, 2), ["IBP", "CROWN"],
                        pgd_steps=3, progress=False)
    assert r2.unsound() == {"IBP": 0, "CROWN": 0, "cascade": 0}


# ---------------------------------------------------------------- (a') α-CROWN, cost control, ε curve (digits)
def _test_data(dm) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(b[0], b[1]) for b in dm.test_dataloader()])
    return torch.cat(xs), torch.cat(ys)


def _true_margins(net, x, y) -> torch.Tensor:
    """min_j z_y - z_j at x itself: every sound lower bound over a ball around x is below it."""
    with torch.no_grad():
        z = net.eval()(x)
    return (z.gather(1, y[:, None]) - z).masked_fill(torch.nn.functional.one_hot(y, z.shape[1]).bool(),
                                                      math.inf).min(1).values.double()


def test_alpha_crown_stage_verifies_at_least_crown(digits_ckpt):
    module, dm, _ = load_for_verification(digits_ckpt)
    r = verify_dataset(module.net, dm.test_dataloader(), make_perturbation(0.1), METHODS, pgd_steps=5,
                       alone=["CROWN"], progress=False)
    # the α-CROWN stage sees exactly what CROWN left over (PGD-robust, not verified by any cheaper stage)
    assert r.cascade_in["alpha-CROWN"] == r.cascade_in["CROWN"] - r.cascade_verified["CROWN"] > 0
    ran = ~r.margin_lb["alpha-CROWN"].isnan()
    assert int(ran.sum()) == r.cascade_in["alpha-CROWN"] and not r.margin_lb["CROWN"][ran].isnan().any()
    # never looser than CROWN on the same samples, and the cascade proves all CROWN proves alone
    assert (r.margin_lb["alpha-CROWN"][ran] >= r.margin_lb["CROWN"][ran] - 1e-5).all()
    assert not (r.alone_verified["CROWN"] & ~r.verified).any()
    assert r.summary()["verified"] >= r.summary()["alone"]["CROWN"]
    # sound: no PGD-broken sample verified, every lower bound below the margin at x itself
    assert r.unsound() == {"CROWN": 0, "cascade": 0}
    x, y = _test_data(dm)
    true = _true_margins(module.net, x, y)
    for m in METHODS:
        done = ~r.margin_lb[m].isnan()
        assert done.any() and (r.margin_lb[m][done] <= true[done] + 1e-5).all(), m
    assert {s for s, b in zip(r.status, r.verified_by) if b} == {"verified"}


def test_method_batch_size_keeps_bounds(digits_ckpt, monkeypatch):
    import certtrain.verification as ver

    module, dm, _ = load_for_verification(digits_ckpt)
    sizes: dict[str, list[int]] = {}
    inner = ver.margin_lower_bounds

    def spy(bounded, x, *args, **kwargs):
        sizes.setdefault(args[2], []).append(len(x))
        return inner(bounded, x, *args, **kwargs)

    monkeypatch.setattr(ver, "margin_lower_bounds", spy)
    split = {"CROWN-IBP": 3, "CROWN": 4, "alpha-CROWN": 5}
    # sparse_intermediate_bounds=False: every neuron's intermediate bounds by CROWN, so a sample's
    # bounds cannot depend on the others in its batch; by default CROWN refines the neurons that are
    # unstable for any sample of the batch, which moves bounds in the 5th digit (both sound).
    for opts, tol in (({"sparse_intermediate_bounds": False}, 1e-5), (None, 1e-3)):
        run = lambda **kw: verify_dataset(  # noqa: E731
            module.net, dm.test_dataloader(), make_perturbation(0.1), METHODS, pgd_steps=5, alone=False,
            bound_opts=opts, progress=False, **kw)
        sizes = {}
        ref = run()
        whole, sizes = sizes, {}
        sub = run(method_batch_size={"crown_ibp": 3, "CROWN": 4, "alpha_crown": 5})
        for m, bs in split.items():  # really split: one call had more samples before, none has now
            assert max(whole[m]) > bs and max(sizes[m]) <= bs and sum(sizes[m]) == sum(whole[m]), m
        assert sub.verified_by == ref.verified_by and torch.equal(sub.pgd_robust, ref.pgd_robust)
        for m in METHODS:
            a, b = ref.margin_lb[m], sub.margin_lb[m]
            assert torch.equal(a.isnan(), b.isnan()), m
            assert torch.allclose(a[~a.isnan()], b[~b.isnan()], rtol=tol, atol=tol), (m, opts)


def test_stage_limits_mark_not_attempted(tmp_path, digits_ckpt):
    import verify

    args = [f"ckpt='{digits_ckpt}'", "eps=0.1", "pgd_steps=5", "progress=false", "curve=false", "alone=false"]
    base = verify.run(compose_verify([*args, f"out='{tmp_path / 'a'}'"]))["result"]
    n_crown = base.cascade_in["CROWN"]
    assert n_crown > 2
    # CROWN may bound 2 samples, alpha-CROWN none: what reaches them is "not attempted"
    v = verify.run(compose_verify([*args, f"out='{tmp_path / 'b'}'", "max_samples.CROWN=2",
                                   "time_limit.alpha-CROWN=0"]))
    r, s = v["result"], v["result"].summary()
    for m in ("IBP", "CROWN-IBP"):  # the stages before the limits are untouched
        assert r.cascade_in[m] == base.cascade_in[m] and r.cascade_verified[m] == base.cascade_verified[m]
    assert r.cascade_in["CROWN"] == 2 and r.cascade_skipped["CROWN"] == n_crown - 2
    left = n_crown - r.cascade_verified["CROWN"]  # skipped by CROWN or not verified by it: on to alpha-CROWN
    assert r.cascade_in["alpha-CROWN"] == 0 and r.cascade_skipped["alpha-CROWN"] == left
    na = r.not_attempted
    assert int(na.sum()) == left == s["not_attempted"] == s["status"]["not attempted"]
    assert not (na & r.verified).any() and not (na & ~r.pgd_robust).any()
    assert not (r.verified & ~base.verified).any()
    assert s["verified"] == sum(base.cascade_verified[m] for m in ("IBP", "CROWN-IBP")) + r.cascade_verified["CROWN"]
    assert s["verified"] + s["not_attempted"] + s["status"]["not verified"] == s["pgd"]
    with open(v["csv"]) as f:
        rows = list(csv.DictReader(f))
    skipped = [row for row in rows if row["status"] == "not attempted"]
    assert len(skipped) == left and all(row["verified_by"] == "" and "alpha-CROWN" in row["skipped_by"].split(";")
                                        and row["margin_lb_alpha-CROWN"] == "" for row in skipped)
    assert sum(row["status"] == "verified" for row in rows) == s["verified"]
    point = json.loads((v["out"] / "summary.json").read_text())["points"][0]
    assert point["not_attempted"] == left and point["verified"] == s["verified"]
    assert point["limits"]["max_samples"] == {"CROWN": 2} and point["limits"]["time_limit"] == {"alpha-CROWN": 0.0}
    assert "| not attempted (stage limits; not verified) |" in (v["out"] / "summary.md").read_text()

    # without a limit of its own, alpha-CROWN takes what CROWN's limit skipped; those it does not
    # verify stay "not attempted" (the cascade did not run all its stages on them)
    module, dm, _ = load_for_verification(digits_ckpt)
    r2 = verify_dataset(module.net, dm.test_dataloader(), make_perturbation(0.1), METHODS, pgd_steps=5, alone=False,
                        max_samples={"CROWN": 2}, progress=False)
    assert r2.cascade_in["alpha-CROWN"] == left and r2.cascade_skipped["alpha-CROWN"] == 0
    skipped_crown = {i for i, by in enumerate(r2.skipped_by) if by == ("CROWN",)}
    assert len(skipped_crown) == n_crown - 2
    assert set(r2.not_attempted.nonzero().flatten().tolist()) == {i for i in skipped_crown if not r2.verified_by[i]}
    assert int(r2.verified.sum()) >= s["verified"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_eps_list_table_and_plot(tmp_path, digits_ckpt, capsys):
    import verify

    out = tmp_path / "curve"
    v = verify.run(compose_verify([f"ckpt='{digits_ckpt}'", f"out='{out}'", "eps=[0.2,0.05,0.1]",
                                   "methods=[IBP,CROWN-IBP]", "alone=true", "curve.eps=[0,0.3]", "pgd_steps=5",
                                   "progress=false"]))
    printed = capsys.readouterr().out
    res, summary = v["results"], json.loads((out / "summary.json").read_text())
    grid = [0.0, 0.05, 0.1, 0.2, 0.3]
    assert [r.eps for r in res] == grid and [row["eps"] for row in summary["curve"]] == grid
    assert summary["eps"] == [0.05, 0.1, 0.2] and summary["curve_eps"] == [0.0, 0.3]
    n = res[0].n
    for row in summary["curve"]:
        assert row["clean_acc"] == summary["curve"][0]["clean_acc"]  # the clean pass does not depend on ε
        # IBP alone runs on every clean-correct sample, PGD-broken ones too: a sound bound never
        # verifies more than PGD leaves standing (the cascade's own count is below PGD's by design)
        assert row["alone_acc"]["IBP"] <= row["pgd_acc"]
    ibp = [row["alone_acc"]["IBP"] for row in summary["curve"]]
    assert ibp == sorted(ibp, reverse=True) and ibp[0] > ibp[-1]
    for a, b in zip(res, res[1:]):  # per sample: a bigger ball never raises IBP's lower bound
        both = ~a.margin_lb["IBP"].isnan() & ~b.margin_lb["IBP"].isnan()
        assert both.any() and (b.margin_lb["IBP"][both] <= a.margin_lb["IBP"][both] + 1e-6).all()
    text = (out / "summary.md").read_text()
    assert "| ε | clean (%) | PGD (%) |" in text
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| 0")][:5] == [
        "0", "0.05", "0.1 (trained)", "0.2", "0.3"]
    with open(out / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * n and sorted({float(row["eps"]) for row in rows}) == grid
    png = out / "accuracy_vs_eps.png"
    w, h = _png_size(png)
    assert w > 300 and h > 200 and v["png"] == png and summary["plot"] == png.name
    assert str(png) in printed and "accuracy_vs_eps.png" in printed


def test_default_curve_runs_only_cheap_methods(tmp_path, digits_ckpt):
    import verify

    out = tmp_path / "auto"
    v = verify.run(compose_verify([f"ckpt='{digits_ckpt}'", f"out='{out}'", "methods=[IBP,CROWN-IBP,CROWN]",
                                   "alone=[IBP]", "pgd_steps=3", "pgd_restarts=2", "progress=false"]))
    res, curve = v["results"], v["summary"]["curve"]
    assert [r.eps for r in res] == pytest.approx([0.1 * f for f in verify.AUTO_CURVE])  # the checkpoint's ε = 0.1
    full = [r for r in res if r.methods == CLASSIC]
    assert [r.eps for r in full] == [0.1] and full[0] is v["result"] and full[0].pgd_restarts == 2
    for r in res:
        if r is not full[0]:  # the curve's extra ε: the cheap first stages, one PGD restart, IBP alone
            assert r.methods == ["IBP", "CROWN-IBP"] and "CROWN" not in r.margin_lb and r.pgd_restarts == 1
            assert list(r.alone_verified) == ["IBP"]
    i = res.index(full[0])
    n = full[0].n
    assert curve[i]["curve_acc"] == full[0].verified_by_stages(["IBP", "CROWN-IBP"]) / n <= curve[i]["verified_acc"]
    assert _png_size(out / "accuracy_vs_eps.png")[0] > 0
    with open(out / "samples.csv") as f:
        crown = [row["margin_lb_CROWN"] for row in csv.DictReader(f) if float(row["eps"]) != 0.1]
    assert crown and all(c == "" for c in crown)


# ---------------------------------------------------------------- atomic checkpoints
def test_atomic_checkpoint_failed_save_keeps_previous(tmp_path, monkeypatch):
    import certtrain.checkpoint_io as cio

    io, path = AtomicCheckpointIO(), tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)
    before = sha(path)

    class Boom:  # pickling fails in the middle of torch.save
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2, "x": Boom()}, path)

    def killed(obj, f, *args, **kwargs):  # half a file written, then the process "dies"
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(cio.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 3}, path)
    monkeypatch.undo()
    assert sha(path) == before and os.listdir(path.parent) == ["last.ckpt"]  # no temporary file left
    ck = read_checkpoint(path)
    assert ck["epoch"] == 1 and torch.equal(ck["state_dict"]["w"], torch.ones(3)) and ck[DIGEST_KEY]
    io.save_checkpoint({"state_dict": {"w": torch.full((3,), 2.0)}, "epoch": 4}, path)
    assert read_checkpoint(path)["epoch"] == 4

    # weights altered after the save no longer match their digest
    ck = torch.load(path, weights_only=False)
    ck["state_dict"]["w"][0] = 7.0
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="corrupted"):
        read_checkpoint(path)


def test_quote_path_overrides():
    assert quote_path_overrides(["ckpt=/a/best-epoch=003.ckpt", "eps=0.1", "ckpt_path=/x/last.ckpt"]) == [
        "ckpt='/a/best-epoch=003.ckpt'", "eps=0.1", "ckpt_path=/x/last.ckpt"]


# ---------------------------------------------------------------- (b) DDP on CPU
def test_ddp_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    p = run_script(["train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *FAST,
                    "dataset.train_subset=128", "logger=csv", f"hydra.run.dir={out}"], timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "distributed_backend=gloo" in p.stdout + p.stderr
    last = out / "checkpoints" / "last.ckpt"
    assert last.is_file()
    ck = read_checkpoint(last)
    assert ck["global_step"] == 2  # 128 images, batch 32 per process, 2 processes: 2 steps
    assert ck["certtrain_config"]["trainer"]["strategy"] == "ddp"
    assert "| clean |" in p.stdout


# ---------------------------------------------------------------- (c) bad input fails fast
def test_verify_bad_input(tmp_path, digits_ckpt):
    import verify

    ck = torch.load(digits_ckpt, map_location="cpu", weights_only=False)
    ck.pop("certtrain_config")
    noconf = tmp_path / "noconf.ckpt"
    torch.save(ck, noconf)
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes(digits_ckpt.read_bytes()[: digits_ckpt.stat().st_size // 2])
    cases = [
        ([f"ckpt='{tmp_path / 'nope.ckpt'}'"], FileNotFoundError, "does not exist"),
        ([f"ckpt='{noconf}'"], CheckpointError, "has no 'certtrain_config'"),
        ([f"ckpt='{trunc}'"], CheckpointError, "not a readable PyTorch checkpoint"),
        ([f"ckpt='{digits_ckpt}'", "eps=-0.1"], ValueError, "eps must be a finite number >= 0"),
        ([f"ckpt='{digits_ckpt}'", "methods=[IBP,FOO]"], ValueError, "unknown verification method 'FOO'"),
        ([], ValueError, "no checkpoint given"),
    ]
    ck = f"ckpt='{digits_ckpt}'"
    cases += [(  # ε lists, limits, α-CROWN options, the curve: all checked before the checkpoint is read
        [ck, *args], ValueError, msg) for args, msg in [
        (["eps=[]"], "eps is an empty list"),
        (["eps=[0.1,0.1]"], "eps lists 0.1 more than once"),
        (["eps=[0.1,-0.2]"], r"eps must be a finite number >= 0, got -0.2"),
        (["eps=[0.1,abc]"], "eps must be a number or a list of numbers, got 'abc'"),
        (["method_batch_size.CROWN=0"], r"method_batch_size.CROWN must be an integer >= 1"),
        (["method_batch_size.CROWN=2.5"], r"method_batch_size.CROWN must be an integer >= 1"),
        (["max_samples.alpha-CROWN=-1"], r"max_samples.alpha-CROWN must be an integer >= 0"),
        (["time_limit.CROWN=-5"], r"time_limit.CROWN must be a number >= 0"),
        (["+max_samples.FOO=5"], "max_samples: unknown verification method 'FOO'"),
        (["methods=[IBP,CROWN-IBP]", "max_samples.CROWN=5"], "max_samples sets CROWN, which is not among the methods"),
        (["methods=[IBP]", "alone=[CROWN]"], "alone lists CROWN, which is not among the methods"),
        (["alpha_crown.iteration=0"], r"alpha_crown.iteration must be an integer >= 1"),
        (["alpha_crown.lr_alpha=-1"], r"alpha_crown.lr_alpha must be a positive number"),
        (["+alpha_crown.lr=0.1"], "unknown alpha_crown key 'lr'"),
        (["curve.eps=[0.1,-1]"], r"curve.eps must be a finite number >= 0"),
        (["curve.methods=[CROWN-IBP]"], "must be the first stages of methods"),
        (["+curve.points=3"], "unknown curve option"),
    ]]
    for overrides, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            verify.prepare(compose_verify([*overrides, f"out='{tmp_path / 'out'}'"]))
    assert not (tmp_path / "out").exists()
    # the command line: one line on stderr, exit code 2, the checkpoint untouched
    before = sha(trunc)
    for args in ([f"ckpt={trunc}"], [f"ckpt={digits_ckpt}", "eps=[0.1,-1]", "max_samples.CROWN=-3"]):
        p = run_script(["verify.py", *args, f"out={tmp_path / 'cli'}"])
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("verify.py: error: ")
    assert sha(trunc) == before


def test_resume_into_wrong_architecture_fails_before_training(tmp_path, digits_ckpt):
    import train

    before = sha(digits_ckpt)
    cfg = compose_train(tmp_path / "a", [*FAST, "model=cnn_small", f"ckpt_path='{digits_ckpt}'"])
    with pytest.raises(CheckpointError, match=r"trained with model=mlp .* this run builds model=cnn_small"):
        train.setup(cfg)
    p = run_script(["train.py", *FAST, "model=cnn_small", f"ckpt_path={digits_ckpt}", f"hydra.run.dir={tmp_path / 'b'}"])
    assert p.returncode == 2
    assert "model=mlp" in p.stderr and "model=cnn_small" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "b" / "checkpoints").exists()
    # a corrupted checkpoint: a clear error, no training
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes(digits_ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        train.setup(compose_train(tmp_path / "c", [*FAST, f"ckpt_path='{trunc}'"]))
    assert sha(digits_ckpt) == before


def test_unknown_dataset_and_model(tmp_path):
    import train
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=r"dataset/nonexistent") as e:
        compose_train(tmp_path, ["dataset=nonexistent"])
    assert "mnist" in str(e.value.options)
    with pytest.raises(MissingConfigException, match=r"model/nonexistent"):
        compose_train(tmp_path, ["model=nonexistent"])
    with pytest.raises(ValueError, match=r"unknown model 'certtrain_models.nonexistent'.*available: .*cnn_small"):
        train.setup(compose_train(tmp_path, ["model._target_=certtrain_models.nonexistent"]))
    with pytest.raises(ValueError, match=r"unknown dataset 'certtrain_data.nope.NopeDataModule'.*MNISTDataModule"):
        train.setup(compose_train(tmp_path, ["dataset._target_=certtrain_data.nope.NopeDataModule"]))


def test_missing_data_fails_before_training(tmp_path):
    import train
    from certtrain_data import DatasetNotFoundError

    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = compose_train(tmp_path / "out", ["dataset=mnist", f"paths.data_dir='{empty}'"])
    with pytest.raises(DatasetNotFoundError) as e:
        train.setup(cfg)
    msg = str(e.value)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert str(empty / "MNIST" / "raw" / f) in msg
    assert not (tmp_path / "out").exists()  # nothing written


def test_checkpoint_with_old_import_names_loads(digits_ckpt, tmp_path):
    """Checkpoints written before models/ and data/ installed as certtrain_models / certtrain_data
    name ``models.mlp`` / ``data.digits.DigitsDataModule``: they upgrade on load, same weights."""
    ck = torch.load(digits_ckpt, map_location="cpu", weights_only=False)
    cfg = ck["certtrain_config"]
    assert cfg["model"]["_target_"].startswith("certtrain_models.")
    cfg["model"]["_target_"] = cfg["model"]["_target_"].replace("certtrain_models.", "models.")
    cfg["dataset"]["_target_"] = cfg["dataset"]["_target_"].replace("certtrain_data.", "data.")
    old = tmp_path / "old.ckpt"
    torch.save(ck, old)
    module, dm, config = load_for_verification(old)
    assert config["model"]["_target_"].startswith("certtrain_models.")
    ref, _, _ = load_for_verification(digits_ckpt)
    for a, b in zip(module.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_trained_model_beats_an_untrained_one(digits_ckpt):
    """Training works: the digits run's model verifies (IBP and CROWN) far more test images than the
    same architecture freshly initialized, which verifies about none."""
    module, dm, config = load_for_verification(digits_ckpt)
    ptb = make_perturbation(config["perturbation"]["eps"], "inf")
    trained = verify_dataset(module.net.eval(), dm.test_dataloader(), ptb, CLASSIC, pgd_steps=5, progress=False)
    torch.manual_seed(0)
    fresh_module, _, _ = load_for_verification(digits_ckpt)
    for m in fresh_module.net.modules():  # re-initialize every layer
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    fresh = verify_dataset(fresh_module.net.eval(), dm.test_dataloader(), ptb, CLASSIC, pgd_steps=5, progress=False)
    s, f = trained.summary(), fresh.summary()
    assert s["clean_acc"] > f["clean_acc"] + 0.3
    assert s["verified_acc"] > f["verified_acc"] + 0.2 and f["verified_acc"] < 0.1


def test_verify_with_branch_and_bound(tmp_path, digits_ckpt):
    """BaB ends the cascade: it verifies at least what the cascade before it does, and every sample
    it verifies withstands a much stronger PGD (200 steps, 10 restarts) than the cascade's."""
    import verify
    from certtrain.attacks import pgd_accuracy

    args = [f"ckpt='{digits_ckpt}'", "eps=0.15", "pgd_steps=10", "progress=false", "curve=false", "alone=false",
            "subset=40", "torch_threads=1"]
    v = verify.run(compose_verify([*args, f"out='{tmp_path / 'b'}'", "methods=[IBP,CROWN,BaB]", "bab.timeout=2"]))
    r = v["result"]
    assert r.methods == ["IBP", "CROWN", "BaB"] and r.unsound()["cascade"] == 0
    by_bab = torch.tensor([b == "BaB" for b in r.verified_by])
    assert r.cascade_in["BaB"] > 0 and int(by_bab.sum()) > 0, r.cascade_verified
    module, dm, _ = load_for_verification(digits_ckpt, subset=40)
    xs, ys = map(torch.cat, zip(*[(b[0], b[1]) for b in dm.test_dataloader()]))
    idx = by_bab.nonzero().flatten()
    torch.manual_seed(1)
    robust = pgd_accuracy(module.net.eval(), xs[idx], ys[idx], 0.15, steps=200, restarts=10, x_min=0.0, x_max=1.0)
    assert bool(robust.all()), "a sample verified by BaB was broken by PGD"
    assert "| 3 | BaB |" in (v["out"] / "summary.md").read_text()
    with pytest.raises(ValueError, match="L∞ boxes"):
        verify.prepare(compose_verify([*args, f"out='{tmp_path / 'c'}'", "norm=2", "methods=[IBP,BaB]"]))


# ---------------------------------------------------------------- local Lipschitz table (scripts/lipschitz.py)
def _lipschitz_table(ckpt: Path, out: Path, eps=("0", "0.02")) -> list[dict]:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import lipschitz
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    res = lipschitz.main(["--ckpt", str(ckpt), "--images", "6", "--eps", *eps, "--samples", "64",
                          "--ascent-steps", "3", "--alpha-iterations", "3", "--out", str(out)])
    for suffix in (".md", ".csv", ".png"):
        assert out.with_suffix(suffix).is_file()
    return res["rows"]


def _check_lipschitz_rows(rows: list[dict]) -> None:
    """ε = 0: every bound is the gradient's norm itself; ε > 0: sampled <= α-CROWN <= CROWN <= IBP and
    CROWN below the naive product of layer norms."""
    r0, r1 = rows
    for m in ("IBP", "CROWN", "CROWN+αfwd", "α-CROWN"):
        assert r0[m] == pytest.approx(r0["sampled"], rel=1e-4)
        assert r1["sampled"] <= r1[m] * (1 + 1e-6)
    assert r1["α-CROWN"] <= r1["CROWN+αfwd"] * (1 + 1e-6) and r1["CROWN+αfwd"] <= r1["CROWN"] * (1 + 1e-6)
    assert r1["CROWN"] < r1["IBP"] and r1["CROWN"] < r1["naive"]
    assert r1["sampled"] >= r0["sampled"] * (1 - 1e-6)  # the ball contains its centre


def test_lipschitz_table_for_a_checkpoint(tmp_path, digits_ckpt):
    _check_lipschitz_rows(_lipschitz_table(digits_ckpt, tmp_path / "lip"))
    assert "| ε | sampled (lower) | IBP | CROWN |" in (tmp_path / "lip.md").read_text()


def test_lipschitz_table_for_a_tanh_mlp(tmp_path):
    import train

    res = train.run(compose_train(tmp_path / "train", [*FAST, "model.activation=tanh", "method=natural", "test=false"]))
    _check_lipschitz_rows(_lipschitz_table(Path(res["last_ckpt"]), tmp_path / "lip", eps=("0", "0.005")))
