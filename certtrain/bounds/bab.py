"""Complete verification by branch and bound over ReLU splits with β-CROWN bounds.

The property: over an input box, ``C @ f(x) > d`` must hold for at least one row of every *group*
(a group is a conjunction of the unsafe condition, VNN-LIB's ``(and (<= ...) ...)``; robustness of
class t against class j is one group with the single row ``y_t - y_j > 0``).  A group is refuted on
a domain when the lower bound of some row's ``C_i f(x) - d_i`` is positive there.

The search (Wang et al. 2021, "Beta-CROWN", Alg. 1):

* a *domain* is the input box with some unstable ReLUs fixed to their active (``z ≥ 0``) or
  inactive (``z ≤ 0``) side; its pre-activation bounds are the parent's with the split applied
  (`BoundState.fix`), so each domain's relaxation is exact on its split neurons;
* each domain is bounded by CROWN with optimized slopes α *and* Lagrange multipliers β ≥ 0 of its
  split constraints (``s·z ≥ 0`` adds ``-β·s`` to the coefficients that reach ``z``: eq. 5 of the
  paper; any β ≥ 0 and any α in range give a sound bound, so the optimizer cannot break soundness);
  many domains are bounded in one batched call and kept on the model's device;
* the unverified domain with the lowest bound is split on the neuron chosen by BaBSR (Bunel et
  al. 2020: the coefficient of the neuron in the bound times the gap of its triangle relaxation) or
  by filtered smart branching (kFSB, De Palma et al. 2021: the top-k BaBSR candidates are tried
  with one cheap bound each and the best one split);
* every bound also yields, per domain, the box corner minimising its linear lower bound; those
  points and a PGD attack (before the search and during it) are run on the network, and a point
  that satisfies the unsafe condition is returned as the counterexample, after checking it;
* a domain with every unstable neuron split is linear on its region: it is decided exactly by a
  linear program over the input (scipy's HiGHS), else reported ``unknown``.

Statuses are never conflated: ``verified`` (every domain refuted), ``falsified`` (with a checked
counterexample), ``timeout``, ``unknown`` (the search ended without an answer), ``error``.
Uses only the engine's public walk interface.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .patches import to_dense
from .perturbations import PerturbationLpNorm
from .tensor import BoundedTensor

if TYPE_CHECKING:  # pragma: no cover
    from .bounded_module import BoundedModule

__all__ = ["BaBOptions", "BaBResult", "VerificationProblem", "bab_verify", "STATUSES"]

#: the statuses a property can end with
STATUSES = ("verified", "falsified", "timeout", "unknown", "error")


@dataclass(frozen=True)
class BaBOptions:
    """Options of `bab_verify` (a config may build it with ``_target_``)."""

    timeout: float = 60.0          # seconds for the whole property (attack, bounds and search)
    batch_domains: int = 256       # domains bounded in one batched call
    branching: str = "kfsb"        # "kfsb" (filtered smart branching) or "babsr"
    kfsb_k: int = 3                # candidates per domain tried by kFSB
    iteration: int = 20            # α/β gradient steps at the root and per batch of domains
    lr_alpha: float = 0.1          # Adam learning rates (α-CROWN / β-CROWN's defaults)
    lr_beta: float = 0.05
    lr_decay: float = 0.98
    pgd_steps: int = 100           # PGD before the search (0: none)
    pgd_restarts: int = 5
    pgd_every: int = 10            # PGD again from the weakest domains' corners every n rounds (0: never)
    max_domains: int = 500_000     # unverified domains kept at most (beyond: ``unknown``)
    lp: bool = True                # decide fully split domains by a linear program
    refine_intermediate: bool = True  # CROWN bounds of the pre-activations again after each split
    root_alpha: bool = True        # root intermediate bounds by α-CROWN (optimized intermediate layers), else CROWN
    verbose: bool = False

    def __post_init__(self):
        if self.branching not in ("kfsb", "babsr"):
            raise ValueError(f"BaBOptions.branching must be 'kfsb' or 'babsr', got {self.branching!r}")
        for k in ("timeout", "lr_alpha", "lr_beta"):
            if not (isinstance(getattr(self, k), (int, float)) and getattr(self, k) > 0):
                raise ValueError(f"BaBOptions.{k} must be a positive number, got {getattr(self, k)!r}")
        for k in ("batch_domains", "kfsb_k", "max_domains"):
            if not (isinstance(getattr(self, k), int) and getattr(self, k) >= 1):
                raise ValueError(f"BaBOptions.{k} must be an integer >= 1, got {getattr(self, k)!r}")
        for k in ("iteration", "pgd_steps", "pgd_restarts", "pgd_every"):
            if not (isinstance(getattr(self, k), int) and getattr(self, k) >= 0):
                raise ValueError(f"BaBOptions.{k} must be an integer >= 0, got {getattr(self, k)!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"BaBOptions.lr_decay must be in (0, 1], got {self.lr_decay!r}")

    @classmethod
    def from_dict(cls, opts: Optional[dict] = None, **kw) -> "BaBOptions":
        """Options from a dict; unknown keys are an error naming the valid ones."""
        d = {**dict(opts or {}), **kw}
        names = [f.name for f in fields(cls)]
        bad = [k for k in d if k not in names]
        if bad:
            raise ValueError(f"unknown branch-and-bound option(s) {', '.join(map(repr, bad))}; "
                             f"available: {', '.join(names)}")
        return cls(**d)


@dataclass
class VerificationProblem:
    """``C @ f(x) > d`` for one row of every group, for all x in [x_L, x_U] (batch 1)."""

    x_L: Tensor                    # (1, *input_shape)
    x_U: Tensor
    C: Tensor                      # (1, rows, n_out)
    d: Tensor                      # (rows,)
    groups: list[list[int]]        # row indices of each group (a conjunction of the unsafe condition)

    @classmethod
    def make(cls, x_L: Tensor, x_U: Tensor, C: Tensor, d: Optional[Tensor] = None,
             groups: Optional[Sequence[Sequence[int]]] = None) -> "VerificationProblem":
        if x_L.shape != x_U.shape or x_L.shape[0] != 1:
            raise ValueError(f"x_L and x_U must have the same shape with batch 1, got {tuple(x_L.shape)} "
                             f"and {tuple(x_U.shape)}")
        if bool((x_L > x_U).any()):
            raise ValueError("the input box is empty: some x_L > x_U")
        if C.dim() == 2:
            C = C.unsqueeze(0)
        if C.dim() != 3 or C.shape[0] != 1:
            raise ValueError(f"C must be (rows, n_out) or (1, rows, n_out), got {tuple(C.shape)}")
        rows = C.shape[1]
        d = torch.zeros(rows, dtype=C.dtype, device=C.device) if d is None else d.reshape(-1).to(C)
        if d.numel() != rows:
            raise ValueError(f"d has {d.numel()} entries for {rows} rows of C")
        groups = [[i] for i in range(rows)] if groups is None else [list(map(int, g)) for g in groups]
        seen = sorted(i for g in groups for i in g)
        if not groups or any(not g for g in groups) or seen != sorted(set(seen)) or seen[0] < 0 or seen[-1] >= rows:
            raise ValueError(f"groups must be non-empty lists of distinct row indices in [0, {rows}), got {groups}")
        return cls(x_L, x_U, C, d, groups)

    def margins(self, rows_value: Tensor) -> Tensor:
        """(N, groups): the best row's ``C_i y - d_i`` of each group (> 0: the group is refuted)."""
        v = rows_value - self.d
        return torch.stack([v[:, g].max(1).values for g in self.groups], 1)

    def violated(self, y: Tensor) -> Tensor:
        """(N,) bool: outputs y (N, n_out) satisfying the unsafe condition of some group."""
        v = torch.einsum("rk,nk->nr", self.C[0].to(y), y.flatten(1)) - self.d.to(y)
        return torch.stack([(v[:, g] <= 0).all(1) for g in self.groups], 1).any(1)


