"""Certified-training methods: IBP initialization, warm-up regularizers (fast_ibp), SABR, MTL-IBP,
PGD training, the attack module, their configs and short fits on the bundled 8x8 digits."""

from __future__ import annotations

import csv
import math
from contextlib import nullcontext
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from certtrain.attacks import AttackConfig, attack_loss, fgsm_attack, pgd_accuracy, pgd_attack  # noqa: E402
from certtrain.initialization import ibp_init, ibp_init_std  # noqa: E402
from certtrain.losses import margin_spec, robust_ce  # noqa: E402
from certtrain.certified_module import CertifiedModule, load_certified, module_from_config, sabr_box  # noqa: E402
from certtrain.methods import MTLIBP, SABR, FastIBP, method_name  # noqa: E402
from certtrain.threat import LpBall  # noqa: E402
from train_checks import check_test_metrics  # noqa: E402
from certtrain.regularizers import relu_balance_loss, tightness_loss, warmup_regularizer, warmup_weight  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_METHODS = ["fast_ibp", "sabr", "mtl_ibp", "pgd"]
FAST = [
    "dataset.train_subset=64", "dataset.val_size=64", "dataset.test_subset=64", "dataset.batch_size=32",
    "schedule.start=0", "schedule.length=1", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1", "eval.val_pgd_steps=2", "eval.pgd_steps=3",
]


def compose_cfg(tmp_path: Path, overrides: list[str] = ()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir='{tmp_path}'", *overrides])


def mlp(d_in: int = 16, hidden: int = 32, k: int = 3) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, k))


def margins(module: CertifiedModule, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    C = margin_spec(y, module.num_classes)
    with torch.no_grad():
        return torch.bmm(C, module(x).unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------- IBP initialization
def test_ibp_init_std_per_layer_last_layer_bias_and_bn_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 4, groups=2),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 3 * 3, 400), nn.BatchNorm1d(400),
                          nn.ReLU(), nn.Linear(400, 10))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stds = ibp_init(model)
    # σ = sqrt(2π) / fan_in, fan_in = in_channels / groups × kernel size (or in_features)
    expected = {"0.weight": math.sqrt(2 * math.pi) / (3 * 3 * 3), "3.weight": math.sqrt(2 * math.pi) / (16 * 4 * 4),
                "7.weight": math.sqrt(2 * math.pi) / 144}
    assert stds == pytest.approx(expected)
    sd = model.state_dict()
    for name, std in expected.items():
        w = sd[name]
        assert abs(w.std().item() / std - 1) < 0.08, name  # ≥ 2,592 samples each
        assert abs(w.mean().item()) < 4 * std / math.sqrt(w.numel())
        assert not torch.equal(w, before[name])
    for name, v in before.items():  # biases, BN parameters / buffers and the last layer keep their values
        if name not in expected:
            assert torch.equal(sd[name], v), name
    assert ibp_init_std(model[10]) == pytest.approx(math.sqrt(2 * math.pi) / 400)


def test_ibp_init_halves_sigma_after_a_residual_sum():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            s = h + x                              # residual sum
            t = self.b(torch.relu(s))              # input: an elementwise op of the sum
            return self.out(self.c(t))             # c: a plain layer input

    model = Res()
    stds = ibp_init(model)
    base = math.sqrt(2 * math.pi) / 8
    assert stds == pytest.approx({"a.weight": base, "b.weight": base / 2, "c.weight": base})
    assert ibp_init(Res(), residual=False)["b.weight"] == pytest.approx(base)


# ---------------------------------------------------------------- regularizers
def _box(centre: torch.Tensor, radius: float | torch.Tensor):
    return centre - radius, centre + radius


def test_tightness_loss_known_values_and_zero_when_tight():
    x_box = _box(torch.full((2, 5), 0.5), 0.1)  # input radius 0.1
    wide = _box(torch.randn(2, 7), 0.4)         # t = 0.1 / 0.4 = 0.25 < τ: (0.5 - 0.25) / 0.5 = 0.5
    tight = _box(torch.randn(2, 3), 0.1)        # t = 1 ≥ τ: 0
    assert tightness_loss(x_box, [wide], tau=0.5).item() == pytest.approx(0.5)
    assert tightness_loss(x_box, [wide, tight], tau=0.5).item() == pytest.approx(0.25)  # mean over layers
    assert tightness_loss(x_box, [tight, _box(torch.randn(4), 0.2)], tau=0.5).item() == 0.0  # t = 0.5 = τ
    # τ = 0.2: (0.2 - 0.25) < 0 → 0
    assert tightness_loss(x_box, [wide], tau=0.2).item() == 0.0


