"""Soundness of issue 10's rules (element picking, powers and clamps, products of bounded
tensors): random points, corners and PGD inside the set stay in [lb, ub] for every method, for L∞
and L2, in float32 and float64; α-CROWN is never looser than CROWN; IBP is exact where the
closed form is known."""
import math

import pytest
import torch

from bound_checks import assert_sound
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm
from seq_op_models import EinsumOps, PowerOps, ProductOps, SelectOps

MODELS = {"select": SelectOps, "power": PowerOps, "product": ProductOps, "einsum": EinsumOps}
METHODS = ["IBP", "CROWN-IBP", "CROWN", "alpha-CROWN"]
FAST = {"iteration": 6, "lr_alpha": 0.3}


def _setup(name, dtype, norm, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name]().to(dtype).eval()
    x0 = torch.rand(3, 2, 4, 4, dtype=dtype)
    eps = {math.inf: 0.04, 2: 0.2}[norm]
    kw = dict(x_L=0.0, x_U=1.0) if norm == math.inf else {}
    return model, x0, PerturbationLpNorm(norm=norm, eps=eps, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("norm", [math.inf, 2], ids=["linf", "l2"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MODELS))
def test_sound(name, method, norm, dtype):
    model, x0, ptb = _setup(name, dtype, norm)
    net = BoundedModule(model, x0)
    kw = {"optimize_bound_args": FAST} if method == "alpha-CROWN" else {}
    with torch.no_grad():
        lb, ub = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method=method, **kw)
    assert lb.shape == ub.shape == (3, 5) and (lb <= ub).all()
    assert_sound(model, x0, ptb, lb, ub, n_random=100, pgd_steps=20)


@pytest.mark.parametrize("name", list(MODELS))
def test_alpha_never_looser_than_crown_and_tightens_products(name):
    model, x0, ptb = _setup(name, torch.float64, math.inf, seed=1)
    net = BoundedModule(model, x0)
    x = BoundedTensor(x0, ptb)
    with torch.no_grad():
        lc, uc = net.compute_bounds(x=(x,), method="CROWN")
        la, ua = net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args={"iteration": 20})
    tol = 1e-9 * (lc.abs() + uc.abs() + 1)
    assert (la >= lc - tol).all() and (ua <= uc + tol).all()
    assert (la > lc + tol).any() or (ua < uc - tol).any()


def _ibp_of(model_fn, x0, ptb):
    class M(torch.nn.Module):
        def forward(self, x):
            return model_fn(x)
    net = BoundedModule(M(), x0)
    return net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="IBP")


def test_product_ibp_is_exact_on_a_box():
    """x * y on a box: the extreme corners; x * x: 0 where the box contains 0, else a square."""
    torch.manual_seed(0)
    x0 = torch.randn(4, 6, dtype=torch.float64)
    ptb = PerturbationLpNorm(eps=0.7)
    lb, ub = _ibp_of(lambda x: x[:, :3] * x[:, 3:], x0, ptb)
    l, u = x0 - 0.7, x0 + 0.7
    corners = torch.stack([l[:, :3] * l[:, 3:], l[:, :3] * u[:, 3:], u[:, :3] * l[:, 3:], u[:, :3] * u[:, 3:]])
    torch.testing.assert_close(lb, corners.min(0).values)
    torch.testing.assert_close(ub, corners.max(0).values)
    lb, ub = _ibp_of(lambda x: x * x, x0, ptb)
    torch.testing.assert_close(ub, torch.maximum(l * l, u * u))
    torch.testing.assert_close(lb, torch.where((l < 0) & (u > 0), torch.zeros_like(l), torch.minimum(l * l, u * u)))


def test_matmul_ibp_sums_exact_terms():
    """IBP of x @ y (both bounded): the sum over k of each term's exact interval, which the
    corners of each term attain (so it is the tightest interval of a sum of independent terms)."""
    torch.manual_seed(0)
    x0 = torch.randn(2, 12, dtype=torch.float64)
    ptb = PerturbationLpNorm(eps=0.5)
    lb, ub = _ibp_of(lambda x: x[:, :6].view(-1, 2, 3) @ x[:, 6:].view(-1, 3, 2), x0, ptb)
    l, u = x0 - 0.5, x0 + 0.5
    xl, xu, yl, yu = l[:, :6].view(-1, 2, 3, 1), u[:, :6].view(-1, 2, 3, 1), l[:, 6:].view(-1, 1, 3, 2), u[:, 6:].view(-1, 1, 3, 2)
    t = torch.stack(torch.broadcast_tensors(xl * yl, xl * yu, xu * yl, xu * yu))
    torch.testing.assert_close(lb.view(-1, 2, 2), t.min(0).values.sum(2))
    torch.testing.assert_close(ub.view(-1, 2, 2), t.max(0).values.sum(2))


def test_select_ops_ibp_is_exact():
    """Element picking moves intervals unchanged: the IBP of SelectOps' picked vector equals the
    same picks applied to the input box."""
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 4, dtype=torch.float64)
    ptb = PerturbationLpNorm(eps=0.3)

    def pick(h):
        return torch.cat([h[:, 1:3, ::2].flatten(1), h.narrow(2, 1, 2).select(1, 0),
                          h.flip(1).roll(1, dims=2).flatten(1), h.chunk(2, 1)[1].flatten(1)], 1)
    lb, ub = _ibp_of(pick, x0, ptb)
    torch.testing.assert_close(lb, pick(x0 - 0.3))
    torch.testing.assert_close(ub, pick(x0 + 0.3))


def test_einsum_rewrite_computes_einsum():
    torch.manual_seed(0)
    model = EinsumOps().double().eval()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    net = BoundedModule(model, x[:2])
    torch.testing.assert_close(net(x), model(x), rtol=1e-12, atol=1e-12)
