"""TextCertifiedModule: certified training of text classifiers against word substitutions.

A text model (the zoo's ``lstm`` / ``transformer``) is an ``embedding`` (token ids -> vectors) and an
``encoder`` (embeddings, mask -> logits).  The embedding lookup stays outside the bounded graph: the
perturbation set lives in embedding space (`certtrain.bounds.PerturbationSynonym`, built per batch
from the candidates' embeddings), and gradients of the robust loss still reach the embedding table
through the sentence's and the candidates' vectors.  Batches are ``((ids (B, T), cands (B, T, K)), y)``
as `certtrain_data.text.TextDataModule` yields them (``cands``: candidate token ids, -1 for none).

Everything else (methods, ε ramp, logging, checkpoints) is `CertifiedModule`'s; ε is the ramp of the
candidates towards the original words (0 → 1), the budget is the threat model's.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import Tensor, nn

from .bounds import BoundedModule, BoundedTensor, Perturbation
from .certified_module import CertifiedModule, frozen_bn_stats
from .losses import margin_spec
from .methods import TrainingMethod
from .settings import EvalSettings, OptimSettings
from .threat import SynonymSubstitution, ThreatModel, build_threat
from .word_attack import word_substitution_attack

__all__ = ["TextCertifiedModule", "check_text_model", "embed_batch"]

TextBatch = tuple[Tensor, Tensor]


def check_text_model(model: nn.Module) -> None:
    """ValueError unless ``model`` has the text-model interface (``embedding``, ``encoder``, ``pad_id``)."""
    missing = [a for a in ("embedding", "encoder", "pad_id") if not hasattr(model, a)]
    if missing or not isinstance(model.embedding, nn.Embedding):
        raise ValueError(f"a text model needs an nn.Embedding `embedding`, an `encoder(embeddings, mask)` and "
                         f"`pad_id` (as certtrain_models.lstm / transformer); {type(model).__name__} lacks "
                         f"{', '.join(missing) or 'an nn.Embedding embedding'}")


def embed_batch(model: nn.Module, ids: Tensor, cands: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(embeddings (B, T, D), mask (B, T), candidate embeddings (B, T, K, D), candidate mask (B, T, K))."""
    emb = model.embedding(ids)
    has = cands >= 0
    cand = model.embedding(cands.clamp(min=0))
    mask = (ids != model.pad_id).to(emb.dtype)
    return emb, mask, cand, has


