"""The engine's public walk interface (BoundState, prepare / interval_pass / output_bounds /
node_bounds, fixed intermediate bounds, strict options) that algorithms build on."""

import pytest
import torch
from torch import nn

from bound_checks import assert_sound
from certtrain.bounds import (AlphaCROWN, BoundedModule, BoundedTensor, BoundState, PerturbationLpNorm,
                              resolve_method)


def _net(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    x0 = torch.rand(2, 4, dtype=torch.float64)
    return model, x0


def test_the_walk_reproduces_compute_bounds():
    model, x0 = _net()
    net = BoundedModule(model, x0)
    x = BoundedTensor(x0, PerturbationLpNorm(eps=0.2))
    with torch.no_grad():
        ref = net.compute_bounds(x=(x,), method="CROWN")
        state = net.prepare((x,))
        assert isinstance(state, BoundState) and not state.intermediate()
        net.interval_pass(state, refine=True)
        lb, ub = net.output_bounds(state, None)
    assert torch.equal(lb, ref[0].view_as(lb)) and torch.equal(ub, ref[1].view_as(ub))
    # every node's bounds can be read back, in topological order
    names = list(state.intermediate())
    assert names[0] == net.input_names[0] and names[-1] == net.final_name
    # node_bounds of the output node itself: the same as the identity spec
    rows = torch.arange(3)
    with torch.no_grad():
        nl, nu = net.node_bounds(state, net.final_name, rows)
    assert torch.allclose(nl, lb) and torch.allclose(nu, ub)


def test_compute_bounds_is_reentrant():
    """A state holds everything of one computation: interleaving two computations (different
    inputs, perturbations and methods) gives each its own bounds."""
    model, x0 = _net(1)
    net = BoundedModule(model, x0)
    xa = BoundedTensor(x0, PerturbationLpNorm(eps=0.05))
    xb = BoundedTensor(torch.rand(3, 4, dtype=torch.float64), PerturbationLpNorm(eps=0.3, norm=2))
    with torch.no_grad():
        ref_a = net.compute_bounds(x=(xa,), method="CROWN")
        ref_b = net.compute_bounds(x=(xb,), method="CROWN-IBP")
        sa, sb = net.prepare((xa,)), net.prepare((xb,))
        net.interval_pass(sb, refine=False)
        net.interval_pass(sa, refine=True)
        a = net.output_bounds(sa, None)
        b = net.output_bounds(sb, None)
        # a nested call in the middle of another state's walk does not disturb it
        inner = net.compute_bounds(x=(xb,), method="IBP")
        a2 = net.output_bounds(sa, None)
    for got, ref in ((a, ref_a), (b, ref_b), (a2, ref_a)):
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert inner[0].shape == (3, 3)


def test_fixed_intermediate_bounds_split_a_relu():
    """Fixing a ReLU input's lower bound at 0 (the split "active") gives a bound of the sub-domain
    where that neuron is active: sound there, and at least as tight as without the split."""
    model, x0 = _net(2)
    x0 = x0[:1]
    net = BoundedModule(model, x0)
    ptb = PerturbationLpNorm(eps=0.3)
    x = BoundedTensor(x0, ptb)
    with torch.no_grad():
        lb, ub, state = net.compute_bounds(x=(x,), method="CROWN", return_state=True)
    pre = net.pre_activation_names()[0]
    lo, up = state.bounds(pre)
    unstable = ((lo < 0) & (up > 0)).flatten().nonzero().flatten()
    assert unstable.numel() > 0
    j = int(unstable[0])
    split_lo = lo.clone()
    split_lo[0, j] = 0.0
    with torch.no_grad():
        slb, sub, s2 = net.compute_bounds(x=(x,), method="CROWN", intermediate_bounds={pre: (split_lo, up)},
                                          return_state=True)
    assert (slb >= lb - 1e-12).all() and (sub <= ub + 1e-12).all() and s2.bounds(pre)[0][0, j] == 0
    # soundness on the sub-domain: sampled points of the box whose neuron j is active
    lo_box, hi_box = ptb.interval(x0)
    pts = lo_box + torch.rand(20000, 4, dtype=torch.float64) * (hi_box - lo_box)
    with torch.no_grad():
        keep = model[0](pts)[:, j] >= 0
        y = model(pts[keep])
    assert keep.any() and (y >= slb - 1e-9).all() and (y <= sub + 1e-9).all()
    with pytest.raises(ValueError, match="no graph node"):
        net.compute_bounds(x=(x,), method="CROWN", intermediate_bounds={"nope": (lo, up)})
    with pytest.raises(ValueError, match="shape"):
        net.compute_bounds(x=(x,), method="CROWN", intermediate_bounds={pre: (lo[:, :2], up)})


def test_engine_is_strict_about_options():
    model, x0 = _net()
    with pytest.raises(ValueError, match=r"unknown bound_opts key 'conv_mod'.*available: .*conv_mode"):
        BoundedModule(model, x0, bound_opts={"conv_mod": "matrix"})
    with pytest.raises(ValueError, match="memory_budget"):
        BoundedModule(model, x0, bound_opts={"memory_budget": -1})
    with pytest.raises(ValueError, match="ibp_compile"):
        BoundedModule(model, x0, bound_opts={"ibp_compile": "yes"})
    net = BoundedModule(model, x0)
    x = BoundedTensor(x0, PerturbationLpNorm(eps=0.1))
    with pytest.raises(TypeError, match="reuse_ibp"):
        net.compute_bounds(x=(x,), method="CROWN", reuse_ibp=True)
    with pytest.raises(ValueError, match="optimize_bound_args is for method 'alpha-CROWN'"):
        net.compute_bounds(x=(x,), method="CROWN", optimize_bound_args={"iteration": 3})


def test_method_registry_and_method_objects():
    assert {resolve_method(n) for n in ("ibp", "IBP")} == {"IBP"}
    assert {resolve_method(n) for n in ("crown_ibp", "CROWN-IBP", "IBP+backward", "crownibp")} == {"CROWN-IBP"}
    assert {resolve_method(n) for n in ("backward", "crown")} == {"CROWN"}
    assert {resolve_method(n) for n in ("alpha_crown", "CROWN-Optimized", "α-CROWN")} == {"alpha-CROWN"}
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        resolve_method("magic")
    with pytest.raises(ValueError, match="AlphaCROWN.lr_alpha"):
        AlphaCROWN(lr_alpha=-1)
    model, x0 = _net(3)
    net = BoundedModule(model, x0)
    x = BoundedTensor(x0, PerturbationLpNorm(eps=0.2))
    with torch.no_grad():
        by_obj = net.compute_bounds(x=(x,), method=AlphaCROWN(iteration=4, lr_alpha=0.2))
        by_name = net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args={"iteration": 4, "lr_alpha": 0.2})
        crown = net.compute_bounds(x=(x,), method="CROWN")
    assert torch.equal(by_obj[0], by_name[0]) and (by_obj[0] >= crown[0] - 1e-12).all()
    assert_sound(model, x0, PerturbationLpNorm(eps=0.2), *by_obj)