def test_relu_balance_loss_known_values_and_zero_when_balanced():
    r = 0.5  # radius < |centre|: every neuron stable (active where c > 0, inactive where c < 0)
    balanced = _box(torch.tensor([[2.0, 2.0, -2.0, -2.0]]), r)
    assert relu_balance_loss([balanced], tau=0.5).item() == 0.0
    # centres 1, 1, -4, -4: mean ratio (2/4) / (8/4) = 0.25 → (0.5 - 0.25) / 0.5 = 0.5; the spreads
    # around the mean -1.5 are 2·2.5² on both sides → ratio 1 → 0.  Total 0.5.
    skewed = _box(torch.tensor([[1.0, 1.0, -4.0, -4.0]]), r)
    assert relu_balance_loss([skewed], tau=0.5).item() == pytest.approx(0.5)
    # a layer with only unstable neurons has no ratio: it adds 0 but counts in the mean
    unstable = _box(torch.tensor([[0.1, -0.1, 0.2]]), 1.0)
    assert relu_balance_loss([skewed, unstable], tau=0.5).item() == pytest.approx(0.25)
    out = warmup_regularizer(_box(torch.zeros(1, 4), 0.5), [skewed], 0.5)
    assert set(out) == {"tightness", "relu", "total"}
    assert out["total"].item() == pytest.approx(out["tightness"].item() + out["relu"].item())
    with pytest.raises(ValueError, match="subset"):
        warmup_regularizer(_box(torch.zeros(1, 4), 0.5), [skewed], 0.5, terms=["std"])
    with pytest.raises(ValueError, match="tau"):
        tightness_loss(_box(torch.zeros(1, 4), 0.5), [skewed], tau=0.0)


def test_regularizers_are_differentiable():
    w = torch.tensor(1.5, requires_grad=True)
    x_box = _box(torch.zeros(1, 4), 0.1)
    layer = _box(w * torch.tensor([[1.0, 1.0, -4.0, -4.0]]), w * 0.5)  # radius 0.75: t = 0.13 < τ
    out = warmup_regularizer(x_box, [layer], tau=0.5)
    assert out["tightness"].item() > 0 and out["relu"].item() > 0
    (g,) = torch.autograd.grad(out["total"], w)
    assert torch.isfinite(g) and g.item() != 0


def test_warmup_weight_decays_linearly_to_zero():
    assert warmup_weight(0.5, 0.0, 0.4) == 0.5
    assert warmup_weight(0.5, 0.1, 0.4) == pytest.approx(0.375)
    assert warmup_weight(0.5, 0.4, 0.4) == 0.0
    assert warmup_weight(0.5, 0.5, 0.4) == 0.0
    vals = [warmup_weight(0.5, e, 0.4) for e in torch.linspace(0, 0.4, 9).tolist()]
    assert all(b < a for a, b in zip(vals, vals[1:]))


def test_module_regularizer_reads_its_bounds_and_vanishes_at_target():
    import certtrain_models as models
    torch.manual_seed(0)
    net = models.cnn_7layer_bn(in_shape=(1, 8, 8), width=4, linear_size=16)
    module = CertifiedModule(net, (0.3,), (0.4,), 10, method=FastIBP(init="ibp", reg_lambda=0.5),
                             perturbation=LpBall(eps=0.2)).train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    reg, log = module.regularizer(x, y, 0.05, have_intermediate=False)
    assert log["reg_weight"] == pytest.approx(0.5 * (1 - 0.05 / 0.2))
    assert reg is not None and reg.requires_grad and set(log) == {"reg_weight", "reg_tightness", "reg_relu"}
    inputs, pre = module.intermediate_bounds()
    assert len(pre) == 6  # the six BN outputs feeding a ReLU
    # the input box is taken after Normalize: radius ε / std
    assert ((inputs[1] - inputs[0]) / 2).max().item() == pytest.approx(0.05 / 0.4, rel=1e-5)
    assert reg.item() == pytest.approx(log["reg_weight"] * (log["reg_tightness"] + log["reg_relu"]).item(), rel=1e-5)
    reg, log = module.regularizer(x, y, 0.2, have_intermediate=False)
    assert reg is None and log == {"reg_weight": 0.0}