class TextCertifiedModule(CertifiedModule):
    """Certified training of a text classifier (``embedding`` + ``encoder``) against word
    substitutions (`certtrain.threat.SynonymSubstitution`).  Arguments as `CertifiedModule`'s, without
    ``mean`` / ``std``."""

    def __init__(self, model: nn.Module, num_classes: int,
                 method: Union[TrainingMethod, str, Mapping[str, Any]] = "ibp",
                 perturbation: Union[ThreatModel, Mapping[str, Any], None] = None,
                 schedule: Mapping[str, Any] | None = None,
                 optim: Union[OptimSettings, Mapping[str, Any], None] = None,
                 evaluation: Union[EvalSettings, Mapping[str, Any], None] = None,
                 config: Mapping[str, Any] | None = None) -> None:
        check_text_model(model)
        threat = build_threat(perturbation if perturbation is not None else
                              {"_target_": "certtrain.threat.SynonymSubstitution"})
        if not isinstance(threat, SynonymSubstitution):
            raise ValueError(f"a text classifier is trained against word substitutions "
                             f"(perturbation=synonym), got {threat!r}")
        super().__init__(model, None, None, num_classes, method, threat, schedule, optim, evaluation, config)
        self.__dict__["_embedded"] = None

    # ------------------------------------------------------------------ inputs
    def embedded(self, x: TextBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`embed_batch` of this batch, computed once per batch and parameter state (so the engine's
        forward and the bound computation that follows see the same tensors)."""
        ids, cands = x
        w = self.net.embedding.weight
        key = (ids, cands, w._version, torch.is_grad_enabled())
        cached = self.__dict__["_embedded"]
        if cached is not None and all(a is b for a, b in zip(cached[0][:2], key[:2])) and cached[0][2:] == key[2:]:
            return cached[1]
        out = embed_batch(self.net, ids, cands)
        self.__dict__["_embedded"] = (key, out)
        return out

    def forward(self, x: TextBatch) -> Tensor:
        return self.net(x[0])

    def clean_logits(self, x: TextBatch, engine: bool = False) -> Tensor:
        if not engine:
            return self.net(x[0])
        emb, mask, _, _ = self.embedded(x)
        return self.bounded(x)(emb, mask)

    def bounded(self, example: TextBatch) -> BoundedModule:
        """The bound engine around the encoder (inputs: embeddings, mask)."""
        if self.__dict__["_bounded"] is None:
            emb, mask, _, _ = embed_batch(self.net, example[0][:1], example[1][:1])
            was_training = self.net.training
            self.net.eval()
            try:
                self.__dict__["_bounded"] = BoundedModule(self.net.encoder, (emb.detach(), mask),
                                                          bound_opts=self.evaluation.bound_opts)
            finally:
                self.net.train(was_training)
        return self.__dict__["_bounded"]

    def perturbation_at(self, eps: float | Tensor, x: TextBatch | None = None, budget: int | None = None
                        ) -> Perturbation:
        """The word-substitution set of the batch ``x`` at ramp value ``eps`` (budget: the threat's)."""
        if x is None:
            raise ValueError("word-substitution sets are built per batch: perturbation_at(eps, x)")
        _, _, cand, has = self.embedded(x)
        return self.threat.at(eps, cand, has, budget)

    def margin_bounds(self, x: TextBatch, y: Tensor, eps: float | Tensor, method: str = "IBP",
                      keep_intermediate: bool = False, perturbation: Perturbation | None = None,
                      budget: int | None = None) -> Tensor:
        """Lower bounds (B, K-1) of the margins over the sentences with at most ``budget`` (default: the
        threat's) substitutions, candidates at ramp value ``eps``."""
        emb, mask, _, _ = self.embedded(x)
        C = margin_spec(y, self.num_classes).to(emb.dtype)
        ptb = perturbation or self.perturbation_at(eps, x, budget)
        net = self.bounded(x)
        with frozen_bn_stats(self.net):
            lb, _ = net.compute_bounds(x=(BoundedTensor(emb, ptb), mask), method=method, C=C, bound_upper=False,
                                       keep_intermediate=keep_intermediate)
        return lb

    def intermediate_bounds(self) -> tuple[tuple[Tensor, Tensor], list[tuple[Tensor, Tensor]]]:
        """(embedding box, pre-activation boxes) of the last bound call with ``keep_intermediate``."""
        net = self.__dict__["_bounded"]
        inter = net.save_intermediate()
        return inter[net.input_names[0]], [inter[n] for n in net.pre_activation_names() if n in inter]

    def pgd_robust(self, x: TextBatch, y: Tensor, eps: float, steps: int, restarts: int) -> Tensor:
        """Per example: the word-substitution attack (beam search, the threat's budget and beam) finds
        no misclassified sentence; ``steps`` = 0 turns it off (then only the clean prediction counts)."""
        ids, cands = x
        if steps <= 0 or self.threat.budget == 0:
            return self.net(ids).argmax(1) == y
        res = word_substitution_attack(self.net, ids, cands, y, self.threat.budget, beam=self.threat.beam)
        return res.robust(self.threat.budget)

    def first_example(self, x: TextBatch) -> TextBatch:
        return x[0][:1], x[1][:1]

    def adversarial(self, x, y, eps):
        raise RuntimeError("word substitutions have no input-space attack for training; use method=ibp, "
                           "crown_ibp, fast_ibp or natural")