@dataclass
class BaBResult:
    """The outcome of one property."""

    status: str                              # one of STATUSES
    lower_bound: float                       # min over unrefuted domains of the worst group margin
    time: float
    domains: int = 0                         # domains bounded
    max_depth: int = 0
    counterexample: Optional[Tensor] = None  # x (1, *input_shape), in the box, checked to violate
    output: Optional[Tensor] = None          # f(counterexample)
    stage: str = ""                          # what decided it: "attack", "root", "bab", "lp"
    message: str = ""
    history: list = field(default_factory=list)

    def __str__(self) -> str:
        s = f"{self.status} in {self.time:.2f} s ({self.stage or '-'}; {self.domains} domains, lower bound {self.lower_bound:.4g})"
        return s + (f": {self.message}" if self.message else "")


# ----------------------------------------------------------------------------- attack
def _box_pgd(model: Callable[[Tensor], Tensor], prob: VerificationProblem, starts: Optional[Tensor],
             steps: int, restarts: int) -> Optional[Tensor]:
    """PGD on the box minimising the worst group's violation margin; a point found to violate the
    property, or None.  ``starts``: extra starting points (N, *input_shape)."""
    if steps <= 0:
        return None
    x_L, x_U = prob.x_L, prob.x_U
    inits = [x_L + (x_U - x_L) * torch.rand((max(restarts, 1), *x_L.shape[1:]), dtype=x_L.dtype,
                                            device=x_L.device)]
    inits.append((x_L + x_U) / 2)
    if starts is not None:
        inits.append(starts.to(x_L))
    x = torch.cat(inits).detach()
    step = (x_U - x_L) / 4
    with torch.enable_grad():
        for i in range(steps):
            x.requires_grad_(True)
            y = model(x).flatten(1)
            v = torch.einsum("rk,nk->nr", prob.C[0].to(y), y) - prob.d.to(y)
            # a group holds (unsafe) when all its rows are <= 0: minimise its largest row; the
            # property breaks when any group does: minimise over groups.
            obj = torch.stack([v[:, g].max(1).values for g in prob.groups], 1).min(1).values
            bad = (obj <= 0)
            if bool(bad.any()):
                return x[bad][:1].detach()
            # allow_unused: a function piecewise constant in x (a ReLU net's gradient norm) has no
            # gradient path; the random starts are then the whole attack
            g = torch.autograd.grad(obj.sum(), x, allow_unused=True)[0] if obj.requires_grad else None
            if g is None:
                break
            with torch.no_grad():
                x = torch.max(torch.min(x - step * g.sign(), x_U), x_L)
                step = step * (0.98 if i % 2 else 1.0)
            x = x.detach()
    return None