# ---------------------------------------------------------------- SABR
def test_sabr_box_lies_in_the_eps_ball_and_domain():
    torch.manual_seed(0)
    eps, lam = 0.3, 0.6  # 2λε = 0.36 > 0.3: the box does not fit where the domain clips the ball to width 0.3
    x = torch.rand(64, 1, 6, 6)
    x[:8] = x[:8].round()  # pixels at 0 and 1: the ball is clipped by the domain
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    centre, radius, lo, hi = sabr_box(x, x_adv, eps, lam)
    tol = 1e-6
    assert (centre - radius >= torch.maximum(x - eps, torch.zeros_like(x)) - tol).all()
    assert (centre + radius <= torch.minimum(x + eps, torch.ones_like(x)) + tol).all()
    assert (radius <= lam * eps + tol).all() and (radius >= 0).all()
    roomy = (hi - lo) >= 2 * lam * eps
    assert torch.allclose(radius[roomy], torch.full_like(radius[roomy], lam * eps))
    assert (~roomy).any()  # the clipped pixels shrink the box
    inside = (x_adv >= lo + radius) & (x_adv <= hi - radius)
    assert inside.any() and torch.equal(centre[inside], x_adv[inside])  # no shift needed


@pytest.fixture
def sabr_module():
    torch.manual_seed(0)
    return CertifiedModule(mlp(), (0.5,), (0.5,), 3, method=SABR(lambda_ratio=0.3), perturbation=LpBall(eps=0.2)).eval()


def test_sabr_bound_is_sound_on_the_small_box_and_tighter_than_ibp(sabr_module):
    torch.manual_seed(1)
    eps = 0.2
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    x_adv = sabr_module.adversarial(x, y, eps)
    assert ((x_adv - x).abs() <= eps + 1e-6).all()
    with torch.no_grad():
        lb = sabr_module.sabr_bounds(x, y, eps, x_adv)
        lb_full = sabr_module.margin_bounds(x, y, eps, "IBP")
    centre, radius, lo, hi = sabr_box(x, x_adv, eps, sabr_module.method.lambda_ratio)
    box_lo, box_hi = torch.maximum(centre - radius, lo), torch.minimum(centre + radius, hi)
    for _ in range(20):  # random points and corners of the small box
        u = torch.rand_like(x)
        for p in (box_lo + u * (box_hi - box_lo), torch.where(u > 0.5, box_hi, box_lo)):
            assert (margins(sabr_module, p, y) >= lb - 1e-5).all()
    assert (lb >= lb_full - 1e-5).all()  # IBP is inclusion-monotone: the small box gives tighter bounds
    assert (lb > lb_full + 1e-4).any()


