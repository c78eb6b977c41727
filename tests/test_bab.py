"""Branch and bound (β-CROWN): every `verified` is attacked independently (PGD with restarts and a
dense grid of the box), every `falsified` is re-run on the network; the search proves properties
that α-CROWN alone cannot, decides fully split domains by an LP, and keeps its statuses apart."""
import math

import pytest
import torch
from torch import nn

from certtrain.bounds import BaBOptions, BoundedModule, BoundedTensor, PerturbationLpNorm, bab_verify


EPS = (0.05, 0.1, 0.2)
SCALE = 2.0


def _mlp(seed, widths, dtype):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers).to(dtype)


def _attack_min(model, x_L, x_U, C, d, groups, restarts=20, steps=200):
    """Independent PGD (and random points): the smallest violation margin found in the box."""
    g = torch.Generator().manual_seed(123)
    x = x_L + (x_U - x_L) * torch.rand((restarts, *x_L.shape[1:]), generator=g, dtype=x_L.dtype)
    x = torch.cat([x, x_L, x_U, (x_L + x_U) / 2])
    step = (x_U - x_L) / 8
    best = math.inf
    for i in range(steps):
        x.requires_grad_(True)
        v = model(x).flatten(1) @ C[0].T - d
        obj = torch.stack([v[:, gr].max(1).values for gr in groups], 1).min(1).values
        best = min(best, float(obj.detach().min()))
        grad, = torch.autograd.grad(obj.sum(), x)
        with torch.no_grad():
            x = torch.max(torch.min(x - step * grad.sign(), x_U), x_L)
            step = step * 0.98
    return best


def _grid_min(model, x_L, x_U, C, d, groups, n=301):
    a = [torch.linspace(float(x_L[0, i]), float(x_U[0, i]), n, dtype=x_L.dtype) for i in range(x_L.shape[1])]
    pts = torch.cartesian_prod(*a)
    with torch.no_grad():
        v = model(pts) @ C[0].T - d
    return float(torch.stack([v[:, gr].max(1).values for gr in groups], 1).min(1).values.min())


def _check_result(res, model, x_L, x_U, C, d, groups, grid=True):
    assert res.status in ("verified", "falsified", "timeout", "unknown")
    if res.status == "verified":
        assert _attack_min(model, x_L, x_U, C, d, groups) > 0, f"{res} but PGD breaks it"
        if grid:
            assert _grid_min(model, x_L, x_U, C, d, groups) > 0, f"{res} but a grid point breaks it"
    if res.status == "falsified":
        x = res.counterexample
        assert x is not None and bool((x >= x_L).all() and (x <= x_U).all())
        with torch.no_grad():
            v = model(x).flatten(1)[0] @ C[0].T - d
        assert any(bool((v[gr] <= 0).all()) for gr in groups), f"{res} with a point that satisfies the property"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bab_decides_2d_properties_exactly(dtype, one_thread):
    """2-D inputs: the grid minimum is (nearly) the truth; thresholds just above and below it."""
    decided = {"verified": 0, "falsified": 0, "bab_only": 0}
    for seed in range(3):
        model = _mlp(seed, [2, 16, 16, 2], dtype)
        x0 = torch.zeros(1, 2, dtype=dtype)
        net = BoundedModule(model, x0)
        C = torch.tensor([[[1.0, -1.0]]], dtype=dtype)
        x_L, x_U = x0 - 1, x0 + 1
        m = _grid_min(model, x_L, x_U, C, torch.zeros(1, dtype=dtype), [[0]], n=801)
        # α-CROWN alone at the same threshold
        bx = BoundedTensor(x0, PerturbationLpNorm(eps=1.0, x_L=x_L, x_U=x_U))
        with torch.no_grad():
            a_lb, _ = net.compute_bounds(x=(bx,), C=C, method="alpha-CROWN", bound_upper=False)
        for off in (-0.01, -0.002, 0.002, 0.01):
            d = torch.tensor([m + off], dtype=dtype)
            res = bab_verify(net, x_L, x_U, C, d, options={"timeout": 30, "batch_domains": 64})
            _check_result(res, model, x_L, x_U, C, d, [[0]])
            assert res.status == ("verified" if off < 0 else "falsified"), f"seed {seed} off {off}: {res}"
            decided[res.status] += 1
            if res.status == "verified" and float(a_lb) - float(d) <= 0:
                decided["bab_only"] += 1
    assert decided["bab_only"] >= 3, decided  # properties α-CROWN alone cannot prove


