"""Batched PGD attack (Madry et al. 2018) in L∞ or L2 with random start and restarts, inside [0, 1]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["pgd_accuracy", "pgd_attack"]


def _norm_value(norm: float | str) -> float:
    n = str(norm).lower().lstrip("l")
    value = math.inf if n in ("inf", "infinity") else float(n)
    if value not in (math.inf, 2.0):
        raise ValueError(f"PGD supports norm inf or 2, got {norm!r}")
    return value


def _view(v: Tensor, x: Tensor) -> Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def _project(delta: Tensor, eps: float, norm: float) -> Tensor:
    if norm == math.inf:
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * _view((eps / n).clamp(max=1.0), delta)


def _random_start(x: Tensor, eps: float, norm: float) -> Tensor:
    if norm == math.inf:
        return torch.empty_like(x).uniform_(-eps, eps)
    d = torch.randn_like(x)
    d = d / _view(d.flatten(1).norm(dim=1).clamp_min(1e-12), x)
    r = torch.rand(x.shape[0], device=x.device, dtype=x.dtype) ** (1.0 / x[0].numel())  # uniform in the ball
    return d * _view(r * eps, x)


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: float | str = math.inf,
               steps: int = 10, step_size: float | None = None, restarts: int = 1, random_start: bool = True,
               x_min: float = 0.0, x_max: float = 1.0) -> Tensor:
    """Adversarial inputs within ``||x' - x||_norm <= eps`` and [x_min, x_max] maximising the CE loss.

    Per example, the first misclassified iterate over all restarts is kept (else the last one).
    ``step_size`` defaults to 2.5 * eps / steps.  Works under ``torch.no_grad`` / inference mode.
    """
    norm = _norm_value(norm)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got {steps}, {restarts}")
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()
        y = y.detach().clone()
        if eps == 0 or steps == 0:
            return x
        alpha = 2.5 * eps / steps if step_size is None else float(step_size)
        best = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(restarts):
            delta = _random_start(x, eps, norm) if random_start else torch.zeros_like(x)
            delta = (x + delta).clamp(x_min, x_max) - x
            for _ in range(steps):
                delta.requires_grad_(True)
                logits = model(x + delta)
                wrong = logits.argmax(1) != y
                new = wrong & ~found
                best[new] = (x + delta).detach()[new]
                found |= wrong
                loss = F.cross_entropy(logits, y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    if norm == math.inf:
                        step = alpha * grad.sign()
                    else:
                        step = alpha * grad / _view(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)
                    delta = _project(delta.detach() + step, eps, norm)
                    delta = (x + delta).clamp(x_min, x_max) - x
            with torch.no_grad():
                wrong = model(x + delta).argmax(1) != y
                new = wrong & ~found
                best[new] = (x + delta)[new]
                best[~found & ~wrong] = (x + delta)[~found & ~wrong]
                found |= wrong
            if bool(found.all()):
                break
        return best.detach()


def pgd_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float, **kwargs) -> Tensor:
    """Boolean (B,): correctly classified on the PGD adversarial input (see :func:`pgd_attack`)."""
    x_adv = pgd_attack(model, x, y, eps, **kwargs)
    with torch.no_grad():
        return model(x_adv).argmax(1) == y
