"""Perturbation sets around an input.

The graph walk needs only these from a perturbation (Xu et al. 2020, Sec. 3.1), so new sets
(L0 budgets, synonym substitutions, weight balls) plug in without touching it:

* ``interval(x0)``: a box [lower, upper] that contains the set, where IBP starts;
* ``concretize(x0, A, sign)``: the exact minimum (sign=-1) or maximum (sign=+1) over the set of
  the linear functions ``A x`` (one per row of A), where CROWN ends;
* ``image(x0)`` (optional): the set itself as it travels to the first Linear / Conv, which then
  bounds ``W x + b`` over the set exactly instead of over the box (`certtrain.bounds.set_image`);
  any auxiliary data the set needs rides in it.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .patches import LinearA, a_dot, a_flat, a_map, to_dense
from .set_image import L0Image, LpImage, SetImage, SynonymImage

Number = Union[float, int]


class Perturbation:
    """Base class: a set of inputs around a clean input x0."""

    #: The set is exactly its `interval` (a box): IBP of an affine map of it is exact.
    is_box: bool = False

    def interval(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def concretize(self, x0: Tensor, A: LinearA, sign: int) -> Tensor:
        raise NotImplementedError

    def image(self, x0: Tensor) -> Optional[SetImage]:
        """The set for the first Linear / Conv to bound exactly (None: the box is all IBP uses)."""
        return None

    def validate(self, x0: Tensor) -> None:
        """Raise ValueError on settings that cannot describe a set around x0."""


def _as_tensor(v, like: Tensor) -> Optional[Tensor]:
    if v is None:
        return None
    return torch.as_tensor(v, dtype=like.dtype, device=like.device)


class PerturbationLpNorm(Perturbation):
    """The Lp ball ``{x : ||x - x0||_p <= eps}`` (p = inf, 2 or 1), per example.

    For p = inf, ``eps`` may be a scalar or a tensor broadcastable to x0 (per-element radius), and
    the optional ``x_L``/``x_U`` give an elementwise domain (e.g. pixel range [0, 1]): the set is
    the box ``[max(x0 - eps, x_L), min(x0 + eps, x_U)]``.  For p = 2 and 1 the ball is taken whole
    (a domain only narrows the IBP box, which stays sound).
    """

    def __init__(self, eps: Union[Number, Tensor] = 0.0, norm: Number = math.inf,
                 x_L: Union[Number, Tensor, None] = None, x_U: Union[Number, Tensor, None] = None):
        norm = float(norm)
        if norm not in (math.inf, 2.0, 1.0):
            raise ValueError(f"PerturbationLpNorm supports norm=inf, 2 or 1, got norm={norm}")
        self.eps, self.norm, self.x_L, self.x_U = eps, norm, x_L, x_U
        # Dual norm q with 1/p + 1/q = 1: max_{||d||_p<=eps} a.d = eps * ||a||_q.
        self.dual_norm = {math.inf: 1.0, 2.0: 2.0, 1.0: math.inf}[norm]

    @property
    def is_box(self) -> bool:  # type: ignore[override]
        return self.norm == math.inf

    def __repr__(self) -> str:
        eps = self.eps if not isinstance(self.eps, Tensor) else f"tensor{tuple(self.eps.shape)}"
        return f"PerturbationLpNorm(norm={self.norm}, eps={eps})"

    def validate(self, x0: Tensor) -> None:
        eps = torch.as_tensor(self.eps)
        if not torch.isfinite(eps).all():
            raise ValueError(f"eps must be finite, got {self.eps}")
        if (eps < 0).any():
            raise ValueError(f"eps must be >= 0, got min eps {eps.min().item()}")
        if self.norm != math.inf and eps.numel() > 1 and eps.numel() != x0.shape[0]:
            raise ValueError("for L2/L1 balls eps must be a scalar or one value per example "
                             f"(shape ({x0.shape[0]},)), got shape {tuple(eps.shape)}")
        if eps.dim() > 0 and self.norm == math.inf:
            try:
                torch.broadcast_shapes(eps.shape, x0.shape)
            except RuntimeError:
                raise ValueError(f"eps of shape {tuple(eps.shape)} does not broadcast to the input "
                                 f"shape {tuple(x0.shape)}") from None
        for name in ("x_L", "x_U"):
            v = getattr(self, name)
            if v is not None:
                v = torch.as_tensor(v)
                if torch.isnan(v).any():
                    raise ValueError(f"{name} contains NaN")
        if self.x_L is not None and self.x_U is not None:
            if (torch.as_tensor(self.x_L) > torch.as_tensor(self.x_U)).any():
                raise ValueError("x_L > x_U somewhere: the input domain is empty")

    def _eps(self, x0: Tensor) -> Tensor:
        eps = _as_tensor(self.eps, x0)
        if self.norm != math.inf and eps.dim() == 1:
            eps = eps.view(-1, *([1] * (x0.dim() - 1)))
        return eps

    def interval(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        eps = self._eps(x0)
        lo, hi = x0 - eps, x0 + eps
        if self.x_L is not None:
            lo = torch.maximum(lo, _as_tensor(self.x_L, x0).expand_as(lo))
        if self.x_U is not None:
            hi = torch.minimum(hi, _as_tensor(self.x_U, x0).expand_as(hi))
        return lo, hi

    def _row_eps(self, x0: Tensor) -> Tensor:
        """Radius of an L2/L1 ball as a scalar or one value per example, shaped (B, 1)."""
        eps = self._eps(x0)
        return eps.reshape(-1, 1) if eps.dim() else eps

    def image(self, x0: Tensor) -> Optional[SetImage]:
        """The L2/L1 ball, eps a scalar or one radius per example of shape (B,) (consumers shape
        it to their own node with `ball_radius`, never by implicit broadcasting); L∞: None (the
        box is the set)."""
        if self.norm == math.inf:
            return None
        eps = self._eps(x0)
        return LpImage(x0, (eps.reshape(-1) if eps.dim() else eps), self.dual_norm)

    def concretize(self, x0: Tensor, A: LinearA, sign: int) -> Tensor:
        if self.norm == math.inf:
            lo, hi = self.interval(x0)
            center, radius = (hi + lo) / 2, (hi - lo) / 2
            return a_dot(A, center) + sign * a_dot(a_map(A, torch.abs), radius)
        norm = a_flat(A).norm(p=self.dual_norm, dim=-1)
        return a_dot(A, x0) + sign * self._row_eps(x0) * norm


class PerturbationL0Norm(Perturbation):
    """At most ``eps`` (an integer k) coordinates of each example changed, each to any value in its
    domain [x_L, x_U] (default [0, 1], the pixel range; give the data's own range otherwise).

    IBP: the box is the whole domain, but the first Linear / Conv is bounded over the set itself
    (each output row: its k largest gains, `set_image.L0Image`); CROWN's concretization is exact
    (the k most negative terms of min(A_j (x_L - x0_j), A_j (x_U - x0_j)))."""

    def __init__(self, eps: int = 1, x_L: Union[Number, Tensor] = 0.0, x_U: Union[Number, Tensor] = 1.0):
        if isinstance(eps, bool) or not float(eps).is_integer() or eps < 0:
            raise ValueError(f"PerturbationL0Norm: eps is a number of coordinates, an integer >= 0; got {eps!r}")
        self.eps, self.x_L, self.x_U = int(eps), x_L, x_U
        self.norm = 0.0

    def __repr__(self) -> str:
        return f"PerturbationL0Norm(eps={self.eps})"

    def validate(self, x0: Tensor) -> None:
        lo, hi = self._domain(x0)
        if torch.isnan(lo).any() or torch.isnan(hi).any():
            raise ValueError("PerturbationL0Norm: x_L / x_U contain NaN")
        if (lo > hi).any():
            raise ValueError("PerturbationL0Norm: x_L > x_U somewhere: the domain is empty")
        if (x0 < lo).any() or (x0 > hi).any():
            raise ValueError("PerturbationL0Norm: the clean input lies outside [x_L, x_U]; give the data's "
                             "own range (e.g. x_L=x.min(), x_U=x.max() after normalization)")

    def _domain(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        return (_as_tensor(self.x_L, x0).expand_as(x0), _as_tensor(self.x_U, x0).expand_as(x0))

    def interval(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        if self.eps == 0:
            return x0, x0
        return self._domain(x0)

    def image(self, x0: Tensor) -> Optional[SetImage]:
        lo, hi = self._domain(x0)
        return L0Image(x0, lo, hi, self.eps)

    def concretize(self, x0: Tensor, A: LinearA, sign: int) -> Tensor:
        A = to_dense(A)
        B, N = A.shape[:2]
        a = A.reshape(B, N, -1)
        lo, hi = self._domain(x0)
        x = x0.reshape(B, 1, -1)
        up, dn = hi.reshape(B, 1, -1) - x, lo.reshape(B, 1, -1) - x
        base = (a * x).sum(-1)
        k = min(self.eps, a.shape[-1])
        if k == 0:
            return base
        if sign > 0:  # the k largest increases
            return base + torch.maximum(a * up, a * dn).topk(k, dim=-1).values.sum(-1)
        return base - (-torch.minimum(a * up, a * dn)).topk(k, dim=-1).values.sum(-1)


class PerturbationSynonym(Perturbation):
    """Word substitutions (Jia et al. 2019; Xu et al. 2020, auto_LiRPA's ``PerturbationSynonym``):
    the input is a sentence's embeddings x0 (B, T, D); the set holds every sentence in which at most
    ``budget`` positions t take the embedding of one of their candidate words instead of x0[:, t].

    ``candidates`` (B, T, K, D): the candidates' embeddings; ``candidate_mask`` (B, T, K) marks the
    real ones (default all).  A position without candidates (padding, unknown or stop words) never
    changes.  ``eps`` in [0, 1] moves every candidate towards the original word,
    ``x0 + eps (c - x0)``: a ramp for the training loss only (``certifies`` is False below 1, and
    verification refuses such a set).

    IBP starts from the box of the candidates at every position, budget-free (loose but valid); a
    Linear applied per token bounds the set itself (`set_image.SynonymImage`).  CROWN's
    concretization is exact for the budget (see `concretize`).
    """

    def __init__(self, budget: int, candidates: Tensor, candidate_mask: Optional[Tensor] = None,
                 eps: Union[float, int] = 1.0):
        if isinstance(budget, bool) or not float(budget).is_integer() or budget < 0:
            raise ValueError(f"PerturbationSynonym: budget is a number of substituted words, an integer >= 0; "
                             f"got {budget!r}")
        if not isinstance(candidates, Tensor) or candidates.dim() != 4:
            raise ValueError("PerturbationSynonym: candidates must be a tensor (batch, positions, K, embedding dim), "
                             f"got {tuple(candidates.shape) if isinstance(candidates, Tensor) else type(candidates).__name__}")
        e = float(eps)
        if not 0.0 <= e <= 1.0:
            raise ValueError(f"PerturbationSynonym: eps interpolates candidates towards the original word and must "
                             f"lie in [0, 1], got {eps!r}")
        self.budget, self.candidates, self.candidate_mask, self.eps = int(budget), candidates, candidate_mask, e
        self.norm = "synonym"

    @property
    def certifies(self) -> bool:
        """Whether the set is the real one (no ramp): only then may its bounds certify anything."""
        return self.eps == 1.0

    def __repr__(self) -> str:
        B, T, K, D = self.candidates.shape
        ramp = f", eps={self.eps:g}" if self.eps != 1.0 else ""
        return f"PerturbationSynonym(budget={self.budget}, candidates=({B}, {T}, {K}, {D}){ramp})"

    def validate(self, x0: Tensor) -> None:
        c, m = self.candidates, self.candidate_mask
        if x0.dim() != 3:
            raise ValueError(f"PerturbationSynonym: the input must be embeddings (batch, positions, dim), got shape "
                             f"{tuple(x0.shape)}")
        if tuple(c.shape[:2]) != tuple(x0.shape[:2]) or c.shape[3] != x0.shape[2]:
            raise ValueError(f"PerturbationSynonym: candidates of shape {tuple(c.shape)} do not fit the input "
                             f"{tuple(x0.shape)}: need ({x0.shape[0]}, {x0.shape[1]}, K, {x0.shape[2]})")
        if m is not None and (not isinstance(m, Tensor) or tuple(m.shape) != tuple(c.shape[:3])):
            raise ValueError(f"PerturbationSynonym: candidate_mask must have shape {tuple(c.shape[:3])}, got "
                             f"{tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__}")
        if c.dtype != x0.dtype or c.device != x0.device:
            raise ValueError(f"PerturbationSynonym: candidates are {c.dtype} on {c.device} but the input is "
                             f"{x0.dtype} on {x0.device}")
        valid = c if m is None else c[m.bool()]
        if not torch.isfinite(valid).all():
            raise ValueError("PerturbationSynonym: candidate embeddings contain NaN or inf")

    def moves(self, x0: Tensor) -> Tensor:
        """(B, T, K, D): candidate minus original embedding (times ``eps``); 0 for a missing candidate,
        which is then the same as keeping the word."""
        d = (self.candidates - x0.unsqueeze(2)) * self.eps
        if self.candidate_mask is not None:
            d = d * self.candidate_mask.unsqueeze(-1).to(d.dtype)
        return d

    def interval(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        if self.budget == 0:
            return x0, x0
        d = self.moves(x0)
        # keeping the word is always allowed: the box holds x0 and every candidate
        return x0 + d.min(2).values.clamp(max=0), x0 + d.max(2).values.clamp(min=0)

    def image(self, x0: Tensor) -> Optional[SetImage]:
        return SynonymImage(x0, self.moves(x0), self.budget)

    def concretize(self, x0: Tensor, A: LinearA, sign: int) -> Tensor:
        """min (sign -1) / max (sign +1) of ``A x`` over the set, exactly.

        ``A x = A x0 + sum_t A_t (x_t - x0_t)`` is separable over positions, so the dynamic program
        over positions and spent budget (Xu et al. 2020, App. A.1) has a closed form: position t
        offers its best change g_t = min(0, min_k A_t d_tk) (keeping the word gives 0), and the
        optimum takes the ``budget`` most negative g_t (largest, for the maximum)."""
        A = to_dense(A)
        B, N = A.shape[:2]
        if tuple(A.shape[2:]) != tuple(x0.shape[1:]):
            raise ValueError(f"PerturbationSynonym: coefficients of shape {tuple(A.shape)} for an input of shape "
                             f"{tuple(x0.shape)}")
        base = torch.einsum("bntd,btd->bn", A, x0)
        k = min(self.budget, x0.shape[1])
        if k == 0:
            return base
        g = torch.einsum("bntd,btkd->bntk", A, self.moves(x0))  # (B, N, T, K)
        if sign > 0:
            best = g.max(-1).values.clamp(min=0)
            return base + best.topk(k, dim=-1).values.sum(-1)
        best = g.min(-1).values.clamp(max=0)
        return base - (-best).topk(k, dim=-1).values.sum(-1)
