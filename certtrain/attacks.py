"""Adversarial attacks for training and evaluation: batched PGD (Madry et al. 2018) and FGSM
(Goodfellow et al. 2015) in L∞ or L2, inside [x_min, x_max], with random start, restarts, a
step-size decay (Müller et al. 2023) and a choice of loss (cross-entropy or margin).

Evaluation wants the first misclassified point (``select="first_wrong"``); training wants the
point of highest loss (``select="max_loss"``) or simply the last iterate (``select="last"``).
:class:`AttackConfig` is the attack of a training method (``method.attack`` in the config), with
its step size given in units of ε.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ATTACK_LOSSES", "SELECTIONS", "AttackConfig", "attack_loss", "eval_mode", "fgsm_attack", "l0_accuracy",
           "l0_attack", "pgd_accuracy", "pgd_attack", "per_example_logits", "weight_pgd_accuracy", "weight_pgd_attack"]

ATTACK_LOSSES = ("ce", "margin")
SELECTIONS = ("first_wrong", "max_loss", "last")


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


def attack_loss(logits: Tensor, y: Tensor, loss: str = "ce") -> Tensor:
    """Per-example loss (B,) that the attack maximises: ``ce`` (cross-entropy) or ``margin``
    (max_{j != y} z_j - z_y, Carlini & Wagner 2017: positive iff misclassified)."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "margin":
        z_y = logits.gather(1, y.view(-1, 1)).squeeze(1)
        others = logits.scatter(1, y.view(-1, 1), float("-inf"))
        return others.max(1).values - z_y
    raise ValueError(f"unknown attack loss {loss!r}; available: {', '.join(ATTACK_LOSSES)}")


def _decay_steps(steps: int, step_decay: Sequence[float]) -> list[int]:
    """Steps (0-based) from which the step size is multiplied by the decay factor once more:
    ceil(f * steps) for each fraction f (Müller et al. 2023 use 0.5, 0.8, 0.9)."""
    return sorted(math.ceil(float(f) * steps) for f in step_decay)


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: float | str = math.inf,
               steps: int = 10, step_size: float | None = None, restarts: int = 1, random_start: bool = True,
               x_min: float = 0.0, x_max: float = 1.0, loss: str = "ce", select: str = "first_wrong",
               step_decay: Sequence[float] = (), decay_factor: float = 0.1) -> Tensor:
    """Adversarial inputs within ``||x' - x||_norm <= eps`` and [x_min, x_max] maximising ``loss``.

    ``select``: ``first_wrong`` keeps, per example, the first misclassified iterate over all restarts
    (else the last one); ``max_loss`` the iterate of highest loss over all steps and restarts;
    ``last`` the final iterate of the last restart.  ``step_size`` (absolute) defaults to
    2.5 * eps / steps; it is multiplied by ``decay_factor`` from each step ceil(f * steps), f in
    ``step_decay``.  Works under ``torch.no_grad`` / inference mode; parameter gradients are untouched.
    """
    norm = _norm_value(norm)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got {steps}, {restarts}")
    if select not in SELECTIONS:
        raise ValueError(f"unknown select {select!r}; available: {', '.join(SELECTIONS)}")
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; available: {', '.join(ATTACK_LOSSES)}")
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()
        y = y.detach().clone()
        if eps == 0 or steps == 0:
            return x
        alpha = 2.5 * eps / steps if step_size is None else float(step_size)
        decay_at = _decay_steps(steps, step_decay)
        best = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        best_loss = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=x.dtype)

        def keep(point: Tensor, logits: Tensor, value: Tensor) -> None:
            nonlocal found
            if select == "max_loss":
                better = value > best_loss
                best[better] = point[better]
                best_loss[better] = value[better]
                return
            wrong = logits.argmax(1) != y
            new = wrong & ~found
            best[new] = point[new]
            found |= wrong

        for _ in range(restarts):
            delta = _random_start(x, eps, norm) if random_start else torch.zeros_like(x)
            delta = (x + delta).clamp(x_min, x_max) - x
            for i in range(steps):
                delta.requires_grad_(True)
                logits = model(x + delta)
                value = attack_loss(logits, y, loss)
                keep((x + delta).detach(), logits.detach(), value.detach())
                (grad,) = torch.autograd.grad(value.sum(), delta)
                with torch.no_grad():
                    a = alpha * decay_factor ** sum(i >= s for s in decay_at)
                    if norm == math.inf:
                        step = a * grad.sign()
                    else:
                        step = a * grad / _view(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)
                    delta = _project(delta.detach() + step, eps, norm)
                    delta = (x + delta).clamp(x_min, x_max) - x
            with torch.no_grad():
                last = x + delta
                if select == "last":
                    best = last
                    continue
                logits = model(last)
                keep(last, logits, attack_loss(logits, y, loss))
                if select == "first_wrong":
                    best[~found] = last[~found]
            if select == "first_wrong" and bool(found.all()):
                break
        return best.detach()


