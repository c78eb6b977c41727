"""Loss fusion: the upper bound of the fused cross-entropy is a valid upper bound of the loss at
every point of the perturbation set (random points, corners, PGD on the loss), for every method."""
import math

import pytest
import torch
import torch.nn.functional as F

from bound_checks import random_points, project
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm
from certtrain.loss_fusion import CrossEntropyBound, one_hot
from certtrain.losses import margin_spec, robust_ce
from op_models import OpsCNN, randomize_bn


def _setup(dtype, k=5):
    torch.manual_seed(0)
    model = randomize_bn(OpsCNN(out=k)).to(dtype).eval()
    x0 = torch.rand(4, 2, 16, 16, dtype=dtype)
    y = torch.tensor([0, 1, 2, 4])
    return model, x0, y


def _worst_losses(model, x0, y, ptb, steps=25):
    """CE at random points, corners and after PGD ascent on the loss: (n, B)."""
    out = []
    with torch.no_grad():
        for corners in (False, True):
            xs = random_points(x0, ptb, 64, corners)
            z = model(xs.flatten(0, 1)).view(64, x0.shape[0], -1)
            out.append(torch.stack([F.cross_entropy(zz, y, reduction="none") for zz in z]))
    x = random_points(x0, ptb, 4, False).clone()
    for t in range(steps):
        x.requires_grad_(True)
        z = model(x.flatten(0, 1))
        loss = F.cross_entropy(z, y.repeat(4), reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = x + (0.5 if t < steps // 2 else 0.1) * ptb.eps * g.sign()
            x = torch.stack([project(xi, x0, ptb) for xi in x])
    with torch.no_grad():
        z = model(x.flatten(0, 1)).view(4, x0.shape[0], -1)
        out.append(torch.stack([F.cross_entropy(zz, y, reduction="none") for zz in z]))
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "CROWN"])
def test_fused_loss_bound_is_sound(method, dtype):
    model, x0, y = _setup(dtype)
    fused = CrossEntropyBound(model)
    oh = one_hot(y, 5, x0)
    net = BoundedModule(fused, (x0, oh))
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.03, x_L=0.0, x_U=1.0)
    lb, ub = net.compute_bounds(x=(BoundedTensor(x0, ptb), oh), method=method)
    assert ub.shape == (4, 1)
    losses = _worst_losses(model, x0, y, ptb)
    tol = 64 * torch.finfo(dtype).eps * (1 + ub.abs())
    assert (losses <= ub.T + tol.T).all(), (losses.max(0).values, ub.squeeze(1))
    assert (losses >= lb.T - tol.T).all()
    clean = F.cross_entropy(model(x0), y, reduction="none")
    assert (clean <= ub.squeeze(1) + tol.squeeze(1)).all()


def test_fused_bound_is_comparable_to_unfused():
    """Both are upper bounds of the worst-case loss; CROWN-IBP fused should not be far looser
    than CE of the margin lower bounds, and stays finite for large margins (no overflow)."""
    model, x0, y = _setup(torch.float32)
    oh = one_hot(y, 5, x0)
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.03, x_L=0.0, x_U=1.0)
    fused = BoundedModule(CrossEntropyBound(model), (x0, oh))
    _, ub = fused.compute_bounds(x=(BoundedTensor(x0, ptb), oh), method="CROWN-IBP", bound_lower=False)
    plain = BoundedModule(model, x0)
    lb, _ = plain.compute_bounds(x=(BoundedTensor(x0, ptb),), C=margin_spec(y, 5).to(x0), method="CROWN-IBP",
                                 bound_upper=False)
    unfused = robust_ce(lb) if robust_ce(lb).dim() == 0 else robust_ce(lb).mean()
    assert torch.isfinite(ub).all()
    assert ub.mean() <= 1.5 * unfused + 1.0
    big = BoundedTensor(x0, PerturbationLpNorm(norm=math.inf, eps=5.0))
    _, ub_big = fused.compute_bounds(x=(big, oh), method="CROWN-IBP", bound_lower=False)
    assert torch.isfinite(ub_big).all()
