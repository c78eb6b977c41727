"""Trace-time substitutes for layers whose forward fx cannot trace, or which are better bounded
as their parts: each is a function ``(module, *args, **kwargs) -> output`` written in ops that have
bound rules, with the module's own parameters (traced as graph attributes, so training them is
seen).  `graph._Tracer` calls it in place of the layer; the function computes exactly the
layer's output (tests compare them on random inputs).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .graph import TraceError


def _layer_norm(m: nn.LayerNorm, x):
    return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


def _softmax(m: nn.Softmax, x):
    if m.dim is None:
        raise TraceError("nn.Softmax() without dim: pass dim= (the bound engine never reduces over the batch)")
    return F.softmax(x, m.dim)


def _multihead_attention(m: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                         need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                         is_causal: bool = False):
    """nn.MultiheadAttention (batch_first=True, no masks, no dropout in use): scaled dot-product
    attention per head, as `F.multi_head_attention_forward` computes it."""
    if not m.batch_first:
        raise TraceError("nn.MultiheadAttention needs batch_first=True for bounds (the batch must be "
                         "dimension 0)")
    if key_padding_mask is not None or attn_mask is not None or is_causal:
        raise TraceError("nn.MultiheadAttention with a mask has no bound substitute yet; "
                         "call it without key_padding_mask / attn_mask / is_causal")
    if m.bias_k is not None or m.add_zero_attn:
        raise TraceError("nn.MultiheadAttention with add_bias_kv or add_zero_attn has no bound substitute")
    if m.dropout and m.training:
        raise TraceError("nn.MultiheadAttention with dropout in training mode: bounds need a deterministic "
                         "model (model.eval())")
    e, h = m.embed_dim, m.num_heads
    hd = e // h
    if m._qkv_same_embed_dim:
        wq, wk, wv = m.in_proj_weight[:e], m.in_proj_weight[e:2 * e], m.in_proj_weight[2 * e:]
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    bq = bk = bv = None
    if m.in_proj_bias is not None:
        bq, bk, bv = m.in_proj_bias[:e], m.in_proj_bias[e:2 * e], m.in_proj_bias[2 * e:]

    def heads(t):  # (B, T, E) -> (B, H, T, hd)
        return t.reshape(t.shape[0], t.shape[1], h, hd).transpose(1, 2)

    q = heads(F.linear(query, wq, bq))
    k = heads(F.linear(key, wk, bk))
    v = heads(F.linear(value, wv, bv))
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
    p = F.softmax(scores, dim=-1)
    out = torch.matmul(p, v).transpose(1, 2)                         # (B, T, H, hd)
    out = out.reshape(out.shape[0], out.shape[1], e)
    out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
    if not need_weights:
        return out, None
    w = p.mean(dim=1) if average_attn_weights else p
    return out, w


def _lstm_cell(m: nn.LSTMCell, x, hx=None):
    """nn.LSTMCell: gates i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh); c' = σ(f) c + σ(i) tanh(g);
    h' = σ(o) tanh(c')."""
    if hx is None:
        z = x.new_zeros(x.shape[0], m.hidden_size)
        h, c = z, z
    else:
        h, c = hx
    gates = F.linear(x, m.weight_ih, m.bias_ih) + F.linear(h, m.weight_hh, m.bias_hh)
    n = m.hidden_size
    i, f, g, o = gates[:, :n], gates[:, n:2 * n], gates[:, 2 * n:3 * n], gates[:, 3 * n:]
    c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h2 = torch.sigmoid(o) * torch.tanh(c2)
    return h2, c2


def _rnn_refused(m, *args, **kwargs):
    raise TraceError(f"{type(m).__name__} runs its time loop inside one kernel, which has no bound rule: "
                     f"write the loop with nn.{type(m).__name__}Cell over the (fixed) sequence length")


MODULES: dict[type, Callable] = {
    nn.LayerNorm: _layer_norm,
    nn.Softmax: _softmax,
    nn.MultiheadAttention: _multihead_attention,
    nn.LSTMCell: _lstm_cell,
    nn.LSTM: _rnn_refused,
    nn.GRU: _rnn_refused,
    nn.RNN: _rnn_refused,
}


# ----------------------------------------------------------------- perturbed parameters
def _param(m: nn.Module, name: str):
    """Parameter ``name`` of m as a `graph.per_example` node (batch dim 1), or None."""
    from .graph import per_example
    p = getattr(m, name)
    if p is None:
        return None
    return p.tracer.create_proxy("call_function", per_example, (p,), {})


def _linear_p(m: nn.Linear, x):
    w = _param(m, "weight")                                          # (1, out, in)
    y = torch.matmul(w, x.unsqueeze(-1)).squeeze(-1)                 # (B, out): x must be (B, in)
    b = _param(m, "bias")
    return y + b if b is not None else y


def _conv2d_p(m: nn.Conv2d, x):
    if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise TraceError("a BoundedParameter on nn.Conv2d needs groups=1, padding_mode='zeros' and "
                         "numeric padding")
    k, d, p, s = m.kernel_size, m.dilation, m.padding, m.stride
    cols = F.unfold(x, k, d, p, s)                                   # (B, C·kh·kw, L)
    y = torch.matmul(_param(m, "weight").flatten(2), cols)           # (B, O, L)
    ho = (x.shape[2] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (x.shape[3] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    y = y.reshape(x.shape[0], m.out_channels, ho, wo)
    b = _param(m, "bias")
    return y + b.unsqueeze(-1).unsqueeze(-1) if b is not None else y


def _batch_norm_p(m: nn.modules.batchnorm._BatchNorm, x):
    if m.training or not m.track_running_stats:
        raise TraceError("a BoundedParameter on BatchNorm needs the layer in eval mode with running "
                         "statistics (model.eval() before BoundedModule(...))")
    two_d = isinstance(m, nn.BatchNorm2d)

    def chan(t):  # (1, C) -> (1, C, 1, 1) for 2-d BN
        return t.unsqueeze(-1).unsqueeze(-1) if two_d else t
    mean = m.running_mean.view(1, -1, 1, 1) if two_d else m.running_mean.view(1, -1)
    var = m.running_var.view(1, -1, 1, 1) if two_d else m.running_var.view(1, -1)
    y = (x - mean) * torch.rsqrt(var + m.eps)
    w, b = _param(m, "weight"), _param(m, "bias")
    if w is not None:
        y = y * chan(w)
    if b is not None:
        y = y + chan(b)
    return y


_PARAM_SUBSTITUTES: dict[type, Callable] = {nn.Linear: _linear_p, nn.Conv2d: _conv2d_p,
                                            nn.BatchNorm1d: _batch_norm_p, nn.BatchNorm2d: _batch_norm_p}


def with_bounded_parameters(m: nn.Module) -> Optional[Callable]:
    """The substitute of a layer with a `BoundedParameter` of its own (None without one)."""
    from .tensor import BoundedParameter
    if not any(isinstance(p, BoundedParameter) for p in m.parameters(recurse=False)):
        return None
    sub = _PARAM_SUBSTITUTES.get(type(m))
    if sub is None:
        raise TraceError(f"a BoundedParameter on {type(m).__name__} has no bound rule: perturb the parameters "
                         "of nn.Linear, nn.Conv2d or BatchNorm")
    return sub
