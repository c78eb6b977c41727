"""L0 and weight threat models (`certtrain.threat.L0Ball`, `WeightBall`): the training ramp's sets
lie inside the real set; bounds are sound against the attacks (float32 and float64); the attacks
stay in their sets and break non-robust cases; verified samples are never attacked; checkpoints
with BoundedParameters round-trip (state_dict, optimizer, resume, load_certified, weights_only);
`make_task` for every image threat; bad ε and bad method / threat combinations fail clearly."""
from __future__ import annotations

import math
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

from bound_checks import random_points, tolerance  # noqa: E402
from certtrain import CertifiedModule  # noqa: E402
from certtrain.attacks import l0_attack, per_example_logits, weight_pgd_attack  # noqa: E402
from certtrain.bounds import BoundedParameter, PerturbationL0Norm  # noqa: E402
from certtrain.certified_module import load_certified  # noqa: E402
from certtrain.losses import margin_spec  # noqa: E402
from certtrain.threat import L0Ball, LpBall, SynonymSubstitution, WeightBall  # noqa: E402
from certtrain.verification import InputSetTask, WeightSetTask, make_task, run_verification  # noqa: E402
from certtrain_models import mlp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 6, 6)
FAST = [  # all digits, 2 clean epochs, ε ramped over epochs 2-3, target from epoch 4 (~4 s of fitting)
    "dataset.val_size=64", "dataset.test_subset=64", "dataset.batch_size=64", "schedule.start=2",
    "schedule.length=2", "trainer.max_epochs=6", "optim.lr=0.005", "trainer.enable_progress_bar=false",
    "eval.val_pgd_steps=2", "eval.pgd_steps=5", "model.hidden=[32,32]",
]


def compose_cfg(tmp_path: Path, overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir='{tmp_path}'", *overrides])


def _module(threat, method="ibp", dtype=torch.float32, seed=0, hidden=(16, 16)):
    torch.manual_seed(seed)
    m = CertifiedModule(mlp(SHAPE, 4, hidden=list(hidden)), (0.4,), (0.3,), 4, method=method, perturbation=threat)
    return m.to(dtype).eval()


def _margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - z_j (B, K-1), in margin_spec's order."""
    return torch.einsum("bsk,bk->bs", margin_spec(y, logits.shape[1]).to(logits.dtype), logits)


def _check_below(lb: torch.Tensor, margins: torch.Tensor, what: str) -> None:
    """Every attacked / sampled margin (…, B, K-1) lies above the lower bound (B, K-1)."""
    tol = tolerance(lb, lb)
    worst = (lb - tol - margins).max().item()
    assert worst <= 0, f"{what}: a point of the set has a margin below the lower bound by {worst:.3g}"


# ---------------------------------------------------------------- L0: the ramp's sets and soundness
@pytest.mark.parametrize("eps", [0.3, 1.0, 1.5, 2.7])
def test_l0_ramp_set_lies_inside_the_real_set(eps):
    torch.manual_seed(0)
    x = torch.rand(5, *SHAPE)
    x[0, 0, 0, 0], x[1, 0, 1, 1] = 0.0, 1.0  # domain edges
    ptb = L0Ball(3).at(eps, x)
    k = math.ceil(eps)
    assert isinstance(ptb, PerturbationL0Norm) and ptb.eps == k
    if float(eps).is_integer():
        assert (ptb.x_L, ptb.x_U) == (0.0, 1.0)  # the real set
        return
    lo, hi = ptb.x_L, ptb.x_U
    assert ((0 <= lo) & (lo <= x) & (x <= hi) & (hi <= 1)).all()  # a subset of the ceil(ε)-pixel set
    r = eps / k
    torch.testing.assert_close(hi - x, r * (1 - x))
    torch.testing.assert_close(x - lo, r * x)
    # IBP over the subset is at least as tight as over the real set of ceil(ε) pixels
    m = _module(L0Ball(3))
    y = m(x).argmax(1)
    with torch.no_grad():
        sub = m.margin_bounds(x, y, eps, "IBP")
        full = m.margin_bounds(x, y, float(k), "IBP")
    assert (sub >= full - tolerance(full, full)).all()


def test_l0_ball_needs_x_for_a_fractional_eps():
    with pytest.raises(ValueError, match="pass x="):
        L0Ball(2).at(1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("eps", [2, 1.4])
def test_l0_bounds_are_sound_against_the_l0_attack(dtype, eps):
    m = _module(L0Ball(2), method={"name": "crown_ibp", "loss_fusion": True}, dtype=dtype)
    torch.manual_seed(1)
    x = torch.rand(8, *SHAPE, dtype=dtype)
    y = m(x).argmax(1)
    ptb = m.perturbation_at(eps, x)
    with torch.no_grad():
        bounds = {meth: m.margin_bounds(x, y, eps, meth) for meth in ("IBP", "CROWN-IBP", "CROWN")}
        fused = m.fused_loss_bound(x, y, eps)
    assert (bounds["CROWN"] >= bounds["IBP"] - 1e-4).float().mean() > 0.5  # CROWN mostly tighter
    pts = [l0_attack(m.net, x, y, ptb.eps, x_min=ptb.x_L, x_max=ptb.x_U, steps=15, restarts=4)]
    pts += list(random_points(x, ptb, 100, corners=True))
    with torch.no_grad():
        margins = torch.stack([_margins(m(p), y) for p in pts])
    for meth, lb in bounds.items():
        _check_below(lb, margins, f"L0 k={ptb.eps} {meth} {dtype}")
    with torch.no_grad():
        ce = torch.stack([F.cross_entropy(m(p), y, reduction="none") for p in pts])
    assert (ce <= fused + tolerance(fused, fused)).all(), "the fused loss bound is below the loss at a point of the set"


# ---------------------------------------------------------------- the attacks
def test_l0_attack_budget_domain_and_a_non_robust_case():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 5))
    x = torch.rand(12, *SHAPE) * 0.6 + 0.2
    y = net(x).argmax(1)
    lo, hi = x * 0.5, torch.full_like(x, 0.9)  # a tensor domain around x
    for k in (0, 1, 3, 7):
        xa = l0_attack(net, x, y, k, x_min=lo, x_max=hi, steps=6, restarts=3)
        assert ((xa != x).flatten(1).sum(1) <= k).all(), k
        assert ((xa >= lo) & (xa <= hi)).all(), k
    # one pixel decides: class 1 wins iff pixel 5 exceeds 0.5; the attack finds it (k = 1), not k = 0
    lin = nn.Linear(36, 2)
    with torch.no_grad():
        lin.weight.zero_(), lin.bias.copy_(torch.tensor([0.5, 0.0]))
        lin.weight[1, 5] = 1.0
    net = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(6, *SHAPE)
    x.view(6, -1)[:, 5] = 0.1
    y = torch.zeros(6, dtype=torch.long)
    assert (net(l0_attack(net, x, y, 1, steps=3)).argmax(1) == 1).all()
    assert (net(l0_attack(net, x, y, 0, steps=3)).argmax(1) == 0).all()
    with pytest.raises(ValueError, match="integer"):
        l0_attack(net, x, y, 1.5)


