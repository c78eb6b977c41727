"""The wrapper shared by the text classifiers: token embedding lookup outside, a traceable encoder inside.

Certified robustness to word substitutions (Jia et al. 2019, Xu et al. 2020 / auto_LiRPA's language
experiments) perturbs the *embeddings* of a sentence, so the lookup ``ids -> embeddings`` is not part of
the bounded graph. A text model is therefore split into an ``nn.Embedding`` and an encoder
``(emb (B, T, D) float, mask (B, T) float 1/0) -> logits (B, num_classes)``; the bound engine traces the
encoder (torch.fx), with ``emb`` perturbed and ``mask`` a plain, constant input::

    emb, mask = model.embed(ids)                          # ids: (B, T) long, T <= max_len
    net = BoundedModule(model.encoder, (emb, mask))
    lb, ub = net.compute_bounds(x=(BoundedTensor(emb, ptb), mask), method="CROWN")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TextClassifier", "check_encoder_inputs", "positive_int"]


def positive_int(value: object, name: str) -> int:
    """``int(value)``, which must be >= 1 (ValueError naming ``name`` otherwise)."""
    if isinstance(value, bool) or int(value) != value or int(value) < 1:  # type: ignore[call-overload]
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_encoder_inputs(emb: torch.Tensor, mask: torch.Tensor, max_len: int, embed_dim: int) -> None:
    """Shape checks of an encoder's inputs, made in eager mode only.

    Under ``torch.fx`` tracing the inputs are Proxies whose shapes are unknown, and nothing is checked
    (nor recorded in the graph); the bound engine checks its inputs' shapes against the traced ones.
    """
    if isinstance(emb, torch.fx.Proxy) or isinstance(mask, torch.fx.Proxy):
        return
    if emb.dim() != 3 or emb.shape[1:] != (max_len, embed_dim):
        raise ValueError(
            f"emb must have shape (batch, max_len={max_len}, embed_dim={embed_dim}), got {tuple(emb.shape)}"
            " (pad shorter sentences to max_len; TextClassifier.forward / embed do that for token ids)"
        )
    if mask.shape != emb.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(emb.shape[:2])} (batch, max_len), got {tuple(mask.shape)}")
    if not mask.is_floating_point():
        raise ValueError(f"mask must be a float tensor of 1 (token) / 0 (padding), got {mask.dtype}")


class TextClassifier(nn.Module):
    """``forward(ids) = encoder(embedding(ids), (ids != pad_id))``: token ids (B, T) -> logits (B, num_classes).

    ``embedding`` is an ``nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)``; ``encoder`` maps
    ``(emb (B, max_len, embed_dim), mask (B, max_len))`` to logits and is what the bound engine traces.
    Sentences shorter than ``max_len`` are padded with ``pad_id`` on the right (longer ones are refused);
    padded positions never change the output. Attributes: ``vocab_size``, ``num_classes``, ``max_len``,
    ``embed_dim``, ``pad_id``.
    """

    def __init__(
        self, embedding: nn.Embedding, encoder: nn.Module, num_classes: int, max_len: int, pad_id: int
    ) -> None:
        super().__init__()
        if embedding.padding_idx != pad_id:
            raise ValueError(f"embedding.padding_idx={embedding.padding_idx} differs from pad_id={pad_id}")
        self.embedding = embedding
        self.encoder = encoder
        self.vocab_size = int(embedding.num_embeddings)
        self.embed_dim = int(embedding.embedding_dim)
        self.num_classes = int(num_classes)
        self.max_len = int(max_len)
        self.pad_id = int(pad_id)

    def pad(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` (B, T) with T <= max_len, padded on the right with ``pad_id`` to (B, max_len)."""
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"ids must be a (batch, length) integer tensor, got {tuple(ids.shape)} {ids.dtype}")
        n = ids.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len={self.max_len}")
        return F.pad(ids, (0, self.max_len - n), value=self.pad_id) if n < self.max_len else ids

    def embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's inputs for token ids: ``(emb (B, max_len, D), mask (B, max_len))``, mask 1 at
        tokens and 0 at ``pad_id``, in the embedding's dtype."""
        ids = self.pad(ids)
        emb = self.embedding(ids)
        return emb, (ids != self.pad_id).to(emb.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb, mask = self.embed(ids)
        return self.encoder(emb, mask)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, max_len={self.max_len}, pad_id={self.pad_id}"
