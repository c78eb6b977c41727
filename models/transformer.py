"""A small Transformer text classifier written out so that torch.fx (and so the bound engine) traces it."""

from __future__ import annotations

import math

import torch
from torch import nn

from .text import TextClassifier, check_encoder_inputs, positive_int

__all__ = [
    "LAYER_NORMS",
    "MeanLayerNorm",
    "SelfAttention",
    "TransformerEncoder",
    "TransformerLayer",
    "transformer",
]

LAYER_NORMS = ("mean", "standard", "none")

# Added to the attention scores of padded keys (BERT's value): exp underflows to exactly 0.
MASK_VALUE = -10000.0


class MeanLayerNorm(nn.Module):
    """Mean-only LayerNorm ``(x - mean(x)) * weight + bias`` over the last dim (Shi et al. 2020).

    Certified training of Transformers drops the division by the standard deviation: it is affine, so
    bounded exactly, whereas bounds through 1/std explode when the std's interval nears 0.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(-1, keepdim=True)) * self.weight + self.bias


def make_norm(kind: str, dim: int) -> nn.Module:
    """``"mean"``: :class:`MeanLayerNorm`, ``"standard"``: ``nn.LayerNorm``, ``"none"``: Identity."""
    if kind == "mean":
        return MeanLayerNorm(dim)
    if kind == "standard":
        return nn.LayerNorm(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"layer_norm must be one of {', '.join(map(repr, LAYER_NORMS))}, got {kind!r}")


class SelfAttention(nn.Module):
    """Multi-head self-attention, explicit: softmax(q kᵀ / sqrt(d_head) + key_bias) v, then a Linear.

    ``key_bias`` (B, 1, 1, T) is 0 at tokens and -10000 at padded keys, so no query attends to padding.
    """

    def __init__(self, dim: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.heads, self.d_head, self.seq_len = heads, dim // heads, seq_len
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, heads, T, d_head)
        return x.reshape(-1, self.seq_len, self.heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d_head) + key_bias
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(-1, self.seq_len, self.heads * self.d_head)
        return self.out(ctx)


class TransformerLayer(nn.Module):
    """Post-LN encoder layer: x = norm1(x + attention(x)); x = norm2(x + Linear(ReLU(Linear(x))))."""

    def __init__(self, dim: int, heads: int, ffn: int, seq_len: int, layer_norm: str) -> None:
        super().__init__()
        self.attention = SelfAttention(dim, heads, seq_len)
        self.norm1 = make_norm(layer_norm, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Linear(ffn, dim))
        self.norm2 = make_norm(layer_norm, dim)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x, key_bias))
        return self.norm2(x + self.ffn(x))


class TransformerEncoder(nn.Module):
    """``(emb (B, T, D), mask (B, T)) -> logits``: + learned positions, layers, masked mean, [pooler,] Linear.

    Padding never reaches the output: the embeddings at padded positions are zeroed first (so what
    enters there is the positional embedding alone, a constant: a perturbation of padded embeddings
    has no effect on the bounds either), every attention layer masks padded keys, and the masked mean
    ``sum_t mask_t x_t / max(sum_t mask_t, 1)`` drops the padded rows. Zeroing matters for the bounds
    of deeper models: without it, a box on padded embeddings widens the IBP bounds of padded rows
    (standard LayerNorm: by orders of magnitude) until the -10000 of the next layer's key mask no
    longer masks them.
    """

    def __init__(
        self, embed_dim: int, num_layers: int, heads: int, ffn: int, max_len: int, num_classes: int,
        layer_norm: str, pooler: bool,
    ) -> None:
        super().__init__()
        self.embed_dim, self.max_len = embed_dim, max_len
        self.position = nn.Parameter(torch.empty(max_len, embed_dim).normal_(std=0.02))
        self.layers = nn.ModuleList(
            TransformerLayer(embed_dim, heads, ffn, max_len, layer_norm) for _ in range(num_layers)
        )
        self.pooler = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh()) if pooler else nn.Identity()
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        check_encoder_inputs(emb, mask, self.max_len, self.embed_dim)
        key_bias = ((1.0 - mask) * MASK_VALUE)[:, None, None, :]  # (B, 1, 1, T), a constant
        weights = (mask / mask.sum(1, keepdim=True).clamp(min=1.0)).unsqueeze(-1)  # (B, T, 1)
        x = emb * mask.unsqueeze(-1) + self.position  # padded positions: the position alone, a constant
        for layer in self.layers:
            x = layer(x, key_bias)
        pooled = (x * weights).sum(1)
        return self.classifier(self.pooler(pooled))


def transformer(
    vocab_size: int = 5000,
    num_classes: int = 2,
    embed_dim: int = 64,
    num_layers: int = 1,
    heads: int = 4,
    ffn: int = 128,
    max_len: int = 32,
    pad_id: int = 0,
    layer_norm: str = "mean",
    pooler: bool = False,
) -> TextClassifier:
    """Transformer sentence classifier as in auto_LiRPA's language experiments (Shi et al. 2020, Xu et al. 2020).

    ``nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)`` (outside the bounded graph), then
    :class:`TransformerEncoder`: learned positional embeddings (max_len, embed_dim) added to the token
    embeddings (zeroed at padded positions); ``num_layers`` post-LN layers, each multi-head
    self-attention (``heads`` heads, Linear q/k/v, scores / sqrt(d_head) + (1 - mask) * -10000, softmax
    over keys, output Linear), residual + norm, FFN Linear(embed_dim, ffn) -> ReLU -> Linear(ffn,
    embed_dim), residual + norm; a masked mean over the tokens, optionally a tanh pooler (Linear + tanh),
    and Linear(embed_dim, num_classes).

    ``layer_norm``: ``"mean"`` (mean-only LayerNorm, the form certified training uses: the variance
    division makes bounds explode), ``"standard"`` (nn.LayerNorm) or ``"none"``.
    Defaults: 355,650 parameters (320,000 of them the embedding).
    """
    vocab_size = positive_int(vocab_size, "vocab_size")
    num_classes = positive_int(num_classes, "num_classes")
    embed_dim = positive_int(embed_dim, "embed_dim")
    num_layers = positive_int(num_layers, "num_layers")
    heads = positive_int(heads, "heads")
    ffn = positive_int(ffn, "ffn")
    max_len = positive_int(max_len, "max_len")
    if embed_dim % heads:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by heads={heads}")
    if layer_norm not in LAYER_NORMS:
        raise ValueError(f"layer_norm must be one of {', '.join(map(repr, LAYER_NORMS))}, got {layer_norm!r}")
    if not 0 <= int(pad_id) < vocab_size:
        raise ValueError(f"pad_id must be in [0, vocab_size={vocab_size}), got {pad_id!r}")
    pad_id = int(pad_id)
    embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
    encoder = TransformerEncoder(embed_dim, num_layers, heads, ffn, max_len, num_classes, layer_norm, bool(pooler))
    return TextClassifier(embedding, encoder, num_classes, max_len, pad_id)