def fgsm_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: float | str = math.inf,
                step_size: float | None = None, random_start: bool = False, x_min: float = 0.0,
                x_max: float = 1.0, loss: str = "ce", select: str = "last") -> Tensor:
    """FGSM (Goodfellow et al. 2015): one signed-gradient step of size ``step_size`` (default eps).
    With ``random_start=True`` and ``step_size=1.25 * eps`` it is FGSM-RS (Wong et al. 2020)."""
    return pgd_attack(model, x, y, eps, norm=norm, steps=1, step_size=eps if step_size is None else step_size,
                      restarts=1, random_start=random_start, x_min=x_min, x_max=x_max, loss=loss, select=select)


def pgd_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float, **kwargs: Any) -> Tensor:
    """Boolean (B,): correctly classified on the PGD adversarial input (see :func:`pgd_attack`)."""
    x_adv = pgd_attack(model, x, y, eps, **kwargs)
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (BatchNorm with running statistics, no statistic updates), then
    restore every submodule's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass(frozen=True)
class AttackConfig:
    """The attack of a training method (``method.attack``): ``steps`` PGD steps (1 with
    ``random_start=false`` is FGSM) of ``step_size`` × ε, decayed by ``decay_factor`` at the
    fractions ``step_decay`` of the steps; ``restarts``; ``loss`` ce | margin; ``select``
    max_loss | last | first_wrong; ``bn_eval``: attack with BatchNorm in eval mode (as Müller et
    al. 2023 and De Palma et al. 2024), so the attack neither uses nor changes batch statistics."""

    steps: int = 10
    step_size: float = 0.25
    restarts: int = 1
    random_start: bool = True
    loss: str = "ce"
    select: str = "max_loss"
    step_decay: tuple[float, ...] = field(default_factory=tuple)
    decay_factor: float = 0.1
    bn_eval: bool = True

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None, where: str = "method.attack",
                     defaults: Mapping[str, Any] | None = None) -> AttackConfig:
        """Validated config from a mapping (unknown keys and bad values: ValueError naming ``where.key``)."""
        known = {f for f in cls.__dataclass_fields__}
        opts = dict(defaults or {})
        for k, v in dict(options or {}).items():
            if k not in known:
                raise ValueError(f"unknown option {where}.{k}; available: {', '.join(sorted(known))}")
            opts[k] = v

        def integer(key: str, minimum: int) -> int:
            v = opts.get(key, getattr(cls, key))
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < minimum:
                raise ValueError(f"{where}.{key} must be an integer >= {minimum}, got {v!r}")
            return int(v)

        def number(key: str, low: float, high: float = math.inf, low_open: bool = False) -> float:
            v = opts.get(key, getattr(cls, key))
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) \
                and (float(v) > low if low_open else float(v) >= low) and float(v) <= high
            if not ok:
                bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
                raise ValueError(f"{where}.{key} must be a number {bound}, got {v!r}")
            return float(v)

        def boolean(key: str) -> bool:
            v = opts.get(key, getattr(cls, key))
            if not isinstance(v, bool):
                raise ValueError(f"{where}.{key} must be true or false, got {v!r}")
            return v

        def choice(key: str, choices: Sequence[str]) -> str:
            v = opts.get(key, getattr(cls, key))
            if v not in choices:
                raise ValueError(f"{where}.{key} must be one of {', '.join(choices)}, got {v!r}")
            return str(v)

        decay = opts.get("step_decay", ())
        decay = () if decay is None else decay
        if isinstance(decay, (str, bytes)) or not isinstance(decay, Sequence) or not all(
                isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < float(f) <= 1 for f in decay):
            raise ValueError(f"{where}.step_decay must be a list of fractions of the steps in (0, 1], got {decay!r}")
        return cls(steps=integer("steps", 0), step_size=number("step_size", 0.0, low_open=True),
                   restarts=integer("restarts", 1), random_start=boolean("random_start"),
                   loss=choice("loss", ATTACK_LOSSES), select=choice("select", SELECTIONS),
                   step_decay=tuple(float(f) for f in decay), decay_factor=number("decay_factor", 0.0, 1.0, True),
                   bn_eval=boolean("bn_eval"))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["step_decay"] = list(self.step_decay)
        return d

    def run(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: float | str = math.inf,
            x_min: float = 0.0, x_max: float = 1.0) -> Tensor:
        """Adversarial points of ``model`` in the ε-ball around x within [x_min, x_max] (detached)."""
        kwargs = dict(norm=norm, steps=self.steps, step_size=self.step_size * eps, restarts=self.restarts,
                      random_start=self.random_start, x_min=x_min, x_max=x_max, loss=self.loss,
                      select=self.select, step_decay=self.step_decay, decay_factor=self.decay_factor)
        if self.bn_eval:
            with eval_mode(model):
                return pgd_attack(model, x, y, eps, **kwargs)
        return pgd_attack(model, x, y, eps, **kwargs)


