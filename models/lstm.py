"""An LSTM text classifier written out so that torch.fx (and so the bound engine) traces it."""

from __future__ import annotations

import torch
from torch import nn

from .text import TextClassifier, check_encoder_inputs, positive_int

__all__ = ["LSTMEncoder", "lstm"]


class LSTMEncoder(nn.Module):
    """``(emb (B, T, D), mask (B, T)) -> logits``: an LSTM over the T = ``max_len`` steps, then a Linear.

    The cell is nn.LSTMCell's, with its gate order (i, f, g, o) and weights
    ``input_gates.weight`` = ``weight_ih``, ``hidden_gates.weight`` = ``weight_hh`` and one bias
    ``input_gates.bias`` = ``bias_ih + bias_hh``::

        i, f, g, o = split(W_x x_t + b + W_h h)      (W_x x_t + b for all steps at once: one Linear)
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(c')
        c = m_t * c' + (1 - m_t) * c,   h = m_t * h' + (1 - m_t) * h      (m_t = mask[:, t], 1 or 0)

    so a padded step (m_t = 0) leaves the state exactly as it is, wherever the padding is. The update
    is the masked update ``h + m_t * (h' - h)`` written as a convex combination: the same value and the
    same CROWN bounds (both are linear in h, h' for the constant m_t), but interval arithmetic sees
    ``h`` once instead of twice. In the ``h + m_t * (h' - h)`` form IBP adds h's interval width twice at
    every real step, so IBP bounds grow like 2^T (measured: 60-75 times wider at T = 6-7, width 5-6;
    the CROWN bounds are identical).

    The state starts at zero: the first step has no ``W_h h`` and ``f * c`` terms (they are 0), so the
    graph builds no zero tensors. The time loop is a Python loop over the fixed ``max_len`` steps,
    which fx unrolls (nn.LSTM runs it in one kernel, which no tracer can see into).

    The classifier reads the **final hidden state**, not a mean of the hidden states: with the masked
    update it is exactly the state after the last real token, whatever the padding; it is the usual
    LSTM sentence classifier; and it needs no division by the sentence length. (auto_LiRPA's language
    LSTM is bidirectional and averages the states of all steps, padded ones included, so its output
    depends on the amount of padding.)
    """

    def __init__(self, embed_dim: int, hidden: int, max_len: int, num_classes: int) -> None:
        super().__init__()
        self.embed_dim, self.hidden, self.max_len = embed_dim, hidden, max_len
        self.input_gates = nn.Linear(embed_dim, 4 * hidden)
        self.hidden_gates = nn.Linear(hidden, 4 * hidden, bias=False)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        check_encoder_inputs(emb, mask, self.max_len, self.embed_dim)
        H = self.hidden
        xg = self.input_gates(emb)  # (B, T, 4H): the input part of every step's gates
        keep_all = 1.0 - mask
        h = c = None
        for t in range(self.max_len):
            gates = xg[:, t] if h is None else xg[:, t] + self.hidden_gates(h)
            i = torch.sigmoid(gates[:, :H])
            f = torch.sigmoid(gates[:, H : 2 * H])
            g = torch.tanh(gates[:, 2 * H : 3 * H])
            o = torch.sigmoid(gates[:, 3 * H :])
            m, keep = mask[:, t : t + 1], keep_all[:, t : t + 1]  # (B, 1): 1 / 0 and 0 / 1, constants
            if h is None or c is None:
                c_new = i * g
                h_new = o * torch.tanh(c_new)
                c, h = m * c_new, m * h_new
            else:
                c_new = f * c + i * g
                h_new = o * torch.tanh(c_new)
                c = m * c_new + keep * c
                h = m * h_new + keep * h
        return self.classifier(h)


def lstm(
    vocab_size: int = 5000,
    num_classes: int = 2,
    embed_dim: int = 64,
    hidden: int = 64,
    max_len: int = 32,
    pad_id: int = 0,
) -> TextClassifier:
    """LSTM sentence classifier for certified robustness to word substitutions (Xu et al. 2020).

    ``nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)`` (outside the bounded graph), then
    :class:`LSTMEncoder`: a one-layer LSTM of width ``hidden`` unrolled over ``max_len`` steps with
    masked state updates, and ``Linear(hidden, num_classes)`` on the final hidden state.
    Defaults: 353,154 parameters (320,000 of them the embedding).
    """
    vocab_size = positive_int(vocab_size, "vocab_size")
    num_classes = positive_int(num_classes, "num_classes")
    embed_dim = positive_int(embed_dim, "embed_dim")
    hidden = positive_int(hidden, "hidden")
    max_len = positive_int(max_len, "max_len")
    if not 0 <= int(pad_id) < vocab_size:
        raise ValueError(f"pad_id must be in [0, vocab_size={vocab_size}), got {pad_id!r}")
    pad_id = int(pad_id)
    embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
    encoder = LSTMEncoder(embed_dim, hidden, max_len, num_classes)
    return TextClassifier(embedding, encoder, num_classes, max_len, pad_id)
