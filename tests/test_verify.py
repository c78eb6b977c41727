"""Verification (verify.py, certtrain.verification), atomic checkpoints, DDP on CPU and fail-fast errors.

(a) train → checkpoint → verify round trip on real MNIST (skipped without ../shared/datasets/MNIST);
(b) DDP with 2 CPU processes (gloo) in a subprocess; (c) bad input: missing / corrupted / foreign
checkpoints, eps < 0, unknown methods, models and datasets, missing data files.
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

ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
FAST = [  # digits, 64 training images, ε at its target after epoch 0
    "dataset.train_subset=64", "dataset.val_size=64", "dataset.test_subset=64", "dataset.batch_size=32",
    "schedule.start=0", "schedule.length=1", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
    "eval.val_pgd_steps=2", "eval.pgd_steps=3",
]
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
    """last.ckpt of a one-epoch mlp run on the bundled digits (no download)."""
    import train

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train.run(compose_train(tmp_path_factory.mktemp("digits"), [*FAST, "test=false"]))
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
    r = verify_dataset(module.net, dm.test_dataloader(), make_perturbation(0.1, "inf"), METHODS,
                       pgd_steps=10, progress=False)
    s = r.summary()
    assert r.n == n and s["n"] == n
    # the same numbers as train.py's final test on the same images and checkpoint
    assert s["clean"] == round(t["test/clean_acc"] * n)
    names = {"IBP": "ibp", "CROWN-IBP": "crown_ibp", "CROWN": "crown"}
    for m in METHODS:
        assert s["alone"][m] == round(t[f"test/verified_acc_{names[m]}"] * n), m
    # the cascade proves exactly what some method proves alone, i.e. at least each of them
    union = torch.zeros(n, dtype=torch.bool)
    for m in METHODS:
        assert s["verified"] >= s["alone"][m]
        union |= r.alone_verified[m]
    assert s["verified"] == int(union.sum()) == round(t["test/verified_acc"] * n)
    assert s["verified"] > 0 and s["clean"] > s["verified"]
    # sound: nothing verified is broken by PGD; PGD only attacks clean-correct samples
    assert r.unsound() == {**{m: 0 for m in METHODS}, "cascade": 0}
    assert not (r.verified & ~r.pgd_robust).any() and not (r.pgd_robust & ~r.clean_correct).any()
    # the cascade: stage k sees the PGD-robust samples not verified by stages < k
    assert r.cascade_in["IBP"] == s["pgd"]
    assert r.cascade_in["CROWN-IBP"] == r.cascade_in["IBP"] - r.cascade_verified["IBP"]
    assert r.cascade_in["CROWN"] == r.cascade_in["CROWN-IBP"] - r.cascade_verified["CROWN-IBP"]
    for i, by in enumerate(r.verified_by):
        if by:  # verified by that method, and not by an earlier one
            assert r.margin_lb[by][i] > 0
            assert all(not r.margin_lb[m][i] > 0 for m in METHODS[:METHODS.index(by)])
    assert all(math.isnan(float(v)) for v in r.margin_lb["CROWN"][~r.clean_correct])

    # verify.py (in-process, as the CLI runs it): CSV with one row per sample, summary files
    out = tmp_path / "verify"
    v = verify.run(compose_verify([f"ckpt='{ckpt}'", "eps=0.1", f"out='{out}'", "pgd_steps=10", "progress=false",
                                   "methods=[IBP,CROWN-IBP,CROWN]"]))
    with open(v["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n and [int(row["index"]) for row in rows] == list(range(n))
    assert set(rows[0]) == {"index", "label", "pred", "clean_correct", "pgd_robust", "verified_by", "seconds",
                            "margin_lb_IBP", "margin_lb_CROWN-IBP", "margin_lb_CROWN"}
    assert sum(row["verified_by"] != "" for row in rows) == s["verified"]
    assert all(row["pgd_robust"] == "1" for row in rows if row["verified_by"])
    assert sum(int(row["clean_correct"]) for row in rows) == s["clean"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verified"] == s["verified"] and summary["alone"] == s["alone"]
    assert "| verified: cascade IBP → CROWN-IBP → CROWN |" in (out / "summary.md").read_text()

    # subset= and a method subset: the first N test images, cascade over the given methods only
    v2 = verify.run(compose_verify([f"ckpt='{ckpt}'", f"out='{tmp_path / 'v2'}'", "subset=50", "batch_size=16",
                                    "methods=[crown_ibp,ibp]", "alone=false", "pgd_steps=5", "progress=false"]))
    r2 = v2["result"]
    assert r2.n == 50 and r2.methods == ["CROWN-IBP", "IBP"] and not r2.alone_verified
    assert torch.equal(r2.clean_correct, r.clean_correct[:50])
    assert set(r2.verified_by) <= {"", "CROWN-IBP", "IBP"}


def test_method_names():
    assert [canonical_method(m) for m in ("ibp", "crown_ibp", "IBP+backward", "backward", "Crown")] == [
        "IBP", "CROWN-IBP", "CROWN-IBP", "CROWN", "CROWN"]
    assert parse_methods("IBP,CROWN") == ["IBP", "CROWN"]
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
    for overrides, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            verify.prepare(compose_verify([*overrides, f"out='{tmp_path / 'out'}'"]))
    assert not (tmp_path / "out").exists()
    # the command line: one line on stderr, exit code 2, the checkpoint untouched
    before = sha(trunc)
    for args in ([f"ckpt={trunc}"], [f"ckpt={digits_ckpt}", "eps=-1"]):
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
    with pytest.raises(ValueError, match=r"unknown model 'models.nonexistent'.*available: .*cnn_small"):
        train.setup(compose_train(tmp_path, ["model._target_=models.nonexistent"]))
    with pytest.raises(ValueError, match=r"unknown dataset 'data.nope.NopeDataModule'.*MNISTDataModule"):
        train.setup(compose_train(tmp_path, ["dataset._target_=data.nope.NopeDataModule"]))


def test_missing_data_fails_before_training(tmp_path):
    import train
    from data import DatasetNotFoundError

    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = compose_train(tmp_path / "out", ["dataset=mnist", f"paths.data_dir='{empty}'"])
    with pytest.raises(DatasetNotFoundError) as e:
        train.setup(cfg)
    msg = str(e.value)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert str(empty / "MNIST" / "raw" / f) in msg
    assert not (tmp_path / "out").exists()  # nothing written
