"""Certified training: schedules, losses, PGD, Hydra configs, short fits, checkpoints and resume.

Everything runs in-process on the 8x8 digits (no download) and takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from certtrain.attacks import pgd_attack  # noqa: E402
from certtrain.losses import margin_spec, robust_ce, verified  # noqa: E402
from certtrain.certified_module import module_from_config  # noqa: E402
from certtrain.methods import method_name  # noqa: E402
from train_checks import check_test_metrics  # noqa: E402
from certtrain.schedules import ConstantSchedule, LinearSchedule, SmoothedSchedule, build_schedule  # noqa: E402

GROUPS = ["dataset", "model", "method", "perturbation", "schedule", "trainer", "logger", "paths", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]

# tiny, fast runs: 64 training images, ε reaches its target after the first epoch
FAST = [
    "dataset.train_subset=64", "dataset.val_size=64", "dataset.test_subset=64", "dataset.batch_size=32",
    "schedule.start=0", "schedule.length=1", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1", "eval.val_pgd_steps=2", "eval.pgd_steps=3",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def compose_cfg(tmp_path: Path, overrides: list[str] = ()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir='{tmp_path}'", *overrides])


def run_cfg(tmp_path: Path, overrides: list[str]):
    import train

    return train.run(compose_cfg(tmp_path, [*FAST, *overrides]))


# ---------------------------------------------------------------- schedules / losses / attack
def test_schedules():
    spe = 10
    lin = LinearSchedule(0.0, 0.4, start=1, length=2)
    assert [lin.value(s, spe) for s in (0, 10, 20, 30, 99)] == [0.0, 0.0, 0.2, 0.4, 0.4]
    sm = SmoothedSchedule(0.0, 1.0, start=1, length=4, exponent=4.0, mid_point=0.25)
    vals = [sm.value(s, spe) for s in range(0, 60)]
    assert vals[10] == 0.0 and vals[50] == 1.0 and vals[59] == 1.0
    assert all(b >= a for a, b in zip(vals, vals[1:])), "monotone"
    assert sm.value(15, spe) < lin.value(15, spe) / 2  # polynomial start is slower than linear
    # continuous at the switch point (10 + 0.25 * 40 = step 20)
    assert abs(sm.value(20, spe) - sm.value(20 - 1e-6, spe)) < 1e-6
    kappa = LinearSchedule(1.0, 0.5, start=0, length=1)  # decreasing schedules (κ, β) work too
    assert kappa.value(5, 10) == pytest.approx(0.75) and kappa.value(10, 10) == 0.5
    assert ConstantSchedule(0.0, 0.3).value(0, 1) == 0.3
    assert isinstance(build_schedule({"name": "smoothed", "start": 0, "length": 1}, 0, 1), SmoothedSchedule)
    with pytest.raises(ValueError, match="unknown schedule"):
        build_schedule({"name": "cosine"}, 0, 1)
    with pytest.raises(ValueError, match=">= 0"):
        LinearSchedule(0, 1, start=-1, length=1)


def test_margin_spec_and_robust_ce():
    y = torch.tensor([0, 2, 1])
    C = margin_spec(y, 3)
    assert C.shape == (3, 2, 3)
    z = torch.randn(3, 3)
    margins = torch.bmm(C, z.unsqueeze(-1)).squeeze(-1)
    for i in range(3):
        others = [j for j in range(3) if j != int(y[i])]
        assert torch.allclose(margins[i], z[i, y[i]] - z[i, others])
    # with exact margins the robust CE is the ordinary CE
    assert torch.allclose(robust_ce(margins), torch.nn.functional.cross_entropy(z, y), atol=1e-6)
    assert verified(torch.tensor([[0.1, 0.2], [0.1, -0.1]])).tolist() == [True, False]
    with pytest.raises(ValueError):
        margin_spec(torch.tensor([3]), 3)


@pytest.mark.parametrize("norm", ["inf", 2])
def test_pgd_stays_in_ball_and_box(norm):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    with torch.no_grad():  # works inside no_grad / inference mode, as in validation
        adv = pgd_attack(model, x, y, eps=0.3, norm=norm, steps=5, restarts=2)
    d = (adv - x).flatten(1)
    size = d.abs().max(1).values if norm == "inf" else d.norm(dim=1)
    assert (size <= 0.3 + 1e-5).all() and adv.min() >= 0 and adv.max() <= 1
    assert (model(adv).argmax(1) != y).sum() >= (model(x).argmax(1) != y).sum()


def test_bounds_in_training_mode_keep_bn_running_stats():
    import certtrain_models as models
    from certtrain.certified_module import CertifiedModule

    torch.manual_seed(0)
    net = models.cnn_7layer_bn(in_shape=(1, 8, 8), width=4, linear_size=16)
    module = CertifiedModule(net, (0.3,), (0.4,), 10, method="crown_ibp",
                             perturbation={"eps": 0.1}).train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    before = [(m.running_mean.clone(), int(m.num_batches_tracked)) for m in bns]
    lb = module.method.mixed_bound(module, x, y, 0.1, beta=0.5)
    assert lb.shape == (16, 9) and lb.requires_grad
    for m, (mean, n) in zip(bns, before):
        assert torch.equal(m.running_mean, mean) and int(m.num_batches_tracked) == n
        assert m.momentum == 0.1


# ---------------------------------------------------------------- configs
#: options that only make sense with text data, a text model and word substitutions: composed within
#: the text recipe (the text experiments themselves compose on their own)
TEXT_OPTIONS = {("dataset", "movie_reviews"), ("dataset", "sst2"), ("model", "lstm"), ("model", "transformer"),
                ("perturbation", "synonym")}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_compose_every_option(tmp_path, group, option):
    from certtrain.certified_module import CertifiedModule, module_from_config
    from certtrain.text_module import TextCertifiedModule

    text = (group, option) in TEXT_OPTIONS or option.startswith("text_")
    base = ["experiment=text_transformer_synonym"] if (group, option) in TEXT_OPTIONS else []
    cfg = compose_cfg(tmp_path, [*base, f"{group}={option}"])
    OmegaConf.resolve(cfg)
    dm = instantiate(cfg.dataset, _convert_="all")  # constructor only: nothing is loaded
    if not text:
        assert tuple(dm.in_shape) == tuple(cfg.dataset.in_shape)
    model = instantiate(cfg.model, _convert_="all")
    module = module_from_config(cfg, model=model)
    assert isinstance(module, TextCertifiedModule if text else CertifiedModule)
    assert module.method.name == method_name(cfg.method) and module.eps == cfg.perturbation.eps
    if group == "model":  # every architecture runs on the dataset's inputs (pixel space / token ids)
        module.eval()
        with torch.no_grad():
            if text:
                ids = torch.randint(2, cfg.dataset.vocab_size, (2, cfg.dataset.max_len))
                x = (ids, torch.full((2, cfg.dataset.max_len, 3), -1))
            else:
                x = torch.rand(2, *dm.in_shape)
            assert module(x).shape == (2, cfg.dataset.num_classes)
    if group == "trainer":
        if option == "cpu" or torch.cuda.is_available():
            instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        else:
            assert cfg.trainer.accelerator == "gpu"
    if group == "logger":
        if option == "tensorboard":
            pytest.importorskip("tensorboard")
        os.environ.setdefault("WANDB_MODE", "disabled")
        import pytorch_lightning.loggers as L

        expected = {"csv": L.CSVLogger, "tensorboard": L.TensorBoardLogger, "wandb": L.WandbLogger}[option]
        assert isinstance(instantiate(cfg.logger), expected)


def test_bad_config_fails_fast(tmp_path):
    import train
    from certtrain.certified_module import CertifiedModule

    with pytest.raises(ValueError, match="eps must be"):
        train.check_config(compose_cfg(tmp_path, ["perturbation.eps=-0.1"]))
    with pytest.raises(ValueError, match="norm"):
        train.check_config(compose_cfg(tmp_path, ["perturbation.norm=3"]))
    with pytest.raises(FileNotFoundError):
        train.check_config(compose_cfg(tmp_path, [f"ckpt_path={tmp_path}/nope.ckpt"]))
    with pytest.raises(ValueError, match="unknown method"):
        CertifiedModule(torch.nn.Linear(4, 2), (0.5,), (0.5,), 2, method="nope")
    with pytest.raises(Exception, match="model/nonexistent"):
        compose_cfg(tmp_path, ["model=nonexistent"])


def test_optimizer_and_milestones():
    from certtrain.certified_module import CertifiedModule

    module = CertifiedModule(torch.nn.Linear(4, 2), (0.5,), (0.5,), 2,
                             optim={"lr": 0.01, "milestones": [2, 4], "gamma": 0.5})
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.Adam) and conf["lr_scheduler"]["interval"] == "epoch"
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025])
    assert isinstance(CertifiedModule(torch.nn.Linear(4, 2), (0.5,), (0.5,), 2).configure_optimizers(),
                      torch.optim.Adam)


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("method", ["natural", "ibp", "crown_ibp", "crown_ibp_fused"])
def test_short_fit(tmp_path, method):
    extra = ["method=crown_ibp", "method.loss_fusion=true"] if method == "crown_ibp_fused" else [f"method={method}"]
    res = run_cfg(tmp_path, extra)
    t = res["test"]
    assert t["test/unsound"] == 0.0  # nothing verified is broken by PGD
    check_test_metrics(res)
    assert res["best_ckpt"] and Path(res["best_ckpt"]).is_file()  # ε reached after epoch 0
    if method != "natural":
        assert t["test/clean_acc"] > 0.1


def test_loss_fusion_bound_upper_bounds_the_unfused_worst_case(tmp_path):
    """The fused training loss is an upper bound of the loss at the clean point and at PGD points."""
    cfg = compose_cfg(tmp_path, ["method=crown_ibp", "method.loss_fusion=true"])
    module = module_from_config(cfg)
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    ub = module.fused_loss_bound(x, y, 0.05)
    clean = F.cross_entropy(module(x), y, reduction="none")
    assert ub.shape == (16,) and (ub >= clean - 1e-5).all()


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_checkpoint_has_config_and_resume_continues_schedule(tmp_path):
    from certtrain.certified_module import load_certified

    a, b = tmp_path / "a", tmp_path / "b"
    slow = ["schedule.start=1", "schedule.length=2", "method=crown_ibp", "test=false"]
    res_a = run_cfg(a, [*slow, "trainer.max_epochs=2"])
    last = res_a["last_ckpt"]
    assert last and Path(last).name == "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # plain types only
    conf = ckpt["certtrain_config"]
    assert conf["method"]["_target_"] == "certtrain.methods.CROWNIBP" and conf["schedule"]["length"] == 2
    assert conf["dataset"]["train_subset"] == 64
    spe = 2  # 64 images / batch 32
    assert ckpt["global_step"] == 2 * spe
    # the module rebuilt from the checkpoint alone computes the same outputs
    module = load_certified(last).eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(module(x), res_a["module"].cpu().eval()(x), atol=1e-6)

    res_b = run_cfg(b, [*slow, "trainer.max_epochs=3", f"ckpt_path={last}"])
    assert res_b["trainer"].global_step == 3 * spe
    rows = [r for r in _csv_rows(b / "csv" / "metrics.csv") if r.get("train/eps")]
    first = rows[0]
    sched = res_b["module"].eps_schedule
    assert int(first["step"]) == 2 * spe  # resumed where run A stopped, not from 0
    assert float(first["train/eps"]) == pytest.approx(sched.value(2 * spe, spe))
    assert 0 < float(first["train/eps"]) < sched.end_value  # mid-ramp, the schedule continued
    assert float(first["train/beta"]) == pytest.approx(res_b["module"].beta_schedule.value(2 * spe, spe))
    assert math.isclose(float(rows[-1]["train/eps"]), sched.value(3 * spe - 1, spe), rel_tol=1e-6)


def test_slurm_launcher_config_composes(tmp_path):
    """`-m hydra/launcher=slurm` selects hydra-submitit-launcher's SLURM launcher (one job per run)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir='{tmp_path}'", "hydra/launcher=slurm",
                                          "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.tasks_per_node == 1


def test_last_checkpoint_every_epoch_during_the_eps_ramp(tmp_path):
    """Before ε reaches its target there is no best checkpoint, but last.ckpt is written after
    every epoch, so a run that dies mid-ramp loses at most one epoch."""
    import pytorch_lightning as pl

    import train

    seen = []

    class Probe(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")))

    cfg = compose_cfg(tmp_path, [*FAST, "schedule.start=1", "schedule.length=5", "trainer.max_epochs=3", "test=false"])
    prepared = train.setup(cfg)
    import hydra.utils

    orig = hydra.utils.instantiate

    def with_probe(c, **kw):
        if "callbacks" in kw:
            kw["callbacks"] = [Probe(), *kw["callbacks"]]
        return orig(c, **kw)

    hydra.utils.instantiate = with_probe
    try:
        res = train.run(cfg, prepared)
    finally:
        hydra.utils.instantiate = orig
    assert seen == [[], ["last.ckpt"], ["last.ckpt"]]
    assert res["best_ckpt"] is None  # ε never reached its target
    assert torch.load(res["last_ckpt"], map_location="cpu", weights_only=True)["epoch"] == 2
