"""Small models for issue 10's rules: element picking, powers and clamps, products of bounded
tensors (elementwise and matrix), each a plain nn.Module fed a (B, 2, 4, 4) input."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelectOps(nn.Module):
    """getitem (slices, step, ints, None, Ellipsis), narrow, select, chunk, split, unbind,
    index_select, gather with a constant index, expand, repeat, flip, roll, max/min of two tensors."""

    def __init__(self, n=32, out=5):
        super().__init__()
        self.fc = nn.Linear(n, 16)
        self.register_buffer("idx", torch.tensor([3, 0, 7, 7, 12]))
        self.register_buffer("gidx", torch.tensor([[15, 1, 1, 4]]))
        self.out = nn.Linear(8 + 8 + 2 + 5 + 4 + 4 + 12, out)

    def forward(self, x):
        h = self.fc(x.flatten(1)).view(-1, 4, 4)
        a, b = h.chunk(2, dim=1)                                       # (B, 2, 4) each
        c = torch.maximum(a, b.flip(1))
        d = torch.minimum(h[:, 1:3, ::2].repeat(1, 1, 2), c.roll(1, dims=2))
        e = h.narrow(2, 1, 2).select(1, 0)                             # (B, 2)
        f = h.flatten(1).index_select(1, self.idx)                     # (B, 5)
        index = torch.zeros_like(h[:, 0], dtype=torch.long) + self.gidx  # (B, 4), value-free
        g = torch.gather(h.flatten(1), 1, index)
        k = torch.split(h, [1, 3], dim=1)[1].unbind(1)[2]              # (B, 4)
        m = h[..., None, 0].expand(-1, 4, 3).flatten(1)                # (B, 12)
        z = torch.cat([c.flatten(1), d.flatten(1), e, f, g, k, m], 1)
        return self.out(torch.relu(z))


class PowerOps(nn.Module):
    """square, odd and non-integer powers, sqrt, rsqrt, reciprocal, 1 / x, clamp (both limits,
    one limit), HardTanh, ReLU6."""

    def __init__(self, n=32, hidden=6, out=5):
        super().__init__()
        self.fc = nn.Linear(n, hidden)
        self.out = nn.Linear(12 * hidden, out)
        self.ht = nn.Hardtanh(-0.4, 0.6)

    def forward(self, x):
        h = self.fc(x.flatten(1))
        p = torch.relu(h) + 0.5                                        # a positive domain
        z = [h.square(), h ** 3, torch.sqrt(p), torch.rsqrt(p), p.reciprocal(), 1.0 / p,
             p ** 1.5, p.pow(0.3), torch.clamp(h, -0.5, 0.7), h.clamp(min=0.1), self.ht(h),
             F.relu6(3 * h)]
        return self.out(torch.cat(z, 1))


class ProductOps(nn.Module):
    """x * y, x * x and x / y of bounded tensors, and attention-shaped matrix products of two bounded
    tensors: Q Kᵀ by matmul and by bmm, then (relu(S)) V by @."""

    def __init__(self, n=32, d=4, t=3, out=5):
        super().__init__()
        self.t, self.d = t, d
        self.fa, self.fb = nn.Linear(n, 6), nn.Linear(n, 6)
        self.q, self.k, self.v = (nn.Linear(n, t * d) for _ in range(3))
        self.out = nn.Linear(6 + 6 + 6 + t * t + t * d, out)

    def forward(self, x):
        x = x.flatten(1)
        a, b = torch.tanh(self.fa(x)), self.fb(x)
        q, k, v = (f(x).view(-1, self.t, self.d) for f in (self.q, self.k, self.v))
        s = torch.matmul(q, k.transpose(1, 2)) / 2.0                   # (B, t, t)
        s2 = torch.bmm(q, k.transpose(-1, -2))
        o = torch.relu(s2) @ v                                         # (B, t, d)
        r = a / (torch.relu(b) + 1.0)                                  # by a bounded divisor
        return self.out(torch.cat([a * b, a * a, r, s.flatten(1), o.flatten(1)], 1))


class MeanOnlyLayerNorm(nn.Module):
    """LayerNorm without the variance division (x - mean(x)) * w + b: the form certified training
    of Transformers uses (Shi et al. 2020), linear and so cheap to bound."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) * self.weight + self.bias


class TransformerClassifier(nn.Module):
    """Embeddings (B, T, D) -> nn.MultiheadAttention (softmax) + residual -> LayerNorm -> FFN with
    GELU + residual -> LayerNorm -> mean pooling -> Linear."""

    def __init__(self, d=8, heads=2, ffn=12, out=3, mean_only=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        norm = MeanOnlyLayerNorm if mean_only else nn.LayerNorm
        self.ln1, self.ln2 = norm(d), norm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))
        self.head = nn.Linear(d, out)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        h = self.ln1(x + a)
        h = self.ln2(h + self.ffn(h))
        return self.head(h.mean(1))


class LSTMCellClassifier(nn.Module):
    """Embeddings (B, T, D) -> nn.LSTMCell over the T steps -> Linear on the last hidden state."""

    def __init__(self, d=6, hidden=8, steps=3, out=3):
        super().__init__()
        self.steps = steps
        self.cell = nn.LSTMCell(d, hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        h, c = self.cell(x[:, 0])
        for t in range(1, self.steps):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


class EinsumOps(nn.Module):
    """einsum forms of attention: scores bhqd,bhkd->bhqk, a constant projection bhtd,de->bhte,
    and the weighted sum bhqk,bhke->bqhe (the output's indices permuted)."""

    def __init__(self, n=32, out=5):
        super().__init__()
        self.fc = nn.Linear(n, 24)
        self.W = nn.Parameter(torch.randn(4, 3) * 0.5)
        self.out = nn.Linear(2 * 3 * 3, out)

    def forward(self, x):
        h = self.fc(x.flatten(1)).view(-1, 2, 3, 4)                   # (B, heads, T, d)
        s = torch.einsum("bhqd,bhkd->bhqk", h, torch.tanh(h))
        v = torch.einsum("bhtd,de->bhte", h, self.W)
        o = torch.einsum("bhqk,bhke->bqhe", torch.relu(s), v)
        return self.out(o.flatten(1))