@pytest.mark.parametrize("norm", [2, math.inf], ids=["l2", "linf"])
def test_weight_attack_stays_in_the_ball_and_breaks_a_non_robust_case(norm):
    m = _module(WeightBall(norm=norm, eps=0.05))
    names = [n for n, _ in WeightBall.perturbed(m.net)]
    assert names == ["1.classifier.0.weight", "1.classifier.2.weight", "1.classifier.4.weight"]
    torch.manual_seed(2)
    x = torch.rand(10, *SHAPE)
    y = m(x).argmax(1)
    w = weight_pgd_attack(m.net, x, y, 0.05, names, norm=norm, steps=8, restarts=2)
    params = dict(m.net.named_parameters())
    for n in names:
        d = (w[n] - params[n].detach()).flatten(1)
        size = d.abs().max(1).values if norm == math.inf else d.norm(dim=1)
        assert (size <= 0.05 * (1 + 1e-6)).all(), n
    # a large ball breaks every prediction (the logits scale with the last layer's weight)
    assert not m.threat.attack_accuracy(m.net, x, y, 5.0, steps=10, restarts=1).any()
    # a zero ball changes nothing
    assert m.threat.attack_accuracy(m.net, x, y, 0.0, steps=5).all()
    # a linear classifier z = W x with margin m at x: the smallest weight change that flips it has
    # Frobenius norm m / (√2 ||x||) (L2) or m / (2 ||x||_1) (L∞); 20 % more must be found
    torch.manual_seed(4)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(36, 2, bias=False))
    x = torch.rand(6, *SHAPE)
    z = lin(x)
    y = z.argmax(1)
    margin = (z.max(1).values - z.min(1).values)
    xf = x.flatten(1)
    need = margin / (math.sqrt(2) * xf.norm(dim=1)) if norm == 2 else margin / (2 * xf.abs().sum(1))
    WeightBall(norm=norm).prepare_model(lin)
    for i in range(6):
        ok = WeightBall(norm=norm).attack_accuracy(lin, x[i:i + 1], y[i:i + 1], 1.2 * need[i].item(), steps=20)
        assert not ok.any(), i
        ok = WeightBall(norm=norm).attack_accuracy(lin, x[i:i + 1], y[i:i + 1], 0.8 * need[i].item(), steps=20)
        assert ok.all(), i  # (no weight in the smaller ball flips it: the attack must not claim one)


