"""α-CROWN (method="alpha-CROWN"): sound for every optimized slope, never looser than CROWN, its
options (intermediate layers, α layouts and memory budget, early stopping), and clear errors for bad
options.  Random α of every relaxation: tests/test_alpha_relaxations.py; auto_LiRPA's references:
tests/test_autolirpa_refs*.py."""
import math

import pytest
import torch

from bound_checks import assert_sound
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm
from op_models import ActivationsMLP, OpsCNN, TrainBNResNet, randomize_bn

DTYPES = [torch.float32, torch.float64]
FAST = {"iteration": 6, "lr_alpha": 0.3}  # soundness holds for any iterate; a few steps suffice


def _model(name, dtype, seed=0):
    torch.manual_seed(seed)
    m, shape = {"mlp": (ActivationsMLP, (2, 4, 4)), "cnn": (OpsCNN, (2, 8, 8)),
                "resnet": (TrainBNResNet, (2, 8, 8))}[name]
    m = randomize_bn(m(), seed).to(dtype).eval()
    return m, torch.rand(3, *shape, dtype=dtype)


def _margin_spec(y, k, dtype):
    eye = torch.eye(k, dtype=dtype)
    C = eye[y].unsqueeze(1) - eye.unsqueeze(0)
    return C[torch.arange(k)[None] != y[:, None]].view(len(y), k - 1, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("norm", [math.inf, 2], ids=["linf", "l2"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_sound_and_never_looser_than_crown(name, norm, dtype, one_thread):
    model, x0 = _model(name, dtype)
    eps = {math.inf: 0.06, 2: 0.4}[norm]
    kw = dict(x_L=0.0, x_U=1.0) if norm == math.inf else {}
    ptb = PerturbationLpNorm(norm=norm, eps=eps, **kw)
    x = BoundedTensor(x0, ptb)
    net = BoundedModule(model, x0)
    with torch.no_grad():
        lc, uc = net.compute_bounds(x=(x,), method="CROWN")
        la, ua = net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args=FAST)
    tol = 64 * torch.finfo(dtype).eps * (lc.abs() + uc.abs() + 1)
    assert (la >= lc - tol).all() and (ua <= uc + tol).all()
    assert (la > lc + tol).any() or (ua < uc - tol).any(), "no tightening at all: unstable ReLUs expected"
    assert_sound(model, x0, ptb, la, ua, n_random=100, pgd_steps=20)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_margin_specs_intermediate_and_per_pixel_eps(dtype, one_thread):
    """Per-spec slopes with margin specs C, per-pixel eps, and optimized intermediate layers (the
    default) against fixed ones."""
    model, x0 = _model("cnn", dtype, seed=1)
    y = torch.tensor([0, 3, 1])
    C = _margin_spec(y, 5, dtype)
    ptb = PerturbationLpNorm(norm=math.inf, eps=torch.rand(1, *x0.shape[1:], dtype=dtype) * 0.1,
                             x_L=0.0, x_U=1.0)
    x = BoundedTensor(x0, ptb)
    net = BoundedModule(model, x0)
    with torch.no_grad():
        lc, _ = net.compute_bounds(x=(x,), method="CROWN", C=C, bound_upper=False)
        la, ua = net.compute_bounds(x=(x,), method="alpha-CROWN", C=C, bound_upper=False,
                                    optimize_bound_args={**FAST, "optimize_intermediate": False})
        li, _ = net.compute_bounds(x=(x,), method="alpha-CROWN", C=C, bound_upper=False,
                                   optimize_bound_args=FAST)
    assert ua is None and la.shape == (3, 4)
    tol = 64 * torch.finfo(dtype).eps * (lc.abs() + 1)
    assert (la >= lc - tol).all() and (li >= lc - tol).all()
    assert li.mean() > la.mean()  # tighter intermediate bounds tighten the output
    for lb in (la, li):
        assert_sound(model, x0, ptb, lb, torch.full_like(lb, math.inf), C=C, n_random=100, pgd_steps=20)


def test_memory_chunks_do_not_change_the_bound(one_thread):
    model, x0 = _model("mlp", torch.float64, seed=2)
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.08, x_L=0.0, x_U=1.0)
    x = BoundedTensor(x0, ptb)
    with torch.no_grad():
        opts = {**FAST, "iteration": 3}
        full = BoundedModule(model, x0).compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args=opts)
        tiny_net = BoundedModule(model, x0, bound_opts={"memory_budget": 1 << 12})
        # one row per chunk (spec rows and intermediate neurons): α is sliced per chunk, and each
        # chunk checkpointed
        assert tiny_net.rows_per_chunk(tiny_net.prepare((x,)), tiny_net.final_name) == 1
        tiny = tiny_net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args=opts)
    for a, b in zip(full, tiny):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("inter", [True, False], ids=["intermediate", "final-only"])
