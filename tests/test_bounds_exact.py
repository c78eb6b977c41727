"""Exactness: affine models have closed-form bounds; eps = 0 gives the forward output; patches and
dense convolution paths agree; bounds are differentiable and follow the model's dtype."""
import math

import pytest
import torch
from torch import nn

from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm
from op_models import ActivationsMLP, OpsCNN, randomize_bn

METHODS = ["IBP", "CROWN-IBP", "CROWN"]
DUAL = {math.inf: 1, 2: 2, 1: math.inf}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("norm", [math.inf, 2, 1], ids=["linf", "l2", "l1"])
@pytest.mark.parametrize("method", METHODS)
def test_linear_closed_form(method, norm, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(12, 7).to(dtype)
    model = nn.Sequential(nn.Flatten(), lin)
    x0 = torch.randn(4, 3, 4, dtype=dtype)
    eps = 0.2
    net = BoundedModule(model, x0)
    lb, ub = net.compute_bounds(x=(BoundedTensor(x0, PerturbationLpNorm(norm=norm, eps=eps)),), method=method)
    W, b = lin.weight, lin.bias
    center = x0.flatten(1) @ W.T + b
    rad = eps * W.norm(p=DUAL[norm], dim=1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lb, center - rad, **tol)
    torch.testing.assert_close(ub, center + rad, **tol)


class AffineCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 6)

    def forward(self, x):
        y = self.bn(self.conv(x * 2.0 - 0.5))
        y = y + self.conv2(y)
        return self.fc(torch.flatten(y, 1)) / 3.0


@pytest.mark.parametrize("conv_mode", ["patches", "matrix"])
@pytest.mark.parametrize("norm", [math.inf, 2, 1], ids=["linf", "l2", "l1"])
@pytest.mark.parametrize("method", ["CROWN", "CROWN-IBP"])
def test_affine_cnn_closed_form(method, norm, conv_mode):
    """With no nonlinearity, CROWN is exact: f(x0) +- eps ||J_i||_q for the model's Jacobian J."""
    torch.manual_seed(1)
    model = randomize_bn(AffineCNN()).double().eval()
    x0 = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    eps = 0.1
    net = BoundedModule(model, x0, bound_opts={"conv_mode": conv_mode})
    lb, ub = net.compute_bounds(x=(BoundedTensor(x0, PerturbationLpNorm(norm=norm, eps=eps)),), method=method)
    J = torch.autograd.functional.jacobian(lambda x: model(x).sum(0), x0).transpose(0, 1).flatten(2)
    y = model(x0)
    rad = eps * J.norm(p=DUAL[norm], dim=-1)
    torch.testing.assert_close(lb, y - rad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ub, y + rad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_eps_zero_gives_forward(name, method):
    torch.manual_seed(2)
    model = randomize_bn(ActivationsMLP() if name == "mlp" else OpsCNN()).double().eval()
    x0 = torch.rand(3, 2, 16, 16, dtype=torch.float64) if name == "cnn" else torch.rand(3, 2, 4, 4, dtype=torch.float64)
    net = BoundedModule(model, x0)
    lb, ub = net.compute_bounds(x=(BoundedTensor(x0, PerturbationLpNorm(norm=math.inf, eps=0.0)),), method=method)
    y = model(x0)
    torch.testing.assert_close(lb, y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ub, y, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("relu", ["adaptive", "same-slope"])
@pytest.mark.parametrize("norm", [math.inf, 2], ids=["linf", "l2"])
def test_patches_equal_matrix(norm, relu):
    torch.manual_seed(3)
    model = randomize_bn(OpsCNN()).double().eval()
    x0 = torch.rand(2, 2, 16, 16, dtype=torch.float64)
    ptb = PerturbationLpNorm(norm=norm, eps=0.03 if norm == math.inf else 0.3)
    res = {}
    for mode in ("patches", "matrix"):
        net = BoundedModule(model, x0, bound_opts={"conv_mode": mode, "relu": relu})
        res[mode] = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="CROWN")
    torch.testing.assert_close(res["patches"][0], res["matrix"][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res["patches"][1], res["matrix"][1], rtol=1e-10, atol=1e-10)


def test_zoo_resnet_patches_equal_matrix():
    """Residual blocks with strided shortcuts (window alignment in patches mode)."""
    from certtrain_models import resnet
    torch.manual_seed(4)
    model = randomize_bn(resnet(in_shape=(3, 16, 16), num_classes=4, num_blocks=(1, 1), widths=(4, 8))).double().eval()
    x0 = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.002)
    out = [BoundedModule(model, x0, bound_opts={"conv_mode": m}).compute_bounds(
        x=(BoundedTensor(x0, ptb),), method="CROWN") for m in ("patches", "matrix")]
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-10, atol=1e-10)