def test_bab_lp_decides_fully_split_domains(one_thread):
    """Without β and intermediate refinement the search splits every unstable neuron; the LP
    then decides those domains, both ways."""
    for seed in range(3):
        model = _mlp(seed, [2, 6, 6, 1], torch.float64)
        x0 = torch.zeros(1, 2, dtype=torch.float64)
        net = BoundedModule(model, x0)
        C = torch.ones(1, 1, 1, dtype=torch.float64)
        m = _grid_min(model, x0 - 1, x0 + 1, C, torch.zeros(1, dtype=torch.float64), [[0]], n=1001)
        for off in (-0.003, 0.003):
            d = torch.tensor([m + off], dtype=torch.float64)
            res = bab_verify(net, x0 - 1, x0 + 1, C, d, options=BaBOptions(
                iteration=0, refine_intermediate=False, pgd_steps=0, batch_domains=8, timeout=20))
            _check_result(res, model, x0 - 1, x0 + 1, C, d, [[0]])
            assert res.status == ("verified" if off < 0 else "falsified"), res


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bab_robustness_mlp_and_cnn(dtype, one_thread):
    """Robustness properties (one group per other class) on an MLP and a small CNN: every claim is
    attacked / re-run; at least one needs the search."""
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)
    mlp = _mlp(4, [6, 24, 24, 3], dtype)
    with torch.no_grad():  # sharper than at initialization, so that some properties fail
        for p in (*cnn.parameters(), *mlp.parameters()):
            p.mul_(SCALE)
    statuses = []
    for model, shape in ((mlp, (1, 6)), (cnn, (1, 1, 8, 8))):
        g = torch.Generator().manual_seed(1)
        for k in range(3):
            x0 = torch.rand(shape, generator=g, dtype=dtype)
            net = BoundedModule(model, x0)
            t = int(model(x0).argmax())
            C = torch.zeros(1, 2, 3, dtype=dtype)
            for r, j in enumerate(j for j in range(3) if j != t):
                C[0, r, t], C[0, r, j] = 1, -1
            for eps in EPS:
                x_L, x_U = (x0 - eps).clamp(0, 1), (x0 + eps).clamp(0, 1)
                res = bab_verify(net, x_L, x_U, C, options={"timeout": 15})
                _check_result(res, model, x_L, x_U, C, torch.zeros(2, dtype=dtype), [[0], [1]], grid=False)
                statuses.append((res.status, res.stage))
    assert any(s == ("verified", "bab") for s in statuses), statuses
    assert any(s[0] == "falsified" for s in statuses), statuses
    assert not any(s[0] in ("unknown", "error") for s in statuses), statuses


def test_bab_groups_are_conjunctions(one_thread):
    """Unsafe iff all rows of a group are <= d: a property whose rows are each violated somewhere,
    but never together, holds."""
    model = nn.Linear(1, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model.bias.zero_()
    net = BoundedModule(nn.Sequential(model, nn.ReLU()), torch.zeros(1, 1, dtype=torch.float64))
    x_L, x_U = torch.full((1, 1), -1.0, dtype=torch.float64), torch.full((1, 1), 1.0, dtype=torch.float64)
    C = torch.eye(2, dtype=torch.float64).unsqueeze(0)
    d = torch.full((2,), -0.1, dtype=torch.float64)
    # relu(x) <= -0.1 and relu(-x) <= -0.1 never hold: each row alone never holds either
    assert bab_verify(net, x_L, x_U, C, d, groups=[[0, 1]]).status == "verified"
    # relu(x) <= 0.5 and relu(-x) <= 0.5 hold together at x = 0: falsified
    res = bab_verify(net, x_L, x_U, C, torch.full((2,), 0.5, dtype=torch.float64), groups=[[0, 1]])
    assert res.status == "falsified" and res.counterexample is not None


def test_bab_timeout_is_not_verified(one_thread):
    """A property that holds but needs the search, with no time for it: ``timeout``, with the
    search's (negative) global lower bound."""
    model = _mlp(0, [2, 16, 16, 2], torch.float64)
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    net = BoundedModule(model, x0)
    C = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
    m = _grid_min(model, x0 - 1, x0 + 1, C, torch.zeros(1, dtype=torch.float64), [[0]], n=801)
    d = torch.tensor([m - 0.002], dtype=torch.float64)
    res = bab_verify(net, x0 - 1, x0 + 1, C, d, options={"timeout": 1e-3})
    assert res.status == "timeout" and res.lower_bound < 0, res
    assert bab_verify(net, x0 - 1, x0 + 1, C, d, options={"timeout": 30}).status == "verified"


def test_bab_options_are_checked():
    with pytest.raises(ValueError, match="unknown branch-and-bound option.*'timeuot'"):
        BaBOptions.from_dict({"timeuot": 3})
    with pytest.raises(ValueError, match="branching must be"):
        BaBOptions(branching="random")
    with pytest.raises(ValueError, match="timeout must be a positive"):
        BaBOptions(timeout=0)
    net = BoundedModule(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="has none"):
        bab_verify(net, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 1, 2))
    net = BoundedModule(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="empty"):
        bab_verify(net, torch.ones(1, 2), torch.zeros(1, 2), torch.ones(1, 1, 2))
    with pytest.raises(ValueError, match="groups"):
        bab_verify(net, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 1, 2), groups=[[0, 3]])
