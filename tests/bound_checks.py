"""Shared soundness checks: points of the perturbation set (random, corners, PGD attacks) must
give outputs inside the computed bounds."""
from __future__ import annotations

import math

import torch

from certtrain.bounds import PerturbationL0Norm, PerturbationLpNorm


def tolerance(lb: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
    """A few ulps of the bound's magnitude (rounding in the forward pass and in the bounds)."""
    fin = lambda t: torch.where(torch.isfinite(t), t.abs(), torch.zeros_like(t))  # noqa: E731 (an infinite side must not widen the other's)
    scale = torch.maximum(fin(lb), fin(ub)) + 1
    return 64 * torch.finfo(lb.dtype).eps * scale


def project(x: torch.Tensor, x0: torch.Tensor, ptb: PerturbationLpNorm) -> torch.Tensor:
    """Bring x back into the perturbation set (a feasible point; exact projection for L-inf)."""
    if ptb.norm == math.inf:
        lo, hi = ptb.interval(x0)
        return torch.maximum(torch.minimum(x, hi), lo)
    d = x - x0
    k = x0.dim() - 1  # per-example dims
    flat = d.flatten(d.dim() - k)
    n = flat.norm(p=ptb.norm, dim=-1, keepdim=True).clamp(min=1e-30)
    eps = torch.as_tensor(ptb.eps, dtype=x.dtype)
    eps = eps.reshape(-1, 1) if eps.dim() else eps  # one radius per example
    flat = flat * torch.clamp(eps / n, max=1.0) * (1 - 4 * torch.finfo(x.dtype).eps)
    x = x0 + flat.view_as(d)
    # A domain clamp moves every coordinate towards x0 (x0 is inside it): the norm only shrinks.
    if ptb.x_L is not None:
        x = torch.maximum(x, torch.as_tensor(ptb.x_L, dtype=x.dtype))
    if ptb.x_U is not None:
        x = torch.minimum(x, torch.as_tensor(ptb.x_U, dtype=x.dtype))
    return x


def _l0_set(x0, ptb, xs, pick, values):
    """Points of an L0 set: x0 with the coordinates ``pick`` (n, B, k) replaced by ``values``."""
    flat = xs.flatten(2).clone()
    return flat.scatter(-1, pick, values).view_as(xs)


def _l0_random(x0, ptb, n, corners):
    xs = x0.unsqueeze(0).expand(n, *x0.shape)
    lo, hi = (t.unsqueeze(0).expand_as(xs).flatten(2) for t in ptb.interval(x0)) if ptb.eps else (None, None)
    m = xs[0, 0].numel()
    k = min(ptb.eps, m)
    if k == 0:
        return xs.clone()
    pick = torch.rand(n, x0.shape[0], m).argsort(-1)[..., :k]
    u = (torch.rand(pick.shape) > 0.5).to(x0.dtype) if corners else torch.rand(pick.shape, dtype=x0.dtype)
    l_, h_ = lo.gather(-1, pick), hi.gather(-1, pick)
    return _l0_set(x0, ptb, xs, pick, l_ + u * (h_ - l_))


def _objective_grad(model, x, x0, C, n_out, sign, which):
    """Gradient at points x (2 n_out, B, ...) of the attack objective: output (or spec row) which[k]
    pushed in direction sign[k] by the k-th copy of the batch."""
    x.requires_grad_(True)
    y = model(x.flatten(0, 1)).flatten(1).view(2 * n_out, x0.shape[0], -1)
    if C is not None:
        y = torch.einsum("bsn,kbn->kbs", C, y)
    obj = (y[torch.arange(2 * n_out), :, which] * sign[:, None]).sum()
    return torch.autograd.grad(obj, x)[0]


def _l0_attack(model, x0, ptb, C, steps, n_out, sign, which):
    """Greedy first-order attack on an L0 set: move the k coordinates with the largest linearized
    gain to the better end of their domain, from the last point's gradient."""
    x = _l0_random(x0, ptb, 2 * n_out, corners=True)
    if ptb.eps == 0:
        return x
    lo, hi = (t.unsqueeze(0).expand_as(x).flatten(2) for t in ptb.interval(x0))
    base = x0.unsqueeze(0).expand_as(x).flatten(2)
    k = min(ptb.eps, base.shape[-1])
    for _ in range(steps):
        g = _objective_grad(model, x, x0, C, n_out, sign, which)
        with torch.no_grad():
            g = g.flatten(2)
            gu, gl = g * (hi - base), g * (lo - base)
            gain, to_hi = torch.maximum(gu, gl), gu >= gl
            pick = gain.topk(k, dim=-1).indices
            vals = torch.where(to_hi, hi, lo).gather(-1, pick)
            x = base.clone().scatter(-1, pick, vals).view_as(x)
    return x.detach()


def random_points(x0, ptb, n: int, corners: bool) -> torch.Tensor:
    """n points of the set per example: (n, B, *shape)."""
    if isinstance(ptb, PerturbationL0Norm):
        return _l0_random(x0, ptb, n, corners)
    xs = x0.unsqueeze(0).expand(n, *x0.shape)
    if ptb.norm == math.inf:
        lo, hi = ptb.interval(x0)
        if corners:
            u = (torch.rand_like(xs) > 0.5).to(x0.dtype)
        else:
            u = torch.rand_like(xs)
        return lo + u * (hi - lo)
    d = torch.randn_like(xs)
    if ptb.norm == 1:
        d = d.sign() * torch.distributions.Exponential(1.0).sample(d.shape).to(x0.dtype)
        if corners:  # vertices of the L1 ball: one coordinate at +-eps
            flat = d.flatten(2)
            k = flat.abs().argmax(-1, keepdim=True)
            d = torch.zeros_like(flat).scatter(-1, k, flat.gather(-1, k).sign()).view_as(d)
    d = d / d.flatten(2).norm(p=ptb.norm, dim=-1).view(n, -1, *([1] * (x0.dim() - 1)))
    r = torch.ones(n, x0.shape[0], *([1] * (x0.dim() - 1)), dtype=x0.dtype) if corners else \
        torch.rand(n, x0.shape[0], *([1] * (x0.dim() - 1)), dtype=x0.dtype)
    eps = torch.as_tensor(ptb.eps, dtype=x0.dtype)
    if eps.dim():  # one radius per example
        eps = eps.reshape(-1, *([1] * (x0.dim() - 1)))
    return project(xs + r * eps * d, x0, ptb)


def pgd_extremes(model, x0, ptb, C=None, steps: int = 25, return_points: bool = False):
    """For every output (or spec row) j, PGD pushes it up and down: returns the outputs of all
    attacked points, (2 * n_out, B, n_out) (and the points, with ``return_points``)."""
    with torch.no_grad():
        y0 = model(x0).flatten(1)
        if C is not None:
            y0 = torch.bmm(C, y0.unsqueeze(-1)).squeeze(-1)
    n_out = y0.shape[1]
    sign = torch.cat([torch.ones(n_out), -torch.ones(n_out)]).to(x0.dtype)
    which = torch.cat([torch.arange(n_out), torch.arange(n_out)])
    if isinstance(ptb, PerturbationL0Norm):
        x = _l0_attack(model, x0, ptb, C, steps, n_out, sign, which)
        steps = 0
    else:
        x = random_points(x0, ptb, 2 * n_out, corners=False).clone()
    eps = float(torch.as_tensor(ptb.eps).max())
    for t in range(steps):
        g = _objective_grad(model, x, x0, C, n_out, sign, which)
        step = eps * (0.5 if t < steps // 2 else 0.1)
        with torch.no_grad():
            if ptb.norm == math.inf:
                x = x + step * g.sign()
            else:
                gn = g.flatten(2).norm(p=2, dim=-1).clamp(min=1e-30)
                x = x + step * g / gn.view(*gn.shape, *([1] * (x0.dim() - 1)))
            x = project(x.flatten(0, 1), x0.repeat(2 * n_out, *([1] * (x0.dim() - 1))),
                        _repeat_ptb(ptb, 2 * n_out)).view_as(x)
    with torch.no_grad():
        y = model(x.flatten(0, 1)).flatten(1).view(2 * n_out, x0.shape[0], -1)
        if C is not None:
            y = torch.einsum("bsn,kbn->kbs", C, y)
    return (y, x) if return_points else y


def _outputs(model, xs, C):
    """Outputs (or spec values) of points xs (k, B, *shape): (k, B, n)."""
    y = model(xs.flatten(0, 1)).flatten(1).view(xs.shape[0], xs.shape[1], -1)
    return torch.einsum("bsn,kbn->kbs", C.to(y.dtype), y) if C is not None else y


def _repeat_ptb(ptb, k):
    def rep(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > 1:
            return v.repeat(k, *([1] * (v.dim() - 1)))
        return v
    return PerturbationLpNorm(eps=rep(ptb.eps), norm=ptb.norm, x_L=rep(ptb.x_L), x_U=rep(ptb.x_U))


def assert_sound(model, x0, ptb, lb, ub, C=None, n_random: int = 200, pgd_steps: int = 25,
                 rounding_scale: float = 0.0, reference=None):
    """Raise AssertionError with the worst violation if any tested point leaves [lb, ub].

    ``rounding_scale``: the magnitude of the largest intermediate term of the computation (see
    `rounding_scale`), for models whose rounding error exceeds the outputs' own ulps.
    ``reference``: the model in float64; the float32 model's own rounding at the tested points,
    measured against it, is then allowed (4 times over, as the bounds round in the same sums)."""
    tol = tolerance(lb, ub) + 64 * torch.finfo(lb.dtype).eps * rounding_scale
    points = {}
    with torch.no_grad():
        for name, corners in (("random", False), ("corners", True)):
            points[name] = random_points(x0, ptb, n_random, corners)
        points["clean"] = x0[None]
    _, points["pgd"] = pgd_extremes(model, x0, ptb, C, pgd_steps, return_points=True)
    for name, xs in points.items():
        with torch.no_grad():
            y = _outputs(model, xs, C)
            t = tol
            if reference is not None:
                t = tol + 4 * (y.double() - _outputs(reference, xs.double(), C)).abs().max().to(tol.dtype)
        below = (lb - t - y).max().item()
        above = (y - ub - t).max().item()
        assert below <= 0 and above <= 0, (
            f"bound violated by {name} points: lower by {below:.3g}, upper by {above:.3g} "
            f"(tolerance {t.max().item():.3g})")


def rounding_scale(model, x0) -> float:
    """Largest magnitude among the clean intermediate values of ``model`` at x0 (every node of its
    fx graph) and the constants of its BatchNorm maps (|mean * scale|): rounding errors, in the
    forward pass and in the bounds alike, scale with these rather than with the outputs (a sum of
    many terms that cancel; a BN over a nearly constant batch multiplies by 1/sqrt(eps))."""
    import torch.fx as fx

    mags = [0.0]

    class Record(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
                mags.append(float(out.detach().abs().max()))
            return out

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                scale = torch.rsqrt(m.running_var + m.eps) * (m.weight if m.weight is not None else 1)
                mags.append(float((m.running_mean * scale).abs().max()))
        Record(fx.symbolic_trace(model)).run(x0)
    return max(mags)


def _project_param(w, w0, ptb):
    if ptb.norm == math.inf:
        return torch.maximum(torch.minimum(w, w0 + ptb.eps), w0 - ptb.eps)
    d = w - w0
    n = d.norm(p=ptb.norm).clamp(min=1e-30)
    return w0 + d * torch.clamp(ptb.eps / n, max=1.0) * (1 - 4 * torch.finfo(w.dtype).eps)


def _random_param(w0, ptb, corner: bool):
    d = torch.randn_like(w0)
    if ptb.norm == math.inf:
        return w0 + (d.sign() if corner else torch.rand_like(w0) * 2 - 1) * ptb.eps
    d = d.sign() * torch.distributions.Exponential(1.0).sample(d.shape).to(w0.dtype) if ptb.norm == 1 else d
    return w0 + d / d.norm(p=ptb.norm) * ptb.eps * (1.0 if corner else float(torch.rand(())))


def weight_extremes(model, x0, x_ptb=None, n_random: int = 50, pgd_steps: int = 30):
    """Outputs (k, B, n_out) of the model at sampled and attacked parameter values of its
    BoundedParameters (random, corners, and PGD per output and direction on the parameters — and
    on the input too when ``x_ptb`` is given); every example's attack is its own."""
    from torch.func import functional_call
    from certtrain.bounds.tensor import BoundedParameter
    params = {k: (p.detach(), p.ptb) for k, p in model.named_parameters()
              if isinstance(p, BoundedParameter) and p.ptb is not None}
    B = x0.shape[0]

    def run(ps, x):  # ps: {name: (B, *shape)}, x: (B, ...): example b with its own parameters
        def one(p1, x1):
            return functional_call(model, p1, (x1[None],))[0].flatten()
        return torch.func.vmap(one)(ps, x)

    outs = []
    with torch.no_grad():
        for i in range(n_random):
            ps = {k: torch.stack([_random_param(w0, ptb, i % 2 == 0) for _ in range(B)]) for k, (w0, ptb) in params.items()}
            x = random_points(x0, x_ptb, 1, i % 2 == 0)[0] if x_ptb is not None else x0
            outs.append(run(ps, x))
        n_out = outs[0].shape[1]
    for j in range(n_out):
        for sign in (1.0, -1.0):
            ps = {k: w0.expand(B, *w0.shape).clone() for k, (w0, _) in params.items()}
            x = x0.clone()
            for t in range(pgd_steps):
                for v in list(ps.values()) + [x]:
                    v.requires_grad_(True)
                obj = (run(ps, x)[:, j] * sign).sum()
                grads = torch.autograd.grad(obj, list(ps.values()) + [x])
                frac = 0.5 if t < pgd_steps // 2 else 0.1
                with torch.no_grad():
                    for (k, (w0, ptb)), g in zip(params.items(), grads):
                        if ptb.norm == math.inf:
                            step = g.sign() * ptb.eps * frac
                        else:
                            step = g / g.flatten(1).norm(dim=1).clamp(min=1e-30).view(-1, *[1] * w0.dim()) * ptb.eps * frac
                        ps[k] = torch.stack([_project_param(ps[k][b] + step[b], w0, ptb) for b in range(B)])
                    if x_ptb is not None:
                        g = grads[-1]
                        if x_ptb.norm == math.inf:
                            x = x + g.sign() * float(torch.as_tensor(x_ptb.eps).max()) * frac
                        else:
                            x = x + g / g.flatten(1).norm(dim=1).clamp(min=1e-30).view(-1, *[1] * (x0.dim() - 1)) * \
                                float(torch.as_tensor(x_ptb.eps).max()) * frac
                        x = project(x, x0, x_ptb)
                    else:
                        x = x0
            with torch.no_grad():
                outs.append(run(ps, x))
    return torch.stack(outs)


def assert_sound_weights(model, x0, lb, ub, x_ptb=None, n_random: int = 50, pgd_steps: int = 30):
    """`assert_sound` for perturbed parameters (and optionally the input)."""
    y = weight_extremes(model, x0, x_ptb, n_random, pgd_steps)
    tol = tolerance(lb, ub)
    below = (lb - tol - y).max().item()
    above = (y - ub - tol).max().item()
    assert below <= 0 and above <= 0, f"bound violated by parameter points: lower by {below:.3g}, upper by {above:.3g}"
    return y