def test_chunking_does_not_change_bounds():
    torch.manual_seed(5)
    model = randomize_bn(OpsCNN()).double().eval()
    x0 = torch.rand(2, 2, 16, 16, dtype=torch.float64)
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.03)
    big = BoundedModule(model, x0).compute_bounds(x=(BoundedTensor(x0, ptb),), method="CROWN")
    small = BoundedModule(model, x0, bound_opts={"memory_budget": 20_000}).compute_bounds(
        x=(BoundedTensor(x0, ptb),), method="CROWN")
    torch.testing.assert_close(big[0], small[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(big[1], small[1], rtol=1e-12, atol=1e-12)


def test_ibp_spec_folded_into_last_linear():
    """IBP with C folds C into the last layer: never looser than C applied to the output box."""
    torch.manual_seed(6)
    model = ActivationsMLP().double().eval()
    x0 = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    C = torch.randn(3, 4, 5, dtype=torch.float64)
    net = BoundedModule(model, x0)
    x = BoundedTensor(x0, PerturbationLpNorm(norm=math.inf, eps=0.1))
    lb, ub = net.compute_bounds(x=(x,), method="IBP", C=C)
    l, u = net.compute_bounds(x=(x,), method="IBP")
    c, r = (u + l) / 2, (u - l) / 2
    lb2 = torch.einsum("bsn,bn->bs", C, c) - torch.einsum("bsn,bn->bs", C.abs(), r)
    assert (lb >= lb2 - 1e-12).all() and (lb > lb2 + 1e-9).any()


@pytest.mark.parametrize("method", METHODS)
def test_bounds_are_differentiable(method):
    torch.manual_seed(7)
    model = randomize_bn(OpsCNN()).eval()
    x0 = torch.rand(2, 2, 16, 16, requires_grad=True)
    net = BoundedModule(model, x0)
    lb, ub = net.compute_bounds(x=(BoundedTensor(x0, PerturbationLpNorm(norm=math.inf, eps=0.02)),), method=method)
    (ub - lb).sum().backward()
    assert x0.grad is not None and torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_gradient_matches_finite_differences():
    """d lb / d x0 of CROWN equals a central finite difference (float64, no stability flips)."""
    torch.manual_seed(8)
    model = ActivationsMLP().double().eval()
    x0 = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    net = BoundedModule(model, x0)

    def f(x):
        return net.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.05)),),
                                  method="CROWN")[0].sum()

    x = x0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x)
    d = torch.randn_like(x0)
    h = 1e-6
    fd = (f(x0 + h * d) - f(x0 - h * d)) / (2 * h)
    assert abs(fd.item() - (g * d).sum().item()) < 1e-5 * (1 + abs(fd.item()))