def _check(model: Callable[[Tensor], Tensor], prob: VerificationProblem, x: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """(x, f(x)) of the first candidate that lies in the box and violates the property."""
    with torch.no_grad():
        x = torch.max(torch.min(x.to(prob.x_L), prob.x_U), prob.x_L)
        y = model(x)
        bad = prob.violated(y.flatten(1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        return x[i:i + 1], y[i:i + 1]
    return None


# ----------------------------------------------------------------------------- domains
@dataclass
class _Domains:
    """A batch of domains: per split node the pre-activation bounds and the split signs
    (+1 active, -1 inactive, 0 free), the bound of every row, α / β warm starts, the depth."""

    lower: dict[str, Tensor]
    upper: dict[str, Tensor]
    sign: dict[str, Tensor]
    lb: Tensor                          # (N, rows)
    alpha: dict[str, Tensor]            # (N, rows, *shape) lower-side slopes
    beta: dict[str, Tensor]             # (N, rows, *shape) ≥ 0
    depth: Tensor                       # (N,)

    def __len__(self) -> int:
        return self.lb.shape[0]

    def take(self, idx: Tensor) -> "_Domains":
        pick = lambda d: {k: v[idx] for k, v in d.items()}  # noqa: E731
        return _Domains(pick(self.lower), pick(self.upper), pick(self.sign), self.lb[idx], pick(self.alpha),
                        pick(self.beta), self.depth[idx])

    @staticmethod
    def cat(parts: list["_Domains"]) -> "_Domains":
        parts = [p for p in parts if p is not None and len(p)]
        cat = lambda attr: {k: torch.cat([getattr(p, attr)[k] for p in parts]) for k in getattr(parts[0], attr)}  # noqa: E731
        return _Domains(cat("lower"), cat("upper"), cat("sign"), torch.cat([p.lb for p in parts]), cat("alpha"),
                        cat("beta"), torch.cat([p.depth for p in parts]))


class _Search:
    """One property's branch and bound (see the module docstring)."""

    def __init__(self, net: "BoundedModule", prob: VerificationProblem, opts: BaBOptions):
        self.net, self.prob, self.opts = net, prob, opts
        self.t0 = time.perf_counter()
        self.n_bounded = 0
        self.rows = prob.C.shape[1]
        # the split nodes: inputs of ReLUs
        self.relus: dict[str, str] = {}  # pre-activation node -> relu node
        for n in net.nodes:
            if n.op is not None and type(n.op).__name__ == "BoundReLU":
                z = n.arg_name(0)
                if z is not None:
                    self.relus[z] = n.name
        if not self.relus:
            raise ValueError("branch and bound splits ReLUs, and this network has none")
        self.x0 = (prob.x_L + prob.x_U) / 2
        self.rad = (prob.x_U - prob.x_L) / 2
        self.tol = 1e-5 if prob.C.dtype != torch.float64 else 1e-10

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def model(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _inputs(self, n: int) -> BoundedTensor:
        # the box as a ball around its centre (radius per element), clipped to the box itself
        ptb = PerturbationLpNorm(eps=self.rad, norm=math.inf, x_L=self.prob.x_L.expand(n, *self.prob.x_L.shape[1:]),
                                 x_U=self.prob.x_U.expand(n, *self.prob.x_U.shape[1:]))
        return BoundedTensor(self.x0.expand(n, *self.x0.shape[1:]), ptb)

    # ---------------------------------------------------------------- bounding
    def bound(self, dom: _Domains, iteration: int, record_relu: bool = True, refine: bool = True):
        """Optimize α, β of each domain (in place: dom.lb, dom.alpha, dom.beta, keeping the best
        per row) and return (A at each ReLU output (N, rows, *shape) or None, corner inputs)."""
        net, N, S = self.net, len(dom), self.rows
        C = self.prob.C.expand(N, -1, -1)
        fixed = {z: (dom.lower[z], dom.upper[z]) for z in dom.lower}
        state = net.prepare((self._inputs(N),), intermediate_bounds=fixed)
        net.interval_pass(state, refine=self.opts.refine_intermediate and refine, refine_fixed=True)
        empty = torch.zeros(N, dtype=torch.bool, device=dom.lb.device)
        for z in dom.lower:
            lo, up = state.bounds(z)
            dom.lower[z], dom.upper[z] = lo.detach(), up.detach()
            # bounds that cross by more than rounding: the split constraints leave no input
            tol = self.tol * (1 + torch.maximum(lo.abs(), up.abs()))
            empty |= ((lo - up) > tol).flatten(1).any(1)
        nodes = net.optimizable_nodes(state)
        alphas, params, ranges = {}, [], {}
        for n in nodes:
            a = dom.alpha.get(n.name)
            if a is None:
                args, kwargs = net.op_args(state, n.name)
                with torch.no_grad():
                    a0 = n.op.alpha_start(*args, **kwargs).detach()
                a = a0.unsqueeze(1).expand(N, S, *a0.shape[1:]).clone()
            a = a.clone().requires_grad_(iteration > 0)
            alphas[n.name] = (a, None)
            ranges[n.name] = n.op.alpha_range
            params.append(a)
        betas = {z: dom.beta[z].clone().requires_grad_(iteration > 0) for z in dom.sign
                 if bool((dom.sign[z] != 0).any())}
        record = {self.relus[z]: None for z in self.relus} if record_relu else {}
        inp = net.input_names[0]
        record[inp] = None
        best = dom.lb.clone()
        best_rec = None
        opt = None
        if iteration > 0 and (params or betas):
            opt = torch.optim.Adam([{"params": params, "lr": self.opts.lr_alpha},
                                    {"params": list(betas.values()), "lr": self.opts.lr_beta}])
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, self.opts.lr_decay)
        with torch.enable_grad():
            for it in range(iteration + 1):
                extra = {z: (-b * dom.sign[z].unsqueeze(1).to(b), None) for z, b in betas.items()}
                rec = dict.fromkeys(record)
                lb, _ = net.output_bounds(state, C, True, False, alphas, extra, rec)
                lb_d = lb.detach()
                better = lb_d > best
                if it == 0:
                    better = torch.ones_like(better) if bool(torch.isneginf(best).all()) else better
                best = torch.where(better, lb_d, best)
                for k, (a, _) in alphas.items():
                    dom.alpha[k] = torch.where(_expand(better, a), a.detach(), dom.alpha[k]) if k in dom.alpha \
                        else a.detach().clone()
                for z, b in betas.items():
                    dom.beta[z] = torch.where(_expand(better, b), b.detach(), dom.beta[z])
                best_rec = rec
                if opt is None or it == iteration or self.elapsed() > self.opts.timeout:
                    break  # (past the timeout: the bounds so far are valid, the caller stops)
                # only rows not yet refuted still need to improve
                loss = -(lb * (best <= self.prob.d).to(lb)).sum()
                if not loss.requires_grad:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    for k, (a, _) in alphas.items():
                        a.clamp_(*ranges[k])
                    for b in betas.values():
                        b.clamp_(min=0)
        if refine:  # (kFSB's probes are not counted as domains)
            self.n_bounded += N
        # an empty domain holds vacuously
        dom.lb = torch.where(empty.unsqueeze(1), torch.full_like(best, math.inf), best)
        # the corner of the box minimising each row's linear lower bound (last iterate)
        A_x = to_dense(best_rec[inp][0]).detach() if best_rec.get(inp) is not None else None
        corners = None
        if A_x is not None:
            xl = self.prob.x_L.expand_as(A_x[:, 0])
            xu = self.prob.x_U.expand_as(A_x[:, 0])
            corners = torch.where(A_x > 0, xl.unsqueeze(1), xu.unsqueeze(1)).flatten(0, 1)
        A_relu = {z: to_dense(best_rec[self.relus[z]][0]).detach() for z in self.relus
                  if best_rec.get(self.relus[z]) is not None} if record_relu else None
        return A_relu, corners, state

    # ---------------------------------------------------------------- branching
    def scores(self, dom: _Domains, A_relu: dict[str, Tensor]) -> tuple[Tensor, list[tuple[str, int, int]]]:
        """(N, n_neurons) BaBSR-style scores over the flat concatenation of split nodes (-inf where
        not splittable) and the (node, start, size) layout."""
        open_rows = (dom.lb <= self.prob.d).to(dom.lb)  # (N, rows) rows that are not refuted yet
        out, layout, off = [], [], 0
        for z in self.relus:
            l, u = dom.lower[z].flatten(1), dom.upper[z].flatten(1)
            free = (l < 0) & (u > 0) & (dom.sign[z].flatten(1) == 0)
            A = A_relu.get(z) if A_relu else None
            if A is None:
                a = torch.zeros_like(l)
            else:
                a = (A.flatten(2) * open_rows.unsqueeze(-1)).sum(1)
            # Gap of the triangle relaxation at z = 0, -l·u/(u - l), weighted by the neuron's
            # coefficient in the bound (the BaBSR intercept term, Bunel et al. 2020, eq. 9), plus a
            # tie-breaker by the width so that neurons with zero coefficient are still ordered.
            gap = torch.where(free, -l * u / torch.where(free, u - l, torch.ones_like(u)), torch.zeros_like(u))
            s = a.abs() * gap + 1e-6 * gap
            out.append(torch.where(free, s, torch.full_like(s, -math.inf)))
            layout.append((z, off, l.shape[1]))
            off += l.shape[1]
        return torch.cat(out, 1), layout

    def children(self, dom: _Domains, idx: Tensor, layout) -> _Domains:
        """Both children of domain i split at flat neuron idx[i]: active first, then inactive."""
        N = len(dom)
        kids = _Domains.cat([dom, dom])
        kids.depth = kids.depth + 1
        for z, off, size in layout:
            hit = (idx >= off) & (idx < off + size)
            if not bool(hit.any()):
                continue
            r = torch.nonzero(hit).flatten()
            j = idx[r] - off
            for half, s in ((0, 1), (1, -1)):
                rows = r + half * N
                lo = kids.lower[z].flatten(1).clone()
                up = kids.upper[z].flatten(1).clone()
                sg = kids.sign[z].flatten(1).clone()
                if s > 0:
                    lo[rows, j] = torch.clamp(lo[rows, j], min=0)
                else:
                    up[rows, j] = torch.clamp(up[rows, j], max=0)
                sg[rows, j] = s
                kids.lower[z] = lo.view_as(kids.lower[z])
                kids.upper[z] = up.view_as(kids.upper[z])
                kids.sign[z] = sg.view_as(kids.sign[z]).to(kids.sign[z].dtype)
        return kids

    def choose(self, dom: _Domains, A_relu) -> tuple[Optional[Tensor], Tensor]:
        """The flat neuron to split per domain (kFSB or BaBSR); mask of domains with none left."""
        sc, layout = self.scores(dom, A_relu)
        none_left = torch.isneginf(sc).all(1)
        k = min(self.opts.kfsb_k, sc.shape[1]) if self.opts.branching == "kfsb" else 1
        top = sc.topk(k, 1).indices  # (N, k)
        if k == 1:
            return top[:, 0], none_left, layout
        # kFSB: bound both children of every candidate with the parent's α, β (no steps) and keep
        # the candidate whose worse child is best.
        N = len(dom)
        rep = dom.take(torch.arange(N, device=top.device).repeat_interleave(k))
        cand = top.flatten()
        kids = self.children(rep, cand, layout)
        kids.lb = torch.full_like(kids.lb, -math.inf)
        self.bound(kids, 0, record_relu=False, refine=False)
        m = self.prob.margins(kids.lb).min(1).values            # (2·N·k,)
        worst = torch.minimum(m[: N * k], m[N * k:]).view(N, k)
        worst = torch.where(torch.isneginf(sc.gather(1, top)), torch.full_like(worst, -math.inf), worst)
        pick = worst.argmax(1)
        return top[torch.arange(N), pick], none_left, layout

    # ---------------------------------------------------------------- LP for fully split domains
    def lp_decide(self, dom: _Domains, i: int) -> Optional[bool]:
        """A domain with every unstable neuron split is linear on its region: min of each row over
        {x in box, s·z(x) ≥ 0 at split neurons} by scipy's HiGHS.  True: refuted (no
        counterexample), False: a counterexample exists (checked by the caller), None: unsolved."""
        try:
            from scipy.optimize import linprog
        except ImportError:  # pragma: no cover
            return None
        one = dom.take(torch.tensor([i], device=dom.lb.device))
        fixed = {z: (one.lower[z], one.upper[z]) for z in one.lower}
        net = self.net
        state = net.prepare((self._inputs(1),), intermediate_bounds=fixed)
        net.interval_pass(state, refine=False)
        inp = net.input_names[0]
        x_L = self.prob.x_L.flatten().double().cpu().numpy()
        x_U = self.prob.x_U.flatten().double().cpu().numpy()
        xc = self.x0.flatten().double()
        rad = ((self.prob.x_U - self.prob.x_L) / 2).flatten().double()

        def linear(name_rows):  # (A (rows, n_in), c (rows,)) of exactly-linear functions on the domain
            A, c = name_rows
            return A.double().cpu().numpy(), c.double().cpu().numpy()

        def affine_of(fn) -> tuple[Tensor, Tensor]:
            rec = {inp: None}
            lb = fn(rec)
            if rec[inp] is None or rec[inp][0] is None:  # no linear dependence on x (a constant bound)
                A = torch.zeros(lb.shape[1], xc.numel(), dtype=torch.float64, device=xc.device)
            else:
                A = to_dense(rec[inp][0]).detach().flatten(2)[0].double()
            # lb = A·xc - |A|·rad + c  (the concretization of an L∞ box)
            c = lb.detach()[0].double() - A @ xc + A.abs() @ rad
            return A, c

        A_ub, b_ub = [], []
        for z in self.relus:
            sg = one.sign[z].flatten()
            split = torch.nonzero(sg != 0).flatten()
            if split.numel() == 0:
                continue
            A, c = affine_of(lambda rec: _node_lower_with_record(net, state, z, split, rec))
            s = sg[split].double().cpu().numpy()[:, None]
            A, c = linear((A, c))
            A_ub.append(-s * A)           # s·(A x + c) >= 0  <=>  -s·A x <= s·c
            b_ub.append((s[:, 0] * c))
        import numpy as np
        A_ub = np.concatenate(A_ub) if A_ub else None
        b_ub = np.concatenate(b_ub) if b_ub else None
        Cx, cc = affine_of(lambda rec: net.output_bounds(state, self.prob.C, True, False, record=rec)[0])
        Cx, cc = linear((Cx, cc))
        d = self.prob.d.double().cpu().numpy()
        for g in self.prob.groups:
            # the group is unsafe where all its rows are <= d: a feasibility LP
            A_g = np.concatenate([A_ub, Cx[g]]) if A_ub is not None else Cx[g]
            b_g = np.concatenate([b_ub, d[g] - cc[g]]) if b_ub is not None else d[g] - cc[g]
            res = linprog(np.zeros(Cx.shape[1]), A_ub=A_g, b_ub=b_g, bounds=list(zip(x_L, x_U)), method="highs")
            if res.status == 0:
                self.lp_point = torch.tensor(res.x, dtype=self.prob.x_L.dtype,
                                             device=self.prob.x_L.device).view_as(self.prob.x_L)
                return False
            if res.status != 2:  # not "infeasible": numerical trouble
                return None
        return True

    def proved_bound(self) -> float:
        """The verified lower bound of the worst group margin: the least margin of a refuted domain
        (domains refuted by the LP or as empty have no margin: the smallest positive float)."""
        return self.proved_min if math.isfinite(self.proved_min) and self.proved_min > 0 else \
            float(torch.finfo(torch.float64).tiny)

    # ---------------------------------------------------------------- main loop
    def run(self) -> BaBResult:
        o, prob = self.opts, self.prob

        def done(status, lb, stage, msg="", cex=None):
            r = BaBResult(status, float(lb), self.elapsed(), self.n_bounded, self.max_depth, stage=stage, message=msg)
            if cex is not None:
                r.counterexample, r.output = cex
            return r

        self.max_depth = 0
        self.proved_min = math.inf
        hit = _check(self.model, prob, torch.cat([self.x0, prob.x_L, prob.x_U]))
        if hit is not None:
            return done("falsified", -math.inf, "attack", "the centre or a corner of the box violates the property", hit)
        x = _box_pgd(self.model, prob, None, o.pgd_steps, o.pgd_restarts)
        if x is not None and (hit := _check(self.model, prob, x)) is not None:
            return done("falsified", -math.inf, "attack", "PGD found a counterexample", hit)
        # root: CROWN intermediate bounds, then α optimization of the output rows
        N0 = 1
        _, _, root_state = self.net.compute_bounds(x=(self._inputs(N0),), C=prob.C,
                                                   method="alpha-CROWN" if o.root_alpha else "CROWN",
                                                   bound_upper=False, return_state=True)
        inter = root_state.intermediate()
        missing = [z for z in self.relus if z not in inter]
        if missing:
            raise ValueError(f"no bounds for ReLU inputs {missing}")
        dev = prob.x_L.device
        dom = _Domains({z: inter[z][0].detach() for z in self.relus}, {z: inter[z][1].detach() for z in self.relus},
                       {z: torch.zeros_like(inter[z][0], dtype=torch.int8) for z in self.relus},
                       torch.full((1, self.rows), -math.inf, dtype=prob.C.dtype, device=dev), {},
                       {z: torch.zeros(1, self.rows, *inter[z][0].shape[1:], dtype=prob.C.dtype, device=dev)
                        for z in self.relus},
                       torch.zeros(1, dtype=torch.long, device=dev))
        A_relu, corners, _ = self.bound(dom, o.iteration)
        margin = prob.margins(dom.lb).min(1).values
        if bool(margin[0] > 0):
            return done("verified", margin[0], "root", "α-CROWN at the root")
        if corners is not None and (hit := _check(self.model, prob, corners)) is not None:
            return done("falsified", -math.inf, "root", "the minimiser of the root bound violates the property", hit)
        pending = dom          # domains not refuted, with the A of their last bound
        pending_A = A_relu
        rounds = 0
        while True:
            if self.elapsed() > o.timeout:
                return done("timeout", prob.margins(pending.lb).min(1).values.min(), "bab",
                            f"{len(pending)} domains left after {rounds} rounds")
            if len(pending) > o.max_domains:
                return done("unknown", prob.margins(pending.lb).min(1).values.min(), "bab",
                            f"more than max_domains={o.max_domains} domains")
            rounds += 1
            # the weakest domains first
            worst = prob.margins(pending.lb).min(1).values
            order = worst.argsort()
            take, keep = order[: max(1, o.batch_domains // 2)], order[max(1, o.batch_domains // 2):]
            batch = pending.take(take)
            batch_A = {z: A[take] for z, A in pending_A.items()}
            rest = pending.take(keep)
            rest_A = {z: A[keep] for z, A in pending_A.items()}
            idx, none_left, layout = self.choose(batch, batch_A)
            if self.elapsed() > o.timeout:
                return done("timeout", worst.min(), "bab", f"{len(pending)} domains left after {rounds} rounds")
            if bool(none_left.any()):
                # every unstable neuron split: the domain is linear on its region
                for i in torch.nonzero(none_left).flatten().tolist():
                    verdict = self.lp_decide(batch, i) if o.lp else None
                    if verdict is False:
                        hit = _check(self.model, prob, self.lp_point)
                        if hit is not None:
                            return done("falsified", -math.inf, "lp", "the LP's minimiser violates the property", hit)
                        verdict = None  # LP point does not reproduce (rounding): cannot decide
                    if verdict is None:
                        return done("unknown", worst.min(), "lp",
                                    "a fully split domain could not be decided" + ("" if o.lp else " (lp=False)"))
                keep_b = torch.nonzero(~none_left).flatten()
                batch, idx = batch.take(keep_b), idx[keep_b]
                batch_A = {z: A[keep_b] for z, A in batch_A.items()}
            if len(batch) == 0:
                pending, pending_A = rest, rest_A
                if len(pending) == 0:
                    return done("verified", self.proved_bound(), "bab", f"every domain refuted ({rounds} rounds)")
                continue
            kids = self.children(batch, idx, layout)
            self.max_depth = max(self.max_depth, int(kids.depth.max()))
            # a child's region lies in its parent's: it keeps the parent's bound as a floor
            A_k, corners, _ = self.bound(kids, o.iteration)
            if corners is not None and (hit := _check(self.model, prob, corners)) is not None:
                return done("falsified", -math.inf, "bab", "the minimiser of a domain's bound violates the property", hit)
            kid_margin = prob.margins(kids.lb).min(1).values
            alive = kid_margin <= 0
            if bool((~alive).any()):
                self.proved_min = min(self.proved_min, float(kid_margin[~alive].min()))
            a_idx = torch.nonzero(alive).flatten()
            kids = kids.take(a_idx)
            A_k = {z: A[a_idx] for z, A in A_k.items()}
            pending = _Domains.cat([rest, kids]) if len(rest) and len(kids) else (kids if len(kids) else rest)
            pending_A = {z: torch.cat([rest_A[z], A_k[z]]) for z in A_k} if len(rest) and len(kids) else \
                (A_k if len(kids) else rest_A)
            if o.verbose:
                print(f"[bab] round {rounds}: {len(pending)} domains, lower bound "
                      f"{float(prob.margins(pending.lb).min(1).values.min()) if len(pending) else 0:.4g}, "
                      f"{self.n_bounded} bounded, {self.elapsed():.1f} s", flush=True)
            if len(pending) == 0:
                return done("verified", self.proved_bound(), "bab", f"every domain refuted ({rounds} rounds)")
            if o.pgd_every and rounds % o.pgd_every == 0 and corners is not None:
                x = _box_pgd(self.model, prob, corners[: 4 * self.rows], max(10, o.pgd_steps // 4), 1)
                if x is not None and (hit := _check(self.model, prob, x)) is not None:
                    return done("falsified", -math.inf, "attack", "PGD during the search found a counterexample", hit)


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    """(N, rows) mask broadcast to (N, rows, *shape)."""
    return mask.view(*mask.shape, *([1] * (like.dim() - 2)))


def _node_lower_with_record(net: "BoundedModule", state, name: str, rows: Tensor, record: dict) -> Tensor:
    """Lower CROWN bound of chosen flat neurons of a node, recording the coefficients at the input."""
    v = state.values[name].value
    B, shape = v.shape[0], tuple(v.shape[1:])
    numel = math.prod(shape)

    def identity(start, stop):
        r = rows[start:stop]
        A0 = torch.zeros(B, r.numel(), numel, dtype=v.dtype, device=v.device)
        A0[:, torch.arange(r.numel(), device=v.device), r] = 1.0
        return A0.view(B, r.numel(), *shape)

    lb, _ = net.chunked_backward(state, name, rows.numel(), identity, True, False, None, None, record)
    return lb


def bab_verify(net: "BoundedModule", x_L: Tensor, x_U: Tensor, C: Tensor, d: Optional[Tensor] = None,
               groups: Optional[Sequence[Sequence[int]]] = None, options: Optional[Any] = None) -> BaBResult:
    """Decide ``C @ f(x) > d`` (one row per group suffices) for all x in [x_L, x_U] by branch and
    bound with β-CROWN bounds; see the module docstring.  ``options``: `BaBOptions` or a dict."""
    opts = options if isinstance(options, BaBOptions) else BaBOptions.from_dict(options)
    prob = VerificationProblem.make(x_L, x_U, C, d, groups)
    search = _Search(net, prob, opts)
    with torch.no_grad():
        return search.run()
