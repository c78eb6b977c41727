"""Word-substitution attack: beam search over synonym candidates (Alzantot et al. 2018; Jia et al.
2019 use the same greedy form to check certified text classifiers).

An upper bound of the robust accuracy under `PerturbationSynonym`: starting from the sentence, each
step tries every single substitution (a candidate at a position not yet substituted) of each beam
sentence, keeps the ``beam`` sentences of smallest margin z_y - max_{j != y} z_j, and stops at the
first misclassified one.  Step s reaches s substitutions, so one search of ``budget`` steps answers
every budget 1..budget at once (`WordAttackResult.broken_at`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["WordAttackResult", "margins", "word_substitution_attack"]


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """z_y - max_{j != y} z_j per example (negative: misclassified)."""
    z_y = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, y.view(-1, 1), float("-inf"))
    return z_y - others.max(1).values


@dataclass
class WordAttackResult:
    """Per example: the most damaging sentence found (token ids, (B, T)), its margin, and the number
    of substitutions at which the attack first misclassified it (0: already misclassified; a number
    above the budget: never broken)."""

    ids: Tensor
    margin: Tensor
    broken_at: Tensor

    def robust(self, budget: int) -> Tensor:
        """Boolean (B,): no misclassified sentence found with at most ``budget`` substitutions."""
        return self.broken_at > budget


@torch.no_grad()
def word_substitution_attack(logits_fn: Callable[[Tensor], Tensor], ids: Tensor, cands: Tensor, y: Tensor,
                             budget: int, beam: int = 1, chunk: int = 2048) -> WordAttackResult:
    """Beam search for a misclassified sentence with at most ``budget`` substitutions.

    ``logits_fn(ids (N, T)) -> (N, C)``: the classifier on token ids; ``cands`` (B, T, K): the
    candidates' token ids, -1 for none; ``beam``: sentences kept per step (1 = greedy);
    ``chunk``: sentences per forward call.
    """
    if isinstance(budget, bool) or int(budget) != budget or budget < 0:
        raise ValueError(f"budget must be an integer >= 0, got {budget!r}")
    if isinstance(beam, bool) or int(beam) != beam or beam < 1:
        raise ValueError(f"beam must be an integer >= 1, got {beam!r}")
    B, T = ids.shape
    K = cands.shape[2]

    def score(sent: Tensor, labels: Tensor) -> Tensor:
        out = [margins(logits_fn(sent[s:s + chunk]), labels[s:s + chunk]) for s in range(0, len(sent), chunk)]
        return torch.cat(out) if out else sent.new_zeros(0, dtype=torch.float)

    m0 = score(ids, y)
    best_ids, best_m = ids.clone(), m0.clone()
    broken = torch.full((B,), budget + 1, dtype=torch.long, device=ids.device)
    broken[m0 < 0] = 0
    # beams per example: sentences (B, W, T), which positions they changed (B, W, T), margins (B, W)
    sent, used, marg = ids.unsqueeze(1), torch.zeros(B, 1, T, dtype=torch.bool, device=ids.device), m0.unsqueeze(1)
    has = cands >= 0                                                   # (B, T, K)
    for step in range(1, int(budget) + 1):
        live = (broken > budget).nonzero().flatten()
        if len(live) == 0:
            break
        W = sent.shape[1]
        s, u = sent[live], used[live]                                  # (L, W, T)
        # every single substitution of every beam sentence: (L, W, T, K)
        ok = has[live].unsqueeze(1) & ~u.unsqueeze(-1) & torch.isfinite(marg[live]).view(-1, W, 1, 1)
        L = len(live)
        li, wi, ti, ki = ok.nonzero(as_tuple=True)
        if len(li) == 0:
            break
        new = s[li, wi].clone()                                        # (M, T)
        new[torch.arange(len(li), device=ids.device), ti] = cands[live[li], ti, ki]
        m = score(new, y[live[li]])
        # keep the `beam` lowest margins per example
        table = torch.full((L, W * T * K), float("inf"), dtype=m.dtype, device=ids.device)
        flat = ((wi * T + ti) * K + ki)
        table[li, flat] = m
        width = min(beam, table.shape[1])
        top_m, top_i = table.topk(width, dim=1, largest=False)        # (L, width)
        found = torch.isfinite(top_m)
        # rows of `new` behind each kept entry
        row_of = torch.full((L, W * T * K), -1, dtype=torch.long, device=ids.device)
        row_of[li, flat] = torch.arange(len(li), device=ids.device)
        rows = row_of.gather(1, top_i).clamp(min=0)                    # (L, width)
        nsent = new[rows]                                              # (L, width, T)
        nused = u[torch.arange(L, device=ids.device).unsqueeze(1), top_i // (T * K)].clone()
        nused[torch.arange(L, device=ids.device).unsqueeze(1), torch.arange(width, device=ids.device),
              (top_i // K) % T] = True
        nmarg = torch.where(found, top_m, torch.full_like(top_m, float("inf")))
        # best sentence so far
        first = nmarg[:, 0]
        better = found[:, 0] & (first < best_m[live])
        best_ids[live[better]] = nsent[better, 0]
        best_m[live[better]] = first[better]
        hit = found[:, 0] & (first < 0)
        broken[live[hit]] = step
        # the next step's beams (examples not yet broken keep going; others are frozen)
        if width != W:
            pad = width - W
            if pad > 0:
                sent = torch.cat([sent, sent[:, :1].expand(-1, pad, -1)], 1)
                used = torch.cat([used, used[:, :1].expand(-1, pad, -1)], 1)
                marg = torch.cat([marg, torch.full((B, pad), float("inf"), dtype=marg.dtype, device=marg.device)], 1)
        sent, used, marg = sent.clone(), used.clone(), marg.clone()
        sent[live], used[live], marg[live] = nsent, nused, nmarg
    return WordAttackResult(best_ids, best_m, broken)
