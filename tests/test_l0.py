"""PerturbationL0Norm: at most k coordinates changed within their domain. The first Linear / Conv
is bounded over the set exactly (brute force over every k-subset and corner on tiny inputs), CROWN
concretizes exactly, every method is sound (random k-subsets, corners, a greedy gradient attack),
float32 and float64, through flatten and BatchNorm; bad settings are refused."""
import itertools

import pytest
import torch
from torch import nn

from bound_checks import assert_sound
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationL0Norm

METHODS = ["IBP", "CROWN-IBP", "CROWN", "alpha-CROWN"]
FAST = {"iteration": 6, "lr_alpha": 0.3}


def _brute_force(f, x0, k, lo, hi):
    """min / max of f over every point with at most k coordinates at an end of [lo, hi] (f affine
    per coordinate: its extremes over the L0 set lie at such points)."""
    n = x0.numel()
    best_lo, best_hi = None, None
    for r in range(k + 1):
        for idx in itertools.combinations(range(n), r):
            for ends in itertools.product((0, 1), repeat=r):
                x = x0.clone().flatten()
                for i, e in zip(idx, ends):
                    x[i] = hi.flatten()[i] if e else lo.flatten()[i]
                y = f(x.view_as(x0)[None])[0]
                best_lo = y if best_lo is None else torch.minimum(best_lo, y)
                best_hi = y if best_hi is None else torch.maximum(best_hi, y)
    return best_lo, best_hi


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("layer", ["linear", "conv", "conv_bn"])
def test_first_layer_is_exact(layer, k):
    torch.manual_seed(k)
    if layer == "linear":
        model, x0 = nn.Sequential(nn.Flatten(), nn.Linear(6, 4)), torch.rand(1, 2, 3)
    elif layer == "conv":
        model, x0 = nn.Conv2d(1, 2, 2, padding=1), torch.rand(1, 1, 2, 3)
    else:
        bn = nn.BatchNorm2d(1)
        bn.running_mean.fill_(0.3), bn.running_var.fill_(2.0), bn.weight.data.fill_(-1.5)
        model, x0 = nn.Sequential(bn, nn.Conv2d(1, 2, 2)).eval(), torch.rand(1, 1, 2, 3)
    model = model.double()
    x0 = x0.double()
    ptb = PerturbationL0Norm(eps=k)
    net = BoundedModule(model, x0)
    with torch.no_grad():
        lb, ub = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="IBP")
        lc, uc = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="CROWN")
        bl, bu = _brute_force(lambda x: model(x).flatten(1), x0[0], k, torch.zeros_like(x0[0]), torch.ones_like(x0[0]))
    for lo, hi in ((lb, ub), (lc, uc)):
        torch.testing.assert_close(lo.flatten(1)[0], bl)
        torch.testing.assert_close(hi.flatten(1)[0], bu)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                 nn.Linear(16, 5))

    def forward(self, x):
        return self.net(x)


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.relu(self.c2(h)).flatten(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_sound(name, method, k, dtype):
    torch.manual_seed(0)
    model = (_MLP() if name == "mlp" else _CNN()).to(dtype).eval()
    if name == "cnn":
        bn = model.bn
        bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 2)
    x0 = torch.rand(3, 2, 4, 4, dtype=dtype)
    ptb = PerturbationL0Norm(eps=k)
    net = BoundedModule(model, x0)
    kw = {"optimize_bound_args": FAST} if method == "alpha-CROWN" else {}
    with torch.no_grad():
        lb, ub = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method=method, **kw)
    assert (lb <= ub).all()
    assert_sound(model, x0, ptb, lb, ub, n_random=200, pgd_steps=10)


def test_bounds_grow_with_k_and_k0_is_the_clean_output():
    torch.manual_seed(0)
    model = _MLP().double().eval()
    x0 = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    net = BoundedModule(model, x0)
    widths = []
    for k in range(0, 4):
        lb, ub = net.compute_bounds(x=(BoundedTensor(x0, PerturbationL0Norm(eps=k)),), method="CROWN")
        widths.append((ub - lb).sum().item())
        if k == 0:
            torch.testing.assert_close(lb, model(x0))
            torch.testing.assert_close(ub, model(x0))
    assert all(a < b for a, b in zip(widths, widths[1:]))


@pytest.mark.parametrize("kw,match", [({"eps": 1.5}, "integer"), ({"eps": -1}, "integer"),
                                      ({"eps": 1, "x_L": 0.5}, "outside"), ({"eps": 1, "x_L": 1.0, "x_U": 0.0}, "empty")])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        ptb = PerturbationL0Norm(**kw)
        net = BoundedModule(_MLP(), torch.rand(2, 2, 4, 4))
        net.compute_bounds(x=(BoundedTensor(torch.rand(2, 2, 4, 4) * 0.4, ptb),), method="IBP")