# ---------------------------------------------------------------- weights: soundness, loss fusion
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("norm", [2, math.inf], ids=["l2", "linf"])
def test_weight_bounds_are_sound_against_the_weight_attack(norm, dtype):
    eps = {2: 0.1, math.inf: 0.01}[norm]
    m = _module(WeightBall(norm=norm, eps=eps), method={"name": "crown_ibp", "loss_fusion": True}, dtype=dtype)
    names = [n for n, _ in WeightBall.perturbed(m.net)]
    torch.manual_seed(3)
    x = torch.rand(8, *SHAPE, dtype=dtype)
    y = m(x).argmax(1)
    with torch.no_grad():
        bounds = {meth: m.margin_bounds(x, y, eps, meth) for meth in ("IBP", "CROWN-IBP", "CROWN")}
        fused = m.fused_loss_bound(x, y, eps)
    assert all(p.ptb is None for p in m.net.parameters() if isinstance(p, BoundedParameter))  # restored
    pts = []
    for loss in ("margin", "ce"):
        w = weight_pgd_attack(m.net, x, y, eps, names, norm=norm, steps=15, restarts=2, loss=loss)
        with torch.no_grad():
            pts.append(per_example_logits(m.net, w, x))
    params = dict(m.net.named_parameters())
    for i in range(20):  # random points of the balls, half on the sphere / at corners
        w = {}
        for n in names:
            d = torch.randn(len(y), *params[n].shape, dtype=dtype)
            if norm == math.inf:
                d = d.sign() if i % 2 == 0 else torch.rand_like(d) * 2 - 1
            else:
                d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1) * (1.0 if i % 2 == 0 else torch.rand(()).item())
            w[n] = params[n].detach() + eps * (1 - 1e-6) * d
        with torch.no_grad():
            pts.append(per_example_logits(m.net, w, x))
    logits = torch.stack(pts)
    margins = torch.stack([_margins(z, y) for z in logits])
    for meth, lb in bounds.items():
        _check_below(lb, margins, f"weights {norm} {meth} {dtype}")
    ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits])
    assert (ce <= fused + tolerance(fused, fused)).all(), "the fused loss bound is below an attacked loss"


# ---------------------------------------------------------------- methods and errors
def test_methods_that_attack_the_input_refuse_l0_and_weights(tmp_path):
    import train

    for threat in ("l0", "weights"):
        for method in ("sabr", "mtl_ibp", "pgd"):
            with pytest.raises(ValueError, match=f"method '{method}' trains on PGD points"):
                train.check_config(compose_cfg(tmp_path, [f"perturbation={threat}", f"method={method}"]))
        for method in ("natural", "ibp", "crown_ibp"):
            train.check_config(compose_cfg(tmp_path, [f"perturbation={threat}", f"method={method}"]))
    train.check_config(compose_cfg(tmp_path, ["perturbation=l0", "method=fast_ibp"]))
    with pytest.raises(ValueError, match=r"method\.reg_terms: the tightness regularizer"):
        train.check_config(compose_cfg(tmp_path, ["perturbation=weights", "method=fast_ibp"]))
    train.check_config(compose_cfg(tmp_path, ["perturbation=weights", "method=fast_ibp", "method.reg_terms=[relu]"]))
    with pytest.raises(ValueError, match="trains on PGD points"):  # Python users get the same check
        CertifiedModule(mlp(SHAPE, 4), (0.5,), (0.5,), 4, method="sabr", perturbation=L0Ball(1))
    # fast_ibp with the ReLU-balance regularizer trains under weight perturbation
    m = _module(WeightBall(eps=0.01), method={"name": "fast_ibp", "reg_terms": ["relu"]}).train()
    x, y = torch.rand(16, *SHAPE), torch.randint(0, 4, (16,))
    reg, log = m.regularizer(x, y, 0.005, False)
    assert reg is not None and torch.isfinite(reg) and "reg_relu" in log