def test_differentiable_under_grad_equals_no_grad(inter, one_thread):
    """With gradients on: the same bound (final-only: re-evaluated at the best slopes), and it has
    gradients."""
    model, x0 = _model("mlp", torch.float64, seed=3)
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.08)
    net = BoundedModule(model, x0)
    opts = {**FAST, "optimize_intermediate": inter}
    with torch.no_grad():
        lb0, ub0 = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="alpha-CROWN", optimize_bound_args=opts)
    x = x0.clone().requires_grad_()
    with pytest.warns(UserWarning, match="gradients enabled"):
        lb, ub = net.compute_bounds(x=(BoundedTensor(x, ptb),), method="alpha-CROWN", optimize_bound_args=opts)
    torch.testing.assert_close(lb, lb0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ub, ub0, rtol=1e-10, atol=1e-10)
    (ub - lb).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_zero_iterations_is_crown_and_aliases(one_thread):
    model, x0 = _model("mlp", torch.float64, seed=4)
    x = BoundedTensor(x0, PerturbationLpNorm(norm=math.inf, eps=0.08))
    net = BoundedModule(model, x0)
    with torch.no_grad():
        ref = net.compute_bounds(x=(x,), method="CROWN")
        zero = net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args={"iteration": 0})
        alias = net.compute_bounds(x=(x,), method="CROWN-Optimized", optimize_bound_args=FAST)
        plain = net.compute_bounds(x=(x,), method="alpha_crown", optimize_bound_args=FAST)
    for a, b in zip(ref, zero):
        torch.testing.assert_close(a, b)
    for a, b in zip(alias, plain):
        torch.testing.assert_close(a, b)


def test_bad_options_and_inference_mode():
    model, x0 = _model("mlp", torch.float32)
    x = BoundedTensor(x0, PerturbationLpNorm(norm=math.inf, eps=0.05))
    net = BoundedModule(model, x0)
    with pytest.raises(ValueError, match="unknown optimize_bound_args key 'iterations'"):
        net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args={"iterations": 3})
    with pytest.raises(ValueError, match="lr_alpha must be a positive number"):
        net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args={"lr_alpha": -1})
    with pytest.raises(ValueError, match="iteration must be an integer >= 0"):
        BoundedModule(model, x0, bound_opts={"optimize_bound_args": {"iteration": 2.5}})
    with pytest.raises(ValueError, match="early_stop_patience must be an integer >= 0"):
        net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args={"early_stop_patience": -1})
    with pytest.raises(ValueError, match="use_shared_alpha must be true or false"):
        net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args={"use_shared_alpha": "yes"})
    with pytest.raises(ValueError, match="alpha_memory_budget must be a positive number of bytes"):
        net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args={"alpha_memory_budget": 0})
    with pytest.raises(ValueError, match="unknown optimize_bound_args key 'fix_interm_bounds'"):
        net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args={"fix_interm_bounds": True})
    with torch.inference_mode(), pytest.raises(RuntimeError, match="torch.no_grad"):
        net.compute_bounds(x=(x,), method="alpha-CROWN")


def _cnn_case(dtype=torch.float64):
    torch.manual_seed(5)
    model = randomize_bn(OpsCNN(), 5).to(dtype).eval()
    x0 = torch.rand(2, 2, 8, 8, dtype=dtype)
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.05, x_L=0.0, x_U=1.0)
    return model, x0, ptb, BoundedModule(model, x0)


@pytest.mark.parametrize("opts", [{"use_shared_alpha": True}, {"use_full_conv_alpha": True}, {"joint": True},
                                  {"alpha_memory_budget": 1}],
                         ids=["shared", "full-conv", "joint", "tiny-budget"])