# ----------------------------------------------------------------------------- L0 and weight attacks
class _Best:
    """Per example, the first misclassified point seen, else the one of highest loss."""

    def __init__(self, start: dict[str, Tensor], y: Tensor):
        self.points = {n: t.detach().clone() for n, t in start.items()}
        self.y = y
        self.found = torch.zeros(len(y), dtype=torch.bool, device=y.device)
        self.loss = torch.full((len(y),), -math.inf, device=y.device)

    def keep(self, points: dict[str, Tensor], logits: Tensor, value: Tensor) -> None:
        with torch.no_grad():
            wrong = logits.argmax(1) != self.y
            take = (wrong & ~self.found) | (~self.found & ~wrong & (value.to(self.loss.dtype) > self.loss))
            for n, t in points.items():
                self.points[n][take] = t.detach()[take]
            self.loss = torch.where(take, value.detach().to(self.loss.dtype), self.loss)
            self.found |= wrong


def _domain(v: Any, x: Tensor) -> Tensor:
    return torch.as_tensor(v, dtype=x.dtype, device=x.device).expand_as(x).reshape(x.shape[0], -1)


def l0_attack(model: nn.Module, x: Tensor, y: Tensor, k: int, x_min: Any = 0.0, x_max: Any = 1.0, steps: int = 10,
              restarts: int = 1, loss: str = "margin") -> Tensor:
    """Inputs with at most ``k`` coordinates of each example changed, each within [x_min, x_max]
    (scalars or tensors broadcastable to x), maximising ``loss``: the first misclassified iterate per
    example, else the one of highest loss.

    Each step moves to the maximiser over the L0 set of the loss linearised at the current point
    (every coordinate at its better end of the domain, the k largest gains: exact for a linear
    model).  The first restart picks its k coordinates greedily (in up to 8 rounds, the gradient
    recomputed after each), later ones start from k random coordinates at random ends."""
    if isinstance(k, bool) or not float(k).is_integer() or k < 0:
        raise ValueError(f"k must be an integer >= 0 (coordinates changed), got {k!r}")
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got {steps}, {restarts}")
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; available: {', '.join(ATTACK_LOSSES)}")
    with torch.inference_mode(False), torch.enable_grad():
        x, y = x.detach().clone(), y.detach().clone()
        lo, hi = _domain(x_min, x).clone(), _domain(x_max, x).clone()
        x0 = x.reshape(x.shape[0], -1)
        if bool((x0 < lo).any() or (x0 > hi).any()):
            raise ValueError("l0_attack: the clean input lies outside [x_min, x_max]; give the data's own range")
        k = min(int(k), x0.shape[1])
        if k == 0 or steps == 0:
            return x
        best = _Best({"x": x0}, y)

        def grad_at(point: Tensor) -> Tensor:
            point = point.detach().requires_grad_(True)
            logits = model(point.view_as(x))
            value = attack_loss(logits, y, loss)
            best.keep({"x": point}, logits, value)
            return torch.autograd.grad(value.sum(), point)[0]

        def move(g: Tensor, base: Tensor, m: int, blocked: Tensor | None = None) -> tuple[Tensor, Tensor]:
            """``base`` with the m coordinates of largest linearised gain (gradient g) at their better end."""
            up, dn = g * (hi - base), g * (lo - base)
            gain, to_hi = torch.maximum(up, dn), up >= dn
            if blocked is not None:
                gain = gain.masked_fill(blocked, -math.inf)
            pick = gain.topk(m, dim=1).indices
            return base.scatter(1, pick, torch.where(to_hi, hi, lo).gather(1, pick)), pick

        for r in range(restarts):
            if r == 0:  # greedy: a few coordinates per round
                cur, chosen, done = x0.clone(), torch.zeros_like(x0, dtype=torch.bool), 0
                rounds = min(k, 8)
                for j in range(rounds):
                    m = math.ceil((k - done) / (rounds - j))
                    cur, pick = move(grad_at(cur), cur, m, chosen)
                    chosen.scatter_(1, pick, True)
                    done += m
            else:
                pick = torch.rand(x0.shape, device=x.device).argsort(1)[:, :k]
                ends = torch.rand(pick.shape, device=x.device) > 0.5
                cur = x0.scatter(1, pick, torch.where(ends, hi.gather(1, pick), lo.gather(1, pick)))
            for _ in range(steps):
                cur, _ = move(grad_at(cur), x0, k)
            with torch.no_grad():
                logits = model(cur.view_as(x))
                best.keep({"x": cur}, logits, attack_loss(logits, y, loss))
            if bool(best.found.all()):
                break
        return best.points["x"].view_as(x).detach()


