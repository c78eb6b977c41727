"""α-CROWN: CROWN with the free parameters of the relaxations optimized by gradient steps.

Many relaxations have a free parameter for which *every* value in a range gives sound lines: the
lower slope of an unstable ReLU (any α in [0, 1]), the tangent points of Sigmoid / Tanh / exp /
log / powers, the window weights of MaxPool's lower line, the interpolation of McCormick planes.
The bound is then a function of these parameters that projected gradient steps tighten (Xu et al.
2021, "Fast and Complete", Sec. 3.1; auto_LiRPA's ``CROWN-Optimized``).  Each op declares its
parameter through ``alpha_range`` / ``alpha_free`` / ``alpha_start`` / ``backward_alpha``; this
module only optimizes.

Which α serve which bound.  Every bound computed by a backward pass is its own optimization
problem, so (as auto_LiRPA) a relaxed node r has separate α for every *start node* whose bounds
pass through it: the output specification (one α per spec row) and, with
``optimize_intermediate`` (the default), every intermediate layer s whose bounds CROWN computes
(one α per refined neuron of s, "unshared"; per output channel where s is a convolution, as
auto_LiRPA in patches mode, unless ``use_full_conv_alpha``); each separately for the lower and the
upper bound.  All are optimized together for the output bound, every intermediate bound is
recomputed with its α in every iteration and intersected with its interval and with the best
bound seen so far by value only (straight through: the gradient stays the CROWN bound's, or the α
of a neuron whose interval is tighter would never move).  When both sides of the output are
asked, they are two optimizations (``joint`` makes them one).

Memory.  α is stored only where the parameter is free (e.g. unstable ReLUs), and where the
α of a (relaxed node, start node) pair would exceed ``alpha_memory_budget`` (counting the
gradient and Adam's two moments) the rows share it: per output channel of a convolutional start
node, then one α for all rows (auto_LiRPA's ``use_shared_alpha`` forces the latter for the
intermediate layers).  Per-channel α reaches the ops as `RowGroups` (each row's window is picked
from its channel's α: never one copy per row).  The backward passes run in chunks of rows
(``memory_budget``); where the whole autograd graph would not fit that budget, in smaller chunks,
each under activation checkpointing, so autograd holds one chunk's coefficients at a time.

Soundness does not depend on the optimizer: α is projected onto the op's ``alpha_range`` after
every step (and ops map any α in that box to sound lines), and the bound returned is one actually
evaluated.  Starting from CROWN's own parameters and keeping the best bound of every row makes the
result never looser than CROWN.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from .bounded_module import BoundedModule
    from .state import BoundState

from .methods import ALPHA_DEFAULTS as DEFAULT_ALPHA_OPTS, check_alpha_opts  # noqa: E402,F401 (re-export)
from .ops.activation import RowGroups  # noqa: E402


class _Alpha:
    """α of one relaxed node for the rows of one start node: ``param[side]`` (B, G, F) holds one
    slot per group of rows (``G``) for the F entries of the node's parameter where it is free
    (``idx``; None: all P entries); elsewhere the parameter stays CROWN's (``fill``, (B, P))."""

    def __init__(self, fill: Tensor, idx: Optional[Tensor], shape: tuple, sides: tuple[bool, bool],
                 levels: list, elem: int, row_groups: bool = False):
        self.fill, self.idx, self.shape, self.sides = fill, idx, shape, sides
        self.row_groups = row_groups  # the op takes `RowGroups` α
        self.levels = levels  # [(kind, G, slot_of or None)], finest first
        self.level = 0
        self.F = fill.shape[1] if idx is None else idx.numel()
        self.elem = elem
        self.param: list[Optional[Tensor]] = [None, None]
        self.full: list[Optional[Tensor]] = [None, None]  # every slot's parameter, per pass (`rows`)

    @property
    def kind(self) -> str:
        return self.levels[self.level][0]

    @property
    def groups(self) -> int:
        return self.levels[self.level][1]

    def nbytes(self, level: Optional[int] = None) -> int:
        """α, its gradient and Adam's two moments."""
        G = self.levels[self.level if level is None else level][1]
        return 4 * sum(self.sides) * self.fill.shape[0] * G * self.F * self.elem

    def init(self) -> list[Tensor]:
        base = self.fill if self.idx is None else self.fill.index_select(1, self.idx)
        B, G = base.shape[0], self.groups
        for i, on in enumerate(self.sides):
            if on:
                self.param[i] = base.unsqueeze(1).expand(B, G, self.F).clone().requires_grad_(True)
        return [p for p in self.param if p is not None]

    def slots(self, rows: Optional[Tensor], start: int = 0, stop: int = 0) -> Optional[Tensor]:
        """Slot of each row: ``rows`` are flat neurons of an intermediate start node, or (for the
        output spec, ``rows`` None) the rows start..stop-1; None: one slot shared by all rows."""
        kind, G, slot_of = self.levels[self.level]
        if G == 1:
            return None
        if kind == "spec":
            return torch.arange(start, stop, device=self.fill.device)
        return slot_of[rows]

    def rows(self, side: int, slots: Optional[Tensor]):
        """The parameter for rows with these slots (None: every slot, (B, G, *shape)): (B, rows,
        *shape), or `RowGroups` where the op takes them."""
        p = self.param[side]
        if p is None:
            return None
        if slots is not None and self.row_groups and self.kind == "channel":
            # per-channel α stays per channel: the op picks each row's window from its channel's
            # (the channels' parameters, built once per pass where `evaluate` can)
            full = self.full[side] if self.full[side] is not None else self.rows(side, None)
            return RowGroups(full, slots)
        a = p if slots is None else p.index_select(1, slots)
        B, n = a.shape[:2]
        if self.idx is not None:
            a = self.fill.unsqueeze(1).repeat(1, n, 1).index_copy_(2, self.idx, a)
        return a.view(B, n, *self.shape)


