"""Verification of text classifiers against word substitutions: clean accuracy, the word-substitution
attack (an upper bound of robust accuracy) and certified accuracy per budget, with the same cascade,
limits, tables and CSV as images (`certtrain.verification.run_verification`).

    from certtrain.text_verification import verify_text_dataset
    res = verify_text_dataset(module.net, datamodule.test_dataloader(), budget=3, methods=["IBP", "CROWN-IBP"])

The set is always the real one (candidates at their own embeddings); a certificate at budget b
holds for every sentence with at most b substitutions from the data module's synonym table.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .bounds import BoundedModule, BoundedTensor, PerturbationSynonym
from .losses import margin_spec
from .text_module import check_text_model, embed_batch
from .threat import check_budget
from .verification import METHODS, VerificationResult, VerificationTask, canonical_method, run_verification
from .word_attack import word_substitution_attack

__all__ = ["AttackCache", "SynonymTask", "verify_text_dataset"]


class AttackCache:
    """One word-substitution search at the largest budget, reused for every smaller one: the first b
    steps of the search are the search of budget b (`certtrain.word_attack`), so "broken within b
    substitutions" is read off the longer search."""

    def __init__(self, budget: int, beam: int = 1):
        self.budget, self.beam = check_budget("budget", budget), beam
        self._store: dict[str, Tensor] = {}

    def broken_at(self, model: nn.Module, ids: Tensor, cands: Tensor, y: Tensor) -> Tensor:
        h = hashlib.sha1()
        for t in (ids, cands, y):
            h.update(t.detach().cpu().numpy().tobytes())
        key = h.hexdigest()
        if key not in self._store:
            self._store[key] = word_substitution_attack(model, ids, cands, y, self.budget, beam=self.beam).broken_at
        return self._store[key]


class SynonymTask(VerificationTask):
    """Word substitutions with at most ``budget`` words changed, for a text model (``embedding`` +
    ``encoder``); the attack is the beam search of `certtrain.word_attack` (``attack=False``: none)."""

    radius_name = "budget"
    attack_name = "attack"

    def __init__(self, model: nn.Module, budget: int, beam: int = 1, attack: bool = True,
                 bound_opts: Mapping[str, Any] | None = None, cache: AttackCache | None = None):
        check_text_model(model)
        if cache is not None and (cache.budget < budget or cache.beam != beam):
            raise ValueError(f"the attack cache searched {cache.budget} substitutions with beam {cache.beam}; "
                             f"budget {budget} with beam {beam} needs its own")
        self.cache = cache
        self.model, self.budget = model, check_budget("budget", budget)
        if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
            raise ValueError(f"beam must be an integer >= 1, got {beam!r}")
        self.beam, self.run_attack = beam, bool(attack)
        self.eps, self.norm = float(self.budget), "synonym"
        self.bound_opts = dict(bound_opts or {})
        self.bounded: BoundedModule | None = None

    def inputs(self, batch, device):
        (ids, cands), y = batch
        return (ids.to(device), cands.to(device)), y.to(device).long()

    def take(self, x, idx):
        return x[0][idx], x[1][idx]

    def logits(self, x) -> Tensor:
        return self.model(x[0])

    def attack(self, x, y):
        if not self.run_attack:
            return None
        if self.cache is not None:
            return self.cache.broken_at(self.model, x[0], x[1], y) > self.budget
        return word_substitution_attack(self.model, x[0], x[1], y, self.budget, beam=self.beam).robust(self.budget)

    def exact(self) -> bool:
        return self.budget == 0

    def bounds(self, x, y, method, num_classes, optimize_bound_args):
        method = canonical_method(method)
        emb, mask, cand, has = embed_batch(self.model, *x)
        if self.bounded is None:
            self.bounded = BoundedModule(self.model.encoder, (emb[:1], mask[:1]), bound_opts=self.bound_opts)
        ptb = PerturbationSynonym(self.budget, cand, has)  # the real candidates: eps = 1
        kwargs: dict[str, Any] = {}
        if method == "alpha-CROWN" and optimize_bound_args:
            kwargs["optimize_bound_args"] = dict(optimize_bound_args)
        C = margin_spec(y, num_classes).to(emb.dtype)
        with torch.no_grad():
            lb, _ = self.bounded.compute_bounds(x=(BoundedTensor(emb, ptb), mask), method=method, C=C,
                                                bound_upper=False, **kwargs)
        return lb

    def attack_label(self) -> str:
        if not self.run_attack:
            return "no attack"
        return f"word substitutions ({'greedy' if self.beam == 1 else f'beam {self.beam}'})"

    def describe(self) -> dict[str, Any]:
        return {"budget": self.budget, "beam": self.beam}


def verify_text_dataset(model: nn.Module, loader: Iterable[Sequence[Any]], budget: int,
                        methods: Sequence[str] = METHODS, *, beam: int = 1, attack: bool = True,
                        num_classes: int | None = None, bound_opts: Mapping[str, Any] | None = None,
                        cache: AttackCache | None = None, **kwargs: Any) -> VerificationResult:
    """Clean, attacked and certified accuracy of a text ``model`` at one ``budget`` (words substituted);
    ``loader`` yields ``((ids, cands), y)``; other options as `certtrain.verification.verify_dataset`
    (``alone``, ``device``, ``method_batch_size``, ``max_samples``, ``time_limit``, ``optimize_bound_args``,
    ``seed``, ``progress``, ``desc``).  The result's ``eps`` is the budget.  ``cache``: an
    `AttackCache` shared by the calls for several budgets (one search at the largest)."""
    task = SynonymTask(model, budget, beam, attack, bound_opts, cache)
    return run_verification(task, model, loader, methods, num_classes=num_classes, **kwargs)
