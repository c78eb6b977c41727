"""α-CROWN: CROWN with the lower-line slopes of unstable ReLUs optimized by gradient steps.

CROWN's lower line of an unstable ReLU (l < 0 < u) is ``α·x`` for a fixed α in [0, 1] (adaptive:
1 if u > -l else 0).  *Every* α in [0, 1] gives a valid line, hence a sound bound, so the bound
is a function of α that can be maximised (lower bound) or minimised (upper bound) by projected
gradient steps (Xu et al. 2021, "Fast and Complete", Sec. 3.1; auto_LiRPA's ``CROWN-Optimized``).
α is free per neuron *and* per specification row, and separately for the lower and the upper
bound, because each row's bound is its own optimization problem.

Soundness does not depend on the optimizer: α is projected onto the op's ``alpha_range`` after
every step, and the bound returned is one actually evaluated at such an α.  Starting from CROWN's
own slopes and keeping the best iterate makes the result never looser than CROWN.

With ``optimize_intermediate`` the bounds of the intermediate (pre-activation) layers are
recomputed by CROWN in every iteration with their own α (one slope per neuron, shared by the rows
of each intermediate layer), so tighter intermediate bounds tighten the output bound too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .bounded_module import BoundedModule
    from .state import BoundState

from .methods import ALPHA_DEFAULTS as DEFAULT_ALPHA_OPTS, check_alpha_opts  # noqa: E402,F401 (re-export)


def _init_alpha(net, n, state: "BoundState", rows: int, lower: bool, upper: bool
                ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The op's CROWN parameter as the starting point, (B, rows, *node_shape) per side."""
    args, kwargs = net.op_args(state, n.name)
    lo, hi = n.op.alpha_range
    with torch.no_grad():
        dl = n.op.alpha_start(*args, **kwargs).detach().clamp(lo, hi)
    init = dl.unsqueeze(1).expand(dl.shape[0], rows, *dl.shape[1:])
    return (init.clone().requires_grad_(True) if lower else None,
            init.clone().requires_grad_(True) if upper else None)


def optimized_bounds(net: "BoundedModule", state: "BoundState", C: Optional[Tensor], lower: bool, upper: bool,
                     opts: Mapping[str, Any]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """α-CROWN bounds of ``C @ output``; ``state`` holds CROWN intermediate bounds already
    (`BoundedModule.interval_pass` with ``refine``).  Uses only the engine's walk interface."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("alpha-CROWN optimizes its slopes by gradient steps, which inference mode forbids: "
                           "call compute_bounds under torch.no_grad() instead of torch.inference_mode()")
    grad_wanted = torch.is_grad_enabled()
    C = net.spec_matrix(state, C)
    S = C.shape[1]
    iters, keep_best = int(opts["iteration"]), bool(opts["keep_best"])
    inter = bool(opts["optimize_intermediate"])

    nodes = net.optimizable_nodes(state)
    alphas = {n.name: _init_alpha(net, n, state, S, lower, upper) for n in nodes}
    # Intermediate layers: one α per neuron (shared by the rows of that layer, which keeps their
    # convolution-shaped Patches), per start node and side, for every relaxed node before it.
    inter_alphas: dict[str, dict] = {}
    if inter:
        order = {n.name: i for i, n in enumerate(net.nodes)}
        for s in net.relaxed_input_names(state):
            inter_alphas[s] = {n.name: _init_alpha(net, n, state, 1, True, True) for n in nodes
                               if order[n.name] < order[s]}
    params = [a for pair in alphas.values() for a in pair if a is not None]
    params += [a for d in inter_alphas.values() for pair in d.values() for a in pair if a is not None]
    if not params or iters == 0:
        return net.output_bounds(state, C, lower, upper)

    ranges = {n.name: n.op.alpha_range for n in nodes}
    opt = torch.optim.Adam(params, lr=float(opts["lr_alpha"]))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, float(opts["lr_decay"]))
    best_l = best_u = None
    # The best slopes per row, to re-apply under gradients; with shared intermediate slopes the rows
    # are coupled and only the best bound is kept.
    best_alpha = {} if inter else {k: [None if a is None else a.detach().clone() for a in pair]
                                   for k, pair in alphas.items()}
    lb = ub = None
    with torch.enable_grad():
        for it in range(iters + (0 if keep_best else 1)):
            if inter:
                net.interval_pass(state, refine=True, alphas=inter_alphas)
            lb, ub = net.output_bounds(state, C, lower, upper, alphas)
            with torch.no_grad():
                if lower:
                    better = torch.ones_like(lb, dtype=torch.bool) if best_l is None else lb > best_l
                    best_l = lb.detach().clone() if best_l is None else torch.where(better, lb.detach(), best_l)
                    for k, pair in best_alpha.items():
                        pair[0][better] = alphas[k][0].detach()[better]
                if upper:
                    better = torch.ones_like(ub, dtype=torch.bool) if best_u is None else ub < best_u
                    best_u = ub.detach().clone() if best_u is None else torch.where(better, ub.detach(), best_u)
                    for k, pair in best_alpha.items():
                        pair[1][better] = alphas[k][1].detach()[better]
            if it == iters:  # keep_best=False: this was the evaluation at the final α
                break
            loss = (-lb.sum() if lower else 0) + (ub.sum() if upper else 0)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            opt.zero_grad(set_to_none=True)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            sched.step()
            with torch.no_grad():  # project onto the valid slopes
                for k, pair in alphas.items():
                    for a in pair:
                        if a is not None:
                            a.clamp_(*ranges[k])
                for d in inter_alphas.values():
                    for k, pair in d.items():
                        for a in pair:
                            if a is not None:
                                a.clamp_(*ranges[k])

    if not keep_best:
        if not grad_wanted:
            lb, ub = (None if lb is None else lb.detach()), (None if ub is None else ub.detach())
        return lb, ub
    if inter:
        # Rows share the intermediate α, so the best bound of each row may come from another
        # iteration than the last: return the best, with gradients where the last one is best.
        if grad_wanted:
            return (None if not lower else torch.maximum(lb, best_l)), (None if not upper else torch.minimum(ub, best_u))
        return best_l, best_u
    if not grad_wanted:
        return best_l, best_u
    # Each row's bound depends only on its own α: re-evaluating at the best α reproduces the best
    # bound, now differentiable w.r.t. the model and the input.
    return net.output_bounds(state, C, lower, upper, {k: tuple(pair) for k, pair in best_alpha.items()})