def _ancestors(net) -> dict[str, set]:
    anc: dict[str, set] = {}
    for n in net.nodes:
        s: set = set()
        for i in n.inputs:
            s.add(i)
            s |= anc.get(i, set())
        anc[n.name] = s
    return anc


class _Optimizer:
    """One α-CROWN computation on a state holding CROWN bounds (see the module docstring)."""

    def __init__(self, net: "BoundedModule", state: "BoundState", C: Tensor, opts: Mapping[str, Any],
                 grad_wanted: bool):
        self.net, self.state, self.C, self.opts, self.grad_wanted = net, state, C, opts, grad_wanted
        self.inter = bool(opts["optimize_intermediate"])
        self.anc = _ancestors(net)
        self.refined = [s for s in net.refined_names(state) if s not in state.fixed] if self.inter else []
        # best bound of every refined node so far (all hold; intersected into every pass)
        self.best_inter: dict[str, tuple[Tensor, Tensor]] = {}
        for s in self.refined:
            lo, up = state.bounds(s)
            self.best_inter[s] = (lo.detach(), up.detach())
        self.grad = False
        self.final_alpha: dict[str, _Alpha] = {}
        self.inter_alpha: dict[str, dict[str, _Alpha]] = {}
        self.iterations, self.alpha_bytes, self.layouts = 0, 0, []
        # activation checkpointing (each chunk recomputed in the backward pass) only where the
        # whole graph would not fit the memory budget anyway
        self.checkpoint = self._graph_bytes() > float(net.bound_opts["memory_budget"])

    # ------------------------------------------------------------------ α layout
    def _setup(self, lower: bool, upper: bool) -> list[Tensor]:
        net, state = self.net, self.state
        nodes = net.optimizable_nodes(state)
        info = {}
        for n in nodes:
            args, kwargs = net.op_args(state, n.name)
            with torch.no_grad():
                start = n.op.alpha_start(*args, **kwargs).detach()
                start = start.clamp(*n.op.alpha_range)
                free = torch.broadcast_to(n.op.alpha_free(*args, **kwargs), start.shape)
            B, shape = start.shape[0], tuple(start.shape[1:])
            P = math.prod(shape)
            fidx = free.reshape(B, P).any(0).nonzero().flatten()
            info[n.name] = (start.reshape(B, P).contiguous(), None if fidx.numel() == P else fidx, shape,
                            start.element_size(), bool(getattr(n.op, "alpha_row_groups", False)))
        final = net.final_name
        S = self.C.shape[1]
        self.final_alpha = {}
        for r, (fill, idx, shape, elem, _) in info.items():
            if r == final or r in self.anc[final]:
                levels = ([("spec", S, None)] if S > 1 else []) + [("shared", 1, None)]
                self.final_alpha[r] = _Alpha(fill, idx, shape, (lower, upper), levels, elem)
        self.inter_alpha = {}
        shared = bool(self.opts["use_shared_alpha"])
        full_conv = bool(self.opts["use_full_conv_alpha"])
        for s in self.refined:
            rs = [r for r in info if r == s or r in self.anc[s]]
            if not rs:
                continue
            node = net.node(s)
            R0 = net.refine_rows(node, state, reference=self.best_inter.get(s))
            if R0 is not None and R0.numel() == 0:
                continue
            ref = state.values[s].value
            numel, sshape = ref[0].numel(), tuple(ref.shape[1:])
            levels = []
            conv = len(sshape) == 3
            if not shared and (full_conv or not conv):
                if R0 is None:
                    levels.append(("row", numel, torch.arange(numel, device=ref.device)))
                else:  # the rows refined now; any other row (none while bounds only tighten) shares the last slot
                    slot_of = torch.full((numel,), R0.numel(), dtype=torch.long, device=ref.device)
                    slot_of[R0] = torch.arange(R0.numel(), device=ref.device)
                    levels.append(("row", R0.numel() + 1, slot_of))
            if not shared and conv and (not levels or sshape[0] < levels[0][1]):
                hw = sshape[1] * sshape[2]
                levels.append(("channel", sshape[0], torch.arange(numel, device=ref.device) // hw))
            levels.append(("shared", 1, None))
            self.inter_alpha[s] = {r: _Alpha(*info[r][:3], (True, True), levels, *info[r][3:]) for r in rs}
        # memory: coarsen the largest α first until everything fits the budget
        stores = list(self.final_alpha.values()) + [a for d in self.inter_alpha.values() for a in d.values()]
        budget = float(self.opts["alpha_memory_budget"])
        total = sum(a.nbytes() for a in stores)
        while total > budget:
            cand = [a for a in stores if a.level + 1 < len(a.levels)]
            if not cand:
                break
            a = max(cand, key=lambda a: a.nbytes())
            total -= a.nbytes()
            a.level += 1
            total += a.nbytes()
        self.alpha_bytes += total
        self.layouts += [
            (r, s, a.kind, a.groups, a.F) for s, d in [(self.net.final_name, self.final_alpha), *self.inter_alpha.items()]
            for r, a in d.items()]
        params = []
        for a in stores:
            params += a.init()
        self.ranges = {}
        for r in info:
            self.ranges[r] = net.node(r).op.alpha_range
        return params

    def _project(self) -> None:
        with torch.no_grad():
            for r, a in self.final_alpha.items():
                for p in a.param:
                    if p is not None:
                        p.clamp_(*self.ranges[r])
            for d in self.inter_alpha.values():
                for r, a in d.items():
                    for p in a.param:
                        if p is not None:
                            p.clamp_(*self.ranges[r])

    # ------------------------------------------------------------------ passes
    def _saved_per_row(self, start: str) -> float:
        """Bytes autograd keeps per row of a backward pass from ``start`` (dense coefficients on
        every node of the path, about three saved tensors per op: an upper estimate)."""
        vals = self.state.values
        ref = vals[start].value
        numel = sum(vals[k].value[0].numel() for k in (*self.anc[start], start)
                    if self.state.perturbed(k) and isinstance(vals[k].value, Tensor))
        return 3.0 * ref.shape[0] * ref.element_size() * max(numel, 1)

    def _graph_bytes(self) -> float:
        """Estimated bytes autograd would keep for one pass over every refined node and the output."""
        total = 0.0
        for s in [*self.refined, self.net.final_name]:
            rows = self.C.shape[1] if s == self.net.final_name else self.state.values[s].value[0].numel()
            total += rows * self._saved_per_row(s)
        return total

    def _step(self, start: str) -> int:
        """Rows per chunk: the walk's (`rows_per_chunk`), and under checkpointing at most what keeps
        one chunk's graph within the memory budget."""
        step = self.net.rows_per_chunk(self.state, start)
        if self.grad and self.checkpoint:
            step = min(step, max(1, int(self.net.bound_opts["memory_budget"] // self._saved_per_row(start))))
        return step

    def _run_chunk(self, fn):
        if self.grad and self.checkpoint:
            return checkpoint(fn, use_reentrant=False, preserve_rng_state=False)
        return fn()

    def _refine(self, n, state) -> None:
        """CROWN bounds of an intermediate node with its α, in checkpointed chunks, intersected
        with the best bounds so far (the value; the gradient is the current pass's)."""
        net = self.net
        ref = self.best_inter.get(n.name)
        rows = net.refine_rows(n, state, reference=ref)
        if rows is None or rows.numel() > 0:
            v = state.values[n.name]
            all_rows = torch.arange(v.value[0].numel(), device=v.value.device) if rows is None else rows
            alphas = self.inter_alpha.get(n.name, {})
            step = self._step(n.name)
            lbs, ubs = [], []
            for i in range(0, all_rows.numel(), step):
                r = all_rows[i:i + step]

                def fn(r=r):
                    al = {}
                    for k, a in alphas.items():
                        sl = a.slots(r)
                        al[k] = (a.rows(0, sl), a.rows(1, sl))
                    return net.node_bounds(state, n.name, r, alphas=al or None)

                lb, ub = self._run_chunk(fn)
                lbs.append(lb)
                ubs.append(ub)
            net.store_refined(n, state, rows, torch.cat(lbs, 1), torch.cat(ubs, 1), straight_through=self.grad)
        if ref is not None:
            v = state.values[n.name]
            lo, up = v.lower, v.upper
            if self.grad:  # straight through: the best value, the current pass's gradient
                v.lower = lo + (torch.maximum(lo, ref[0]) - lo).detach()
                v.upper = up + (torch.minimum(up, ref[1]) - up).detach()
            else:
                v.lower, v.upper = torch.maximum(lo, ref[0]), torch.minimum(up, ref[1])
            self.best_inter[n.name] = (v.lower.detach(), v.upper.detach())

    def _intersect_best(self, n, state) -> None:
        v = state.values[n.name]
        ref = self.best_inter.get(n.name)
        if ref is not None:
            v.lower, v.upper = torch.maximum(v.lower, ref[0]), torch.minimum(v.upper, ref[1])

    def _output(self, lower: bool, upper: bool):
        net, state, C = self.net, self.state, self.C
        S = C.shape[1]
        step = self._step(net.final_name)
        lbs, ubs = [], []
        for s in range(0, S, step):
            e = min(s + step, S)

            def fn(s=s, e=e):
                al = {}
                for k, a in self.final_alpha.items():
                    sl = a.slots(None, s, e)
                    al[k] = (a.rows(0, sl), a.rows(1, sl))
                return net.output_bounds(state, C[:, s:e], lower, upper, al or None)

            lb, ub = self._run_chunk(fn)
            lbs.append(lb)
            ubs.append(ub)
        return (torch.cat(lbs, 1) if lower else None), (torch.cat(ubs, 1) if upper else None)

    def evaluate(self, lower: bool, upper: bool, grad: bool):
        self.grad = grad
        with torch.enable_grad() if grad else torch.no_grad():
            # per-channel α of every channel, built once per pass for all chunks; under
            # checkpointing, per chunk inside it instead (memory; and a recomputed chunk must
            # save what its first run saved)
            once = not (grad and self.checkpoint)
            for d in (self.final_alpha, *self.inter_alpha.values()):
                for a in d.values():
                    a.full = [None, None]
                    if once and a.row_groups and a.kind == "channel":
                        a.full = [a.rows(i, None) for i in (0, 1)]
            if self.inter and self.refined:
                self.net.interval_pass(self.state, refine=True, refine_fn=self._refine)
            return self._output(lower, upper)

    # ------------------------------------------------------------------ optimization
    def run(self, lower: bool, upper: bool):
        """Optimize the α of the requested sides; (best lb, best ub, last lb, last ub)."""
        opts = self.opts
        iters, keep_best = int(opts["iteration"]), bool(opts["keep_best"])
        patience_max, rtol = int(opts["early_stop_patience"]), float(opts["early_stop_rtol"])
        params = self._setup(lower, upper)
        per_row = not self.inter and all(a.kind == "spec" for a in self.final_alpha.values())
        if not params:
            lb, ub = self.evaluate(lower, upper, self.grad_wanted)
            return lb, ub, lb, ub
        opt = torch.optim.Adam(params, lr=float(opts["lr_alpha"]))
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, float(opts["lr_decay"]))
        best_l = best_u = None
        best_alpha = None
        if per_row and self.grad_wanted and keep_best:
            best_alpha = {k: [None if p is None else p.detach().clone() for p in a.param]
                          for k, a in self.final_alpha.items()}
        patience = 0
        lb = ub = None
        for it in range(iters + 1):
            last = it == iters
            lb, ub = self.evaluate(lower, upper, grad=not last or (self.grad_wanted and best_alpha is None))
            gain, scale = 0.0, 0.0
            with torch.no_grad():
                if lower:
                    cur = lb.detach()
                    better = torch.ones_like(cur, dtype=torch.bool) if best_l is None else cur > best_l
                    if best_l is not None:
                        gain += _finite_sum(torch.where(better, cur - best_l, torch.zeros_like(cur)))
                    best_l = cur.clone() if best_l is None else torch.where(better, cur, best_l)
                    scale += _finite_sum(best_l.abs())
                    if best_alpha is not None:
                        for k, pair in best_alpha.items():
                            _keep(pair[0], self.final_alpha[k].param[0], better)
                if upper:
                    cur = ub.detach()
                    better = torch.ones_like(cur, dtype=torch.bool) if best_u is None else cur < best_u
                    if best_u is not None:
                        gain += _finite_sum(torch.where(better, best_u - cur, torch.zeros_like(cur)))
                    best_u = cur.clone() if best_u is None else torch.where(better, cur, best_u)
                    scale += _finite_sum(best_u.abs())
                    if best_alpha is not None:
                        for k, pair in best_alpha.items():
                            _keep(pair[1], self.final_alpha[k].param[1], better)
            if last:
                break
            if it > 0:
                patience = 0 if gain > rtol * scale else patience + 1
                if patience_max > 0 and patience >= patience_max:
                    break
            with torch.enable_grad():
                loss = (-lb.sum() if lower else 0) + (ub.sum() if upper else 0)
                if not isinstance(loss, Tensor) or not loss.requires_grad:
                    break
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            opt.zero_grad(set_to_none=True)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            sched.step()
            self._project()
        self.iterations += it
        if not keep_best:
            return lb, ub, lb, ub
        if best_alpha is not None:  # every row's bound depends on its own α only: re-evaluate at the best
            for k, pair in best_alpha.items():
                self.final_alpha[k].param = pair
            self.grad = False  # no checkpointing: the caller's backward needs this graph only
            with torch.enable_grad():
                lb, ub = self._output(lower, upper)
            return lb, ub, lb, ub
        return best_l, best_u, lb, ub

    def finish(self) -> None:
        """Leave the best intermediate bounds in the state (without autograd history)."""
        if self.refined and not self.grad_wanted:
            with torch.no_grad():
                self.net.interval_pass(self.state, refine=True, refine_fn=self._intersect_best)


def _finite_sum(t: Tensor) -> float:
    return float(torch.where(torch.isfinite(t), t, torch.zeros_like(t)).sum())


def _keep(best: Optional[Tensor], cur: Optional[Tensor], better: Tensor) -> None:
    """Copy the α rows (B, S, ...) of ``cur`` where ``better`` (B, S) into ``best``."""
    if best is None or cur is None:
        return
    m = better.view(*better.shape, *([1] * (best.dim() - 2)))
    best.copy_(torch.where(m, cur.detach(), best))


def optimized_bounds(net: "BoundedModule", state: "BoundState", C: Optional[Tensor], lower: bool, upper: bool,
                     opts: Mapping[str, Any]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """α-CROWN bounds of ``C @ output``; ``state`` holds CROWN intermediate bounds already
    (`BoundedModule.interval_pass` with ``refine``).  Uses only the engine's walk interface."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("alpha-CROWN optimizes its slopes by gradient steps, which inference mode forbids: "
                           "call compute_bounds under torch.no_grad() instead of torch.inference_mode()")
    grad_wanted = torch.is_grad_enabled()
    C = net.spec_matrix(state, C)
    if int(opts["iteration"]) == 0 or not net.optimizable_nodes(state):
        return net.output_bounds(state, C, lower, upper)
    run = _Optimizer(net, state, C, opts, grad_wanted)
    if run.inter and run.refined and lower and upper and not bool(opts["joint"]):
        # as auto_LiRPA: the lower and the upper bound are two problems, each with its own α for
        # the intermediate layers (the second starts from the first one's best intermediate bounds)
        best_l, _, last_l, _ = run.run(True, False)
        _, best_u, _, last_u = run.run(False, True)
    else:
        best_l, best_u, last_l, last_u = run.run(lower, upper)
    run.finish()
    # for diagnostics (scripts/bench_alpha_crown.py): iterations run, bytes of α, its layouts
    net.last_alpha_stats = {"iterations": run.iterations, "alpha_bytes": run.alpha_bytes,
                            "layouts": run.layouts}
    if grad_wanted:
        # values: the best bound of each row; gradients where the last iterate is that best
        lb = None if best_l is None else (best_l if best_l.requires_grad else torch.maximum(last_l, best_l))
        ub = None if best_u is None else (best_u if best_u.requires_grad else torch.minimum(last_u, best_u))
        return lb, ub
    return (None if best_l is None else best_l.detach()), (None if best_u is None else best_u.detach())
