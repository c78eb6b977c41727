"""α-CROWN (method="alpha-CROWN"): sound for every optimized slope, never looser than CROWN, as
tight as auto_LiRPA's CROWN-Optimized on its own reference, and clear errors for bad options."""
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
    m, shape = {"mlp": (ActivationsMLP, (2, 4, 4)), "cnn": (OpsCNN, (2, 16, 16)),
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
def test_sound_and_never_looser_than_crown(name, norm, dtype):
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
def test_margin_specs_intermediate_and_per_pixel_eps(dtype):
    """Per-spec slopes with margin specs C, per-pixel eps, and optimized intermediate layers."""
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
                                    optimize_bound_args=FAST)
        li, _ = net.compute_bounds(x=(x,), method="alpha-CROWN", C=C, bound_upper=False,
                                   optimize_bound_args={**FAST, "optimize_intermediate": True})
    assert ua is None and la.shape == (3, 4)
    tol = 64 * torch.finfo(dtype).eps * (lc.abs() + 1)
    assert (la >= lc - tol).all() and (li >= lc - tol).all()
    assert li.mean() > la.mean()  # tighter intermediate bounds tighten the output
    for lb in (la, li):
        assert_sound(model, x0, ptb, lb, torch.full_like(lb, math.inf), C=C, n_random=100, pgd_steps=20)


def test_memory_chunks_do_not_change_the_bound():
    model, x0 = _model("mlp", torch.float64, seed=2)
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.08, x_L=0.0, x_U=1.0)
    x = BoundedTensor(x0, ptb)
    with torch.no_grad():
        full = BoundedModule(model, x0).compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args=FAST)
        tiny_net = BoundedModule(model, x0, bound_opts={"memory_budget": 1 << 12})
        # one spec row per chunk: the slopes are sliced per chunk
        assert tiny_net.rows_per_chunk(tiny_net.prepare((x,)), tiny_net.final_name) == 1
        tiny = tiny_net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args=FAST)
    for a, b in zip(full, tiny):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_differentiable_under_grad_equals_no_grad():
    """With gradients on, the best slopes are re-applied: same bound, and it has gradients."""
    model, x0 = _model("mlp", torch.float64, seed=3)
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.08)
    net = BoundedModule(model, x0)
    with torch.no_grad():
        lb0, ub0 = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="alpha-CROWN", optimize_bound_args=FAST)
    x = x0.clone().requires_grad_()
    with pytest.warns(UserWarning, match="gradients enabled"):
        lb, ub = net.compute_bounds(x=(BoundedTensor(x, ptb),), method="alpha-CROWN", optimize_bound_args=FAST)
    torch.testing.assert_close(lb, lb0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ub, ub0, rtol=1e-10, atol=1e-10)
    (ub - lb).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_zero_iterations_is_crown_and_aliases():
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
    with torch.inference_mode(), pytest.raises(RuntimeError, match="torch.no_grad"):
        net.compute_bounds(x=(x,), method="alpha-CROWN")