def test_bad_eps_and_options_fail_clearly(tmp_path):
    import train

    cases = [
        (lambda: L0Ball(2, eval_eps=1.5), r"perturbation\.eval_eps must be an integer >= 0"),
        (lambda: L0Ball(2.5), r"perturbation\.eps=2\.5 is fractional.*give perturbation\.eval_eps"),
        (lambda: L0Ball(-1), r"perturbation\.eps must be a finite number >= 0"),
        (lambda: L0Ball(2, eval_eps=-1), r"perturbation\.eval_eps must be an integer >= 0"),
        (lambda: L0Ball(1, norm=2), r"norm of an L0 ball is 0"),
        (lambda: LpBall(norm=0), r"perturbation=l0"),
        (lambda: WeightBall(eps=-0.1), r"perturbation\.eps must be a finite number >= 0"),
        (lambda: WeightBall(norm=0), r"must be inf or 2"),
        (lambda: WeightBall(params=[]), r"perturbation\.params must be null"),
        (lambda: _module(WeightBall(params=["nope.weight"])), r"'nope\.weight' matches no parameter"),
        (lambda: _module(WeightBall(params=["features.*"])), r"matches no parameter"),
        (lambda: make_task(nn.Linear(2, 2), L0Ball(2), 1.5), r"eps must be an integer >= 0"),
        (lambda: make_task(nn.Linear(2, 2), L0Ball(2), -1), r"eps must be an integer >= 0"),
        (lambda: make_task(nn.Linear(2, 2), WeightBall(), -0.1), r"eps must be a finite number >= 0"),
        (lambda: make_task(nn.Linear(2, 2), SynonymSubstitution(), 1), r"text_verification"),
        (lambda: InputSetTask(nn.Linear(2, 2), WeightBall().at(0.01)), r"weight ball.*make_task"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    bn = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="belongs to BatchNorm1d"):
        CertifiedModule(bn, (0.5,), (0.5,), 4, perturbation=WeightBall(params=["*"]))
    L0Ball(2.5, eval_eps=2)  # a fractional training target with an integer evaluation budget is fine
    for overrides, match in [(["perturbation=l0", "perturbation.eval_eps=0.5"], r"eval_eps must be an integer"),
                             (["perturbation=l0", "perturbation.eps=-2"], r"eps must be"),
                             (["perturbation=weights", "perturbation.eps=-1"], r"eps must be"),
                             (["perturbation=weights", "perturbation.norm=1"], r"norm")]:
        with pytest.raises(ValueError, match=match):
            train.check_config(compose_cfg(tmp_path, overrides))


# ---------------------------------------------------------------- make_task
def test_make_task_for_each_threat():
    torch.manual_seed(0)
    m = _module(LpBall(eps=0.05))
    x = torch.rand(40, *SHAPE)
    y = m(x).argmax(1)
    y[:4] = (y[:4] + 1) % 4  # a few misclassified samples
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    kw = dict(pgd_steps=6, pgd_restarts=2, pgd_step_size=None, bound_opts=None)
    for threat, eps, cls, norm, radius, attack in [
            (LpBall(eps=0.05), 0.05, InputSetTask, math.inf, "ε", "PGD"),
            (L0Ball(1), 1, InputSetTask, 0.0, "k (pixels)", "L0 attack"),
            (WeightBall(norm=2, eps=0.05), 0.05, WeightSetTask, 2.0, "weight ε", "weight PGD")]:
        mm = _module(threat)
        task = make_task(mm.net, threat, eps, **kw)
        assert type(task) is cls and task.radius_name == radius and task.attack_name == attack
        res = run_verification(task, mm.net, loader, ["IBP", "CROWN-IBP", "CROWN"], alone=True, progress=False,
                               pgd_steps=6, pgd_restarts=2)
        assert (res.eps, res.norm, res.radius_name, res.attack_name) == (eps, norm, radius, attack)
        assert res.summary()["unsound"] == {"IBP": 0, "CROWN-IBP": 0, "CROWN": 0, "cascade": 0}
        assert attack in res.to_markdown() and res.n == 40
        if threat.perturbs == "weights":
            assert res.info["perturbed_parameters"] == [n for n, _ in WeightBall.perturbed(mm.net)]
    # a plain model (no CertifiedModule): the task installs the ball's parameters behind Normalize
    plain = nn.Sequential(m.net[0], mlp(SHAPE, 4, hidden=[8]))
    task = make_task(plain, WeightBall(eps=0.01), 0.01, **kw)
    assert task.params == ["1.classifier.0.weight", "1.classifier.2.weight"]
    lb = task.bounds(x[:5], y[:5], "CROWN", 4, None)
    assert lb.shape == (5, 3) and all(p.ptb is None for p in plain.parameters() if isinstance(p, BoundedParameter))
    # eps 0: the exact clean margins, no attack
    assert make_task(plain, WeightBall(eps=0.01), 0.0, **kw).exact()
    assert make_task(plain, L0Ball(1), 0, **kw).exact()


# ---------------------------------------------------------------- Lightning runs, checkpoints, verification
def _never_broken(module, dm, task_eps, steps=30, restarts=3):
    """Samples verified by every method are not broken by a stronger attack."""
    net, threat = module.net.eval(), module.threat
    task = make_task(net, threat, task_eps, pgd_steps=steps, pgd_restarts=restarts, pgd_step_size=None,
                     bound_opts=None)
    res = run_verification(task, net, dm.test_dataloader(), ["IBP", "CROWN-IBP", "CROWN"], alone=True,
                           progress=False, pgd_steps=steps, pgd_restarts=restarts)
    assert res.summary()["unsound"] == {"IBP": 0, "CROWN-IBP": 0, "CROWN": 0, "cascade": 0}
    return res


def test_l0_training_run_end_to_end(tmp_path):
    import train
    from certtrain.verification import load_for_verification

    # a fractional target: the last epochs train on 2 pixels at 3/4 of their range, evaluation at k = 1
    res = train.run(compose_cfg(tmp_path, [*FAST, "perturbation=l0", "perturbation.eps=1.5", "perturbation.eval_eps=1",
                                           "method=crown_ibp"]))
    t = res["test"]
    assert t["test/unsound"] == 0.0 and t["test/clean_acc"] > 0.5
    module, dm, _ = load_for_verification(res["test_ckpt"])
    assert isinstance(module.threat, L0Ball) and (module.eps, module.eval_eps) == (1.5, 1)
    r = _never_broken(module, dm, 1)
    n = r.n
    assert abs(t["test/clean_acc"] - r.clean_correct.float().mean().item()) < 0.5 / n
    for key, meth in (("verified_acc_ibp", "IBP"), ("verified_acc_crown_ibp", "CROWN-IBP")):
        assert abs(t[f"test/{key}"] - r.summary()["alone_acc"][meth]) < 0.5 / n, key
    assert r.summary()["verified"] > 0  # the run certifies something at k = 1


def test_weight_training_run_checkpoints_and_resume(tmp_path):
    import train

    over = [*FAST, "perturbation=weights", "perturbation.eps=0.02", "method=crown_ibp", "method.loss_fusion=true",
            "method.kappa_start=0", "method.kappa_end=0"]
    res = train.run(compose_cfg(tmp_path / "a", over))
    t = res["test"]
    assert t["test/unsound"] == 0.0 and t["test/clean_acc"] > 0.5
    trained = res["module"].cpu().eval()
    bp = {n for n, p in trained.net.named_parameters() if isinstance(p, BoundedParameter)}
    assert bp == {"1.classifier.0.weight", "1.classifier.2.weight", "1.classifier.4.weight"}
    # the optimizer trained the BoundedParameters themselves
    opt = res["trainer"].optimizers[0]
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in ids for p in trained.net.parameters() if isinstance(p, BoundedParameter))
    # checkpoints: plain tensors (weights_only loads), and load_certified rebuilds the BoundedParameters
    ckpt = torch.load(res["last_ckpt"], map_location="cpu", weights_only=True)
    assert all(type(v) is torch.Tensor for v in ckpt["state_dict"].values())
    assert ckpt["optimizer_states"][0]["state"]  # Adam moments of every parameter
    loaded = load_certified(res["last_ckpt"]).eval()
    assert {n for n, p in loaded.net.named_parameters() if isinstance(p, BoundedParameter)} == bp
    assert all(p.ptb is None for p in loaded.net.parameters() if isinstance(p, BoundedParameter))
    fresh = load_certified(res["last_ckpt"]).eval()
    fresh.load_state_dict(trained.state_dict())
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained(x))
        torch.testing.assert_close(loaded.margin_bounds(x, fresh(x).argmax(1), 0.02, "CROWN"),
                                   fresh.margin_bounds(x, fresh(x).argmax(1), 0.02, "CROWN"))
    # resume continues from the checkpoint's step, with its optimizer state
    res2 = train.run(compose_cfg(tmp_path / "b", [*over, f"ckpt_path='{res['last_ckpt']}'", "trainer.max_epochs=7"]))
    assert res2["trainer"].current_epoch == 7 and res2["test"]["test/unsound"] == 0.0
    from certtrain.verification import load_for_verification

    module, dm, _ = load_for_verification(res["test_ckpt"])
    assert _never_broken(module, dm, 0.02).summary()["verified"] > 0