def test_alpha_layouts_sound_and_never_looser(opts, one_thread):
    """Every α layout (one per layer, one per neuron of convolutions, one optimization for both
    sides, everything shared under a tiny memory budget) is sound and never looser than CROWN."""
    model, x0, ptb, net = _cnn_case()
    x = BoundedTensor(x0, ptb)
    with torch.no_grad():
        lc, uc = net.compute_bounds(x=(x,), method="CROWN")
        la, ua = net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args={**FAST, **opts})
    kinds = {k for _, _, k, _, _ in net.last_alpha_stats["layouts"]}
    expect = {"use_shared_alpha": {"spec", "shared"}, "use_full_conv_alpha": {"spec", "row"},
              "joint": {"spec", "channel"}, "alpha_memory_budget": {"shared"}}[next(iter(opts))]
    assert kinds == expect, kinds
    assert (la >= lc - 1e-12).all() and (ua <= uc + 1e-12).all()
    assert (la > lc + 1e-9).any() and (ua < uc - 1e-9).any()
    assert_sound(model, x0, ptb, la, ua, n_random=50, pgd_steps=10)


def test_default_layout_and_state(one_thread):
    """Defaults: one α per spec row for the output, per output channel for convolutional
    intermediate layers (per neuron for the others: tests/test_autolirpa_refs_ops.py::test_min_max);
    the returned state holds the optimized intermediate bounds (inside CROWN's); α fits its budget."""
    model, x0, ptb, net = _cnn_case()
    x = BoundedTensor(x0, ptb)
    with torch.no_grad():
        _, _, sc = net.compute_bounds(x=(x,), method="CROWN", return_state=True)
        la, ua, sa = net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args=FAST, return_state=True)
    assert {k for _, _, k, _, _ in net.last_alpha_stats["layouts"]} == {"spec", "channel"}
    for _, s, k, _, _ in net.last_alpha_stats["layouts"]:
        shape = sc.values[s].value.shape[1:]
        assert k == ("spec" if s == net.final_name else "channel" if len(shape) == 3 else "row")
    assert 0 < net.last_alpha_stats["alpha_bytes"] <= (1 << 30)
    tighter = 0
    for name in net.refined_names(sc):
        (lc_, uc_), (la_, ua_) = sc.bounds(name), sa.bounds(name)
        assert not la_.requires_grad
        assert (la_ >= lc_ - 1e-12).all() and (ua_ <= uc_ + 1e-12).all()
        tighter += int((la_ > lc_ + 1e-9).sum() + (ua_ < uc_ - 1e-9).sum())
    assert tighter > 0


def test_early_stopping(one_thread):
    """early_stop_patience: a run stops after that many steps without an improvement of more than
    early_stop_rtol (relative to the bounds' magnitude); 0 never stops early."""
    model, x0, ptb, net = _cnn_case()
    x = BoundedTensor(x0, ptb)
    with torch.no_grad():
        full = net.compute_bounds(x=(x,), method="alpha-CROWN",
                                  optimize_bound_args={"iteration": 8, "early_stop_patience": 0, "joint": True})
        assert net.last_alpha_stats["iterations"] == 8
        stopped = net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args={
            "iteration": 8, "early_stop_patience": 2, "early_stop_rtol": 1.0, "joint": True})
        assert net.last_alpha_stats["iterations"] == 2
        crown = net.compute_bounds(x=(x,), method="CROWN")
    assert (stopped[0] >= crown[0] - 1e-12).all() and (full[0] >= stopped[0] - 1e-9).all()


def test_checkpointed_chunks_do_not_change_the_bound(one_thread):
    """Under a small memory budget the intermediate passes run in small chunks, each under
    activation checkpointing (per-channel α applied per group of rows, recomputed in the backward
    pass): the same bounds as one unchunked pass."""
    model, x0, ptb, net = _cnn_case()
    x = BoundedTensor(x0, ptb)
    opts = {**FAST, "iteration": 2}
    with torch.no_grad():
        ref = net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args=opts)
        small = BoundedModule(model, x0, bound_opts={"memory_budget": 1 << 23})
        got = small.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args=opts)
    assert "channel" in {k for _, _, k, _, _ in small.last_alpha_stats["layouts"]}
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