def test_sabr_with_lambda_one_is_plain_ibp(sabr_module):
    torch.manual_seed(2)
    module = CertifiedModule(sabr_module.net[1], (0.5,), (0.5,), 3, method=SABR(lambda_ratio=1.0),
                             perturbation=LpBall(eps=0.2)).eval()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    x_adv = (x + torch.empty_like(x).uniform_(-0.2, 0.2)).clamp(0, 1)
    with torch.no_grad():
        torch.testing.assert_close(module.sabr_bounds(x, y, 0.2, x_adv), module.margin_bounds(x, y, 0.2, "IBP"),
                                   atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- MTL-IBP
def test_mtl_ibp_loss_is_the_convex_combination(monkeypatch):
    torch.manual_seed(0)
    model = mlp()
    alpha, eps = 0.3, 0.1
    module = CertifiedModule(model, (0.5,), (0.5,), 3, method=MTLIBP(alpha=alpha, init="default"), perturbation=LpBall(eps=eps)).eval()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    x_adv = (x + eps * torch.randn_like(x).sign()).clamp(0, 1)
    monkeypatch.setattr(module, "adversarial", lambda *a: x_adv)  # the same attack point for both sides
    nat = F.cross_entropy(module(x), y)
    loss, log, _ = module.robust_loss(x, y, eps, 0.0, nat)
    ibp = robust_ce(module.margin_bounds(x, y, eps, "IBP"))
    adv = F.cross_entropy(module(x_adv), y)
    torch.testing.assert_close(loss, alpha * ibp + (1 - alpha) * adv)
    torch.testing.assert_close(log["ibp_loss"], ibp)
    torch.testing.assert_close(log["adv_loss"], adv)
    # α = 1 is IBP training: the loss of method=ibp on the same weights
    one = CertifiedModule(model, (0.5,), (0.5,), 3, method=MTLIBP(alpha=1.0, init="default"), perturbation=LpBall(eps=eps)).eval()
    monkeypatch.setattr(one, "adversarial", lambda *a: x_adv)
    ibp_module = CertifiedModule(model, (0.5,), (0.5,), 3, method="ibp", perturbation=LpBall(eps=eps)).eval()
    torch.testing.assert_close(one.robust_loss(x, y, eps, 0.0, nat)[0], ibp_module.robust_loss(x, y, eps, 0.0, nat)[0])
    # α = 0: adversarial training, the loss of method=pgd at the same point
    zero = CertifiedModule(model, (0.5,), (0.5,), 3, method=MTLIBP(alpha=0.0, init="default"), perturbation=LpBall(eps=eps)).eval()
    monkeypatch.setattr(zero, "adversarial", lambda *a: x_adv)
    torch.testing.assert_close(zero.robust_loss(x, y, eps, 0.0, nat)[0], adv)


# ---------------------------------------------------------------- attacks
@pytest.mark.parametrize("norm", ["inf", 2])
def test_fgsm_and_pgd_stay_in_the_ball_and_domain(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(16, 1, 4, 4), torch.randint(0, 3, (16,))
    x[:4] = x[:4].round()  # at the domain's edges
    eps = 0.3
    advs = [fgsm_attack(model, x, y, eps, norm=norm), fgsm_attack(model, x, y, eps, norm=norm, random_start=True,
                                                                   step_size=1.25 * eps)]
    for select in ("first_wrong", "max_loss", "last"):
        for loss in ("ce", "margin"):
            advs.append(pgd_attack(model, x, y, eps, norm=norm, steps=4, restarts=2, select=select, loss=loss,
                                   step_decay=(0.5,), step_size=eps))
    for adv in advs:
        d = (adv - x).flatten(1)
        size = d.abs().max(1).values if norm == "inf" else d.norm(dim=1)
        assert (size <= eps + 1e-5).all() and adv.min() >= 0 and adv.max() <= 1
        assert not adv.requires_grad
    assert not torch.equal(advs[0], x)


def test_attack_losses_and_selection():
    torch.manual_seed(0)
    logits, y = torch.randn(32, 5), torch.randint(0, 5, (32,))
    assert torch.equal(attack_loss(logits, y, "margin") > 0, logits.argmax(1) != y)
    torch.testing.assert_close(attack_loss(logits, y, "ce"), F.cross_entropy(logits, y, reduction="none"))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 3, (32,))
    kw = dict(steps=6, step_size=0.05, restarts=1)
    torch.manual_seed(3)
    best = pgd_attack(model, x, y, 0.2, select="max_loss", **kw)
    torch.manual_seed(3)  # the same random start and iterates
    last = pgd_attack(model, x, y, 0.2, select="last", **kw)
    with torch.no_grad():
        assert (attack_loss(model(best), y) >= attack_loss(model(last), y) - 1e-6).all()
    with pytest.raises(ValueError, match="select"):
        pgd_attack(model, x, y, 0.2, select="best")


def test_stronger_pgd_finds_at_least_as_many_adversarial_examples():
    """On a small trained model: PGD ≥ FGSM, and restarts only add (same first random start)."""
    from certtrain_data.digits import DigitsDataModule

    torch.manual_seed(0)
    dm = DigitsDataModule(val_size=100, test_size=200, batch_size=128)
    dm.setup("fit")
    xs, ys = map(torch.cat, zip(*[(b[0], b[1]) for b in dm.train_dataloader()]))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(xs), ys).backward()
        opt.step()
    x, y = xs[:300], ys[:300]
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    assert clean.float().mean() > 0.9
    eps = 0.1
    fgsm = (~(model(fgsm_attack(model, x, y, eps)).argmax(1) == y)).sum().item()
    torch.manual_seed(5)
    pgd10 = (~pgd_accuracy(model, x, y, eps, steps=10, restarts=1)).sum().item()
    torch.manual_seed(5)
    pgd10r = ~pgd_accuracy(model, x, y, eps, steps=10, restarts=3)
    torch.manual_seed(5)
    first = ~pgd_accuracy(model, x, y, eps, steps=10, restarts=1)
    assert (pgd10r | ~first).all()  # every example broken by the first restart stays broken
    assert pgd10 >= fgsm and pgd10r.sum().item() >= pgd10
    assert 0 < fgsm < len(y) and pgd10r.sum().item() < len(y)


