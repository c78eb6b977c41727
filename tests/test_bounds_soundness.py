"""Soundness: every point of the perturbation set (random points, corners, PGD attacks that push
each output up and down) gives outputs inside [lb, ub], for every op, method, norm and dtype."""
import math

import pytest
import torch

from bound_checks import assert_sound
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm
from op_models import ActivationsMLP, ExpLogMLP, OpsCNN, TrainBNResNet, randomize_bn

METHODS = ["IBP", "CROWN-IBP", "CROWN"]
DTYPES = [torch.float32, torch.float64]


def _model(name, dtype, seed=0):
    torch.manual_seed(seed)
    if name == "mlp":
        m, shape = ActivationsMLP(), (2, 4, 4)
    elif name == "explog":
        m, shape = ExpLogMLP(), (2, 4, 4)
    elif name == "cnn":
        m, shape = OpsCNN(), (2, 16, 16)
    else:
        m, shape = TrainBNResNet(), (2, 8, 8)
    m = randomize_bn(m, seed).to(dtype)
    m.train(name == "resnet_trainbn")
    if name == "resnet_trainbn":
        for mod in m.modules():  # BN in training mode; nothing else is stochastic
            mod.training = isinstance(mod, torch.nn.BatchNorm2d) or mod is m
    x0 = torch.rand(3, *shape, dtype=dtype)
    return m, x0


def _frozen_bn(model, x0):
    """A copy of the model whose training-mode BN uses the statistics of the clean batch x0
    (what the bound treats as constants) for any input, so points can be checked one by one."""
    import copy
    m = copy.deepcopy(model)
    stats = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, k=k: stats.__setitem__(k, (
        i[0].mean((0, 2, 3)), i[0].var((0, 2, 3), unbiased=False))))
        for k, mod in m.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        m(x0)
    for h in hooks:
        h.remove()
    for k, mod in m.named_modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(stats[k][0])
            mod.running_var.copy_(stats[k][1])
            mod.eval()
    return m


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("norm", [math.inf, 2, 1], ids=["linf", "l2", "l1"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp", "explog", "cnn", "resnet_trainbn"])
def test_sound(name, method, norm, dtype):
    model, x0 = _model(name, dtype)
    eps = {math.inf: 0.05, 2: 0.3, 1: 0.6}[norm]
    net = BoundedModule(model, x0)
    kw = dict(x_L=0.0, x_U=1.0) if norm == math.inf else {}
    ptb = PerturbationLpNorm(norm=norm, eps=eps, **kw)
    lb, ub = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method=method)
    assert lb.shape == ub.shape == (3, 5)
    assert (lb <= ub).all()
    check = _frozen_bn(model, x0) if name == "resnet_trainbn" else model.eval()
    assert_sound(check, x0, ptb, lb, ub, n_random=100, pgd_steps=20)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("method", METHODS)
def test_sound_with_spec_and_elementwise_eps(method, dtype):
    """Margin specifications C and a per-pixel eps tensor."""
    model, x0 = _model("cnn", dtype, seed=1)
    model.eval()
    y = torch.tensor([0, 3, 1])
    C = torch.eye(5, dtype=dtype)[y].unsqueeze(1) - torch.eye(5, dtype=dtype).unsqueeze(0)
    C = C[torch.arange(5)[None] != y[:, None]].view(3, 4, 5)
    eps = torch.rand(1, *x0.shape[1:], dtype=dtype) * 0.08
    ptb = PerturbationLpNorm(norm=math.inf, eps=eps, x_L=0.0, x_U=1.0)
    net = BoundedModule(model, x0)
    lb, ub = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method=method, C=C)
    assert lb.shape == (3, 4)
    assert_sound(model, x0, ptb, lb, ub, C=C, n_random=100, pgd_steps=20)


@pytest.mark.parametrize("relu", ["adaptive", "same-slope", "zero"])
@pytest.mark.parametrize("conv_mode", ["patches", "matrix"])
def test_sound_options(relu, conv_mode):
    model, x0 = _model("cnn", torch.float64, seed=2)
    model.eval()
    net = BoundedModule(model, x0, bound_opts={"relu": relu, "conv_mode": conv_mode})
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.04)
    lb, ub = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="CROWN")
    assert_sound(model, x0, ptb, lb, ub, n_random=100, pgd_steps=20)


def test_tightness_order():
    """CROWN is at least as tight as CROWN-IBP on average, which beats plain IBP."""
    model, x0 = _model("mlp", torch.float64, seed=3)
    model.eval()
    net = BoundedModule(model, x0)
    x = BoundedTensor(x0, PerturbationLpNorm(norm=math.inf, eps=0.05))
    width = {m: (lambda b: (b[1] - b[0]).mean().item())(net.compute_bounds(x=(x,), method=m))
             for m in METHODS}
    assert width["CROWN"] <= width["CROWN-IBP"] <= width["IBP"]