def l0_accuracy(model: nn.Module, x: Tensor, y: Tensor, k: int, **kwargs: Any) -> Tensor:
    """Boolean (B,): correctly classified at the L0 attack's point (see :func:`l0_attack`)."""
    x_adv = l0_attack(model, x, y, k, **kwargs)
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def per_example_logits(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Logits (B, K) of ``model`` on each example x[b] with the parameters ``params[name][b]`` (the
    other parameters: the model's own), by ``torch.func.vmap``."""
    from torch.func import functional_call, vmap

    def one(p: dict[str, Tensor], xb: Tensor) -> Tensor:
        return functional_call(model, p, (xb.unsqueeze(0),)).squeeze(0)

    return vmap(one)(dict(params), x)


#: the weight attack projects onto a ball this much smaller (relative), so that rounding w0 + δ stays inside
_WEIGHT_SHRINK = 1e-4


def weight_pgd_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, params: Sequence[str],
                      norm: float | str = 2, steps: int = 20, step_size: float | None = None, restarts: int = 1,
                      random_start: bool = True, loss: str = "margin") -> dict[str, Tensor]:
    """Per example b, values of the parameters ``params`` (names in ``model``), each within its own
    ball ``||w - w0||_norm <= eps`` (norm inf or 2), that misclassify x[b]: PGD on the parameters
    (BatchNorm in eval mode), the first misclassifying iterate, else the one of highest ``loss``.

    Returns {name: (B, *shape)}.  ``step_size`` (absolute) defaults to 2.5 * eps / steps."""
    norm = _norm_value(norm)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got {steps}, {restarts}")
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; available: {', '.join(ATTACK_LOSSES)}")
    named = dict(model.named_parameters())
    missing = [n for n in params if n not in named]
    if missing or not params:
        raise ValueError(f"weight_pgd_attack: no parameter(s) {missing or list(params)} in the model; "
                         f"available: {', '.join(named)}")
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
        x, y = x.detach().clone(), y.detach().clone()
        B = x.shape[0]
        w0 = {n: named[n].detach() for n in params}
        best = _Best({n: w.expand(B, *w.shape) for n, w in w0.items()}, y)
        if eps == 0 or steps == 0:
            return best.points
        radius = eps * (1 - _WEIGHT_SHRINK)
        alpha = 2.5 * eps / steps if step_size is None else float(step_size)
        for _ in range(restarts):
            delta = {n: (_random_start(w.expand(B, *w.shape), radius, norm) if random_start
                         else torch.zeros(B, *w.shape, dtype=w.dtype, device=w.device)) for n, w in w0.items()}
            for i in range(steps + 1):
                w = {n: (w0[n] + d).requires_grad_(i < steps) for n, d in delta.items()}
                logits = per_example_logits(model, w, x)
                value = attack_loss(logits, y, loss)
                best.keep(w, logits, value)
                if i == steps:
                    break
                grads = torch.autograd.grad(value.sum(), list(w.values()))
                with torch.no_grad():
                    for (n, d), g in zip(delta.items(), grads):
                        if norm == math.inf:
                            step = alpha * g.sign()
                        else:
                            step = alpha * g / _view(g.flatten(1).norm(dim=1).clamp_min(1e-12), g)
                        delta[n] = _project(d + step, radius, norm)
            if bool(best.found.all()):
                break
        return {n: t.detach() for n, t in best.points.items()}


def weight_pgd_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float, params: Sequence[str],
                        **kwargs: Any) -> Tensor:
    """Boolean (B,): x[b] is correctly classified with the weights the attack found for it
    (:func:`weight_pgd_attack`)."""
    w = weight_pgd_attack(model, x, y, eps, params, **kwargs)
    with torch.no_grad(), torch.inference_mode(False), eval_mode(model):
        return per_example_logits(model, w, x.detach().clone()).argmax(1) == y