def test_attack_config_validation():
    cfg = AttackConfig.from_mapping({"steps": 3, "step_size": 0.5, "step_decay": [0.5]})
    assert cfg.steps == 3 and cfg.step_decay == (0.5,) and cfg.as_dict()["step_decay"] == [0.5]
    for bad, match in [({"steps": -1}, "attack.steps"), ({"steps": 1.5}, "attack.steps"),
                       ({"step_size": 0}, "attack.step_size"), ({"restarts": 0}, "attack.restarts"),
                       ({"loss": "hinge"}, "attack.loss"), ({"step_decay": [1.5]}, "attack.step_decay"),
                       ({"random_start": "yes"}, "attack.random_start"), ({"steps_": 3}, "unknown option")]:
        with pytest.raises(ValueError, match=match):
            AttackConfig.from_mapping(bad)


# ---------------------------------------------------------------- configs and fits
def test_bad_method_hyperparameters_fail_fast(tmp_path):
    import train

    cases = [
        (["method=sabr", "method.lambda_ratio=0"], r"method\.lambda_ratio must be a number in \(0, 1\]"),
        (["method=sabr", "method.lambda_ratio=1.5"], r"method\.lambda_ratio"),
        (["method=mtl_ibp", "method.alpha=1.5"], r"method\.alpha must be a number in \[0, 1\]"),
        (["method=mtl_ibp", "method.alpha=-0.1"], r"method\.alpha"),
        (["method=pgd", "method.attack.steps=-1"], r"method\.attack\.steps must be an integer >= 0"),
        (["method=sabr", "method.attack.step_size=0"], r"method\.attack\.step_size"),
        (["method=sabr", "method.attack.restarts=0"], r"method\.attack\.restarts"),
        (["method=fast_ibp", "method.reg_lambda=-1"], r"method\.reg_lambda"),
        (["method=fast_ibp", "method.reg_tau=0"], r"method\.reg_tau"),
        (["method=fast_ibp", "method.reg_terms=[std]"], r"method\.reg_terms"),
        (["method=fast_ibp", "method.init=xavier"], r"method\.init must be one of default, ibp"),
        (["method=pgd", "+method.reg_lambda=0.5"], r"needs bounds"),
        (["method=sabr", "perturbation=l2"], r"L∞"),
        (["method=ibp", "+method.lamda_ratio=0.5"], r"unknown option\(s\) method\.lamda_ratio"),
        (["eval.val_bounds=[CROWN]"], r"eval\.val_bounds"),
    ]
    for overrides, match in cases:
        with pytest.raises(ValueError, match=match):
            train.check_config(compose_cfg(tmp_path, overrides))
    with pytest.raises(ValueError, match="alpha"):  # the module checks too (Python users)
        CertifiedModule(mlp(), (0.5,), (0.5,), 3, method={"name": "mtl_ibp", "alpha": 2.0})


EXPERIMENTS = {  # name: (method, train ε, test ε, model selection)
    **{f"mnist_{m}_{e}": (m, {"0.1": 0.2, "0.3": 0.4}[e], float(e), "val/verified_acc_target")
       for m in ("fast_ibp", "crown_ibp", "mtl_ibp") for e in ("0.1", "0.3")},
    **{f"mnist_{m}_{e}": (m, float(e), float(e), "val/verified_acc_target" if m == "sabr" else "val/pgd_acc")
       for m in ("sabr", "pgd") for e in ("0.1", "0.3")},
}