def test_plain_forward_and_dtype():
    model = ActivationsMLP().eval()
    x0 = torch.rand(3, 2, 4, 4)
    net = BoundedModule(model, x0)
    torch.testing.assert_close(net(x0), model(x0))
    net64 = BoundedModule(model.double(), x0.double())
    lb, ub = net64.compute_bounds(x=(BoundedTensor(x0.double(), PerturbationLpNorm(eps=0.1)),), method="CROWN")
    assert lb.dtype == ub.dtype == torch.float64
    lb, _ = net64.compute_bounds(x=(BoundedTensor(torch.rand(7, 2, 4, 4).double(), PerturbationLpNorm(eps=0.1)),),
                                 method="crown")  # other batch size, lower-case method
    assert lb.shape == (7, 5)


def test_method_aliases():
    model = ActivationsMLP().double().eval()
    x0 = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    net = BoundedModule(model, x0)
    x = BoundedTensor(x0, PerturbationLpNorm(eps=0.1))
    same = [("backward", "CROWN"), ("IBP+backward", "CROWN-IBP"), ("ibp", "IBP")]
    for alias, name in same:
        torch.testing.assert_close(net.compute_bounds(x=(x,), method=alias), net.compute_bounds(x=(x,), method=name))
    torch.testing.assert_close(net.compute_bounds(x=(x,), IBP=True, method=None), net.compute_bounds(x=(x,), method="IBP"))
    torch.testing.assert_close(net.compute_bounds(x=(x,), IBP=True, method="backward"),
                               net.compute_bounds(x=(x,), method="CROWN-IBP"))
    lb, ub = net.compute_bounds(x=(x,), method="CROWN", bound_upper=False)
    assert ub is None and lb is not None


def test_forward_then_bounds_reuses_the_forward_pass():
    """net(x) followed by compute_bounds on the same x reuses the node values (one model run), and
    gives exactly the bounds of a fresh computation; a parameter update invalidates the cache."""
    torch.manual_seed(9)
    model = randomize_bn(OpsCNN()).train()
    x0 = torch.rand(3, 2, 16, 16)
    net = BoundedModule(model, x0)
    x = BoundedTensor(x0, PerturbationLpNorm(norm=math.inf, eps=0.02))
    calls = []
    h = model.conv1.register_forward_hook(lambda *a: calls.append(1))
    y = net(x0)
    lb1, ub1 = net.compute_bounds(x=(x,), method="CROWN-IBP")
    assert len(calls) == 1  # the bounds did not run the model again
    torch.testing.assert_close(y, model(x0))
    lb2, ub2 = net.compute_bounds(x=(x,), method="CROWN-IBP")  # no cache: runs the model
    assert len(calls) == 3
    torch.testing.assert_close(lb1, lb2)
    torch.testing.assert_close(ub1, ub2)
    net(x0)
    with torch.no_grad():
        model.conv1.weight.add_(0.1)
    lb3, _ = net.compute_bounds(x=(x,), method="CROWN-IBP")  # stale cache must not be used
    h.remove()
    fresh = BoundedModule(model, x0).compute_bounds(x=(x,), method="CROWN-IBP")[0]
    torch.testing.assert_close(lb3, fresh)
    assert not torch.allclose(lb3, lb1)


def test_forward_cache_never_serves_other_inputs_or_eps():
    """After net(x), bounds for another batch (other size or values) or another eps equal a fresh
    computation: the cache holds clean values only and is keyed on the inputs and parameters."""
    torch.manual_seed(10)
    model = randomize_bn(OpsCNN()).double().eval()
    x0 = torch.rand(3, 2, 16, 16, dtype=torch.float64)
    net = BoundedModule(model, x0)
    ref = BoundedModule(model, x0)
    for other, eps in ((torch.rand(5, 2, 16, 16, dtype=torch.float64), 0.02), (x0.clone() + 0.01, 0.02),
                       (x0, 0.05)):
        net(x0)
        got = net.compute_bounds(x=(BoundedTensor(other, PerturbationLpNorm(eps=eps)),), method="CROWN-IBP")
        want = ref.compute_bounds(x=(BoundedTensor(other, PerturbationLpNorm(eps=eps)),), method="CROWN-IBP")
        torch.testing.assert_close(got, want, rtol=0, atol=0)