def test_experiment_configs_compose_and_instantiate(tmp_path):
    import train

    assert {p.stem for p in (CONF / "experiment").glob("mnist_*_0.?.yaml")} >= set(EXPERIMENTS)
    for name, (method, eps, eval_eps, monitor) in EXPERIMENTS.items():
        cfg = compose_cfg(tmp_path, [f"experiment={name}"])
        train.check_config(cfg)
        # the shared recipe (mnist_base)
        assert cfg.dataset._target_ == "certtrain_data.mnist.MNISTDataModule" and cfg.dataset.val_size == 5000
        assert cfg.model._target_ == "certtrain_models.cnn_7layer_bn" and cfg.dataset.batch_size == 256
        assert cfg.optim.lr == 5e-4 and list(cfg.optim.milestones) == [50, 60] and cfg.optim.gamma == 0.2
        assert cfg.trainer.max_epochs == 70 and cfg.trainer.gradient_clip_val == 10.0
        assert cfg.schedule.name == "smoothed" and (cfg.schedule.start, cfg.schedule.length) == (0, 20)
        assert (method_name(cfg.method), cfg.perturbation.eps, cfg.perturbation.eval_eps) == (method, eps, eval_eps), name
        assert cfg.checkpoint.monitor == monitor
        dm = instantiate(cfg.dataset, _convert_="all")  # constructor only: nothing is read
        model = instantiate(cfg.model, _convert_="all")
        module = module_from_config(cfg, model=model)
        assert module.method.name == method and module.eps == eps and module.eval_eps == eval_eps
        assert module.method.init == ("default" if method in ("crown_ibp", "pgd") else "ibp")
        if method == "sabr":
            assert module.method.lambda_ratio == {"0.1": 0.4, "0.3": 0.6}[name[-3:]]
            assert module.method.attack.steps == 8 and module.val_bounds == ("IBP", "CROWN-IBP")
        if method == "mtl_ibp":
            assert module.method.alpha == {"0.1": 0.01, "0.3": 0.08}[name[-3:]] and module.method.attack.steps == 1
        if method == "crown_ibp":
            assert module.method.loss_fusion and module.kappa_schedule.end_value == 0.0
        with torch.no_grad():
            assert module.eval()(torch.rand(2, *dm.in_shape)).shape == (2, 10)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", NEW_METHODS)
def test_short_fit_and_checkpoint_round_trip(tmp_path, method):
    import train
    from certtrain.verification import load_for_verification

    extra = {"pgd": ["method.attack.steps=3", "checkpoint.monitor=val/pgd_acc"],
             "sabr": ["method.attack.steps=2", "method.lambda_ratio=0.5"],
             "mtl_ibp": ["method.alpha=0.2"], "fast_ibp": []}[method]
    cfg = compose_cfg(tmp_path, [*FAST, f"method={method}", *extra])
    with pytest.warns(UserWarning, match="BatchNorm") if method == "fast_ibp" else nullcontext():
        res = train.run(cfg)
    t = res["test"]
    assert t["test/unsound"] == 0.0
    check_test_metrics(res)
    assert res["best_ckpt"] and Path(res["best_ckpt"]).is_file()
    rows = _csv_rows(tmp_path / "csv" / "metrics.csv")
    train_keys = {k for r in rows for k, v in r.items() if v and k.startswith("train/")}
    val_keys = {k for r in rows for k, v in r.items() if v and k.startswith("val/")}
    assert {"val/clean_acc", "val/verified_acc", "val/verified_acc_target", "val/pgd_acc", "val/nat_loss",
            "val/robust_loss"} <= val_keys
    want = {"fast_ibp": {"train/reg_loss", "train/reg_tightness", "train/reg_relu", "train/verified_acc"},
            "sabr": {"train/reg_loss", "train/l1_loss", "train/small_box_acc", "val/small_box_acc"},
            "mtl_ibp": {"train/ibp_loss", "train/adv_loss", "train/adv_acc", "val/ibp_loss", "val/adv_loss"},
            "pgd": {"train/adv_loss", "train/adv_acc", "val/adv_loss"}}[method]
    assert want <= train_keys | val_keys
    if method == "fast_ibp":  # the regularizer's weight decays to 0 as ε reaches its target
        steps = [r for r in rows if r.get("train/reg_weight")]
        target = float(cfg.perturbation.eps)
        for r in steps:
            w, eps = float(r["train/reg_weight"]), float(r["train/eps"])
            assert w == pytest.approx(0.5 * (1 - eps / target), abs=1e-6)
            assert bool(r.get("train/reg_loss")) == (w > 0)
        assert float(steps[0]["train/reg_weight"]) == 0.5 and float(steps[-1]["train/reg_weight"]) == 0.0
    # the checkpoint rebuilds the same module (options round-trip) for load_certified and verify.py
    loaded = load_certified(res["test_ckpt"]).eval()  # trainer.test left these weights in the module
    trained = res["module"].cpu().eval()
    assert loaded.method == trained.method  # every option, attack included (TrainingMethod.options)
    assert loaded.method.options() == trained.method.options()
    for attr in ("eps", "eval_eps", "val_bounds"):
        assert getattr(loaded, attr) == getattr(trained, attr), attr
    assert loaded.optim == trained.optim and loaded.evaluation == trained.evaluation
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x))
    module, _, config = load_for_verification(res["last_ckpt"], subset=8)
    assert module.method.name == method and method_name(config["method"]) == method
