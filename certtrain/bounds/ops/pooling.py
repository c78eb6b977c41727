"""Pooling: average pooling is a depthwise convolution with uniform weights; max pooling uses
the relaxation of auto_LiRPA (lower line: the input with the largest lower bound; upper line:
that input when it dominates its window, else the window's largest upper bound)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..patches import to_dense
from .activation import relax_backward
from .base import BoundOp, LinearOp
from .conv import _pair, conv_backward
from .registry import UnsupportedOperation, register_op


def _node_arg(node, i, name, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


class _UniformPool(LinearOp):
    """Average pooling over k x k windows with stride s and zero padding p (count_include_pad)."""
    ibp_operands = "unary"  # geometry(): x.value.shape

    supports_patches = True

    def geometry(self, x):
        raise NotImplementedError

    def ibp(self, x, *args, **kwargs):
        k, s, p = self.geometry(x)
        l, u = x.bounds
        return F.avg_pool2d(l, k, s, p), F.avg_pool2d(u, k, s, p)

    def backward_one(self, A, x, *args, **kwargs):
        k, s, p = self.geometry(x)
        C = x.value.shape[1]
        w = torch.full((C, 1, *k), 1.0 / (k[0] * k[1]), dtype=x.value.dtype, device=x.value.device)
        return [(x, conv_backward(A, w, s, p, 1, C, x.value.shape[1:]))], 0


@register_op("AvgPool2d")
class BoundAvgPool2d(_UniformPool):
    targets = (nn.AvgPool2d, F.avg_pool2d)

    def geometry(self, x):
        if self.module is not None:
            m = self.module
            k, s, p, ceil, cip, div = m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override
        else:
            n = self.node
            k = _node_arg(n, 1, "kernel_size", None)
            s = _node_arg(n, 2, "stride", None) or k
            p = _node_arg(n, 3, "padding", 0)
            ceil = _node_arg(n, 4, "ceil_mode", False)
            cip = _node_arg(n, 5, "count_include_pad", True)
            div = _node_arg(n, 6, "divisor_override", None)
        k, s, p = _pair(k), _pair(s if s is not None else k), _pair(p)
        if ceil or div is not None or (not cip and any(p)):
            raise UnsupportedOperation(
                f"AvgPool2d at node '{self.node.name}' with ceil_mode/divisor_override/"
                "count_include_pad=False and padding has no bound rule; use the defaults")
        return k, s, p


@register_op("AdaptiveAvgPool2d")
class BoundAdaptiveAvgPool2d(_UniformPool):
    targets = (nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d)

    def geometry(self, x):
        out = self.module.output_size if self.module is not None else _node_arg(self.node, 1, "output_size", None)
        H, W = x.value.shape[-2:]
        oh, ow = _pair(out)
        oh, ow = oh or H, ow or W
        if H % oh or W % ow:
            raise UnsupportedOperation(
                f"AdaptiveAvgPool2d at node '{self.node.name}': output {oh}x{ow} does not divide "
                f"the input {H}x{W}; only uniform windows have a bound rule")
        k = (H // oh, W // ow)
        return k, k, (0, 0)


@register_op("MaxPool2d")
class BoundMaxPool2d(BoundOp):
    ibp_operands = "unary"
    targets = (nn.MaxPool2d, F.max_pool2d)
    relaxed_inputs = (0,)

    def geometry(self):
        if self.module is not None:
            m = self.module
            k, s, p, d, ceil = m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
        else:
            n = self.node
            k = _node_arg(n, 1, "kernel_size", None)
            s = _node_arg(n, 2, "stride", None) or k
            p, d = _node_arg(n, 3, "padding", 0), _node_arg(n, 4, "dilation", 1)
            ceil = _node_arg(n, 5, "ceil_mode", False)
        k, s, p, d = _pair(k), _pair(s if s is not None else k), _pair(p), _pair(d)
        if ceil or d != (1, 1):
            raise UnsupportedOperation(f"MaxPool2d at node '{self.node.name}' with ceil_mode or "
                                       "dilation has no bound rule")
        return k, s, p

    def ibp(self, x, *args, **kwargs):
        k, s, p = self.geometry()
        l, u = x.bounds
        return F.max_pool2d(l, k, s, p), F.max_pool2d(u, k, s, p)

    def _relax(self, x):
        """The per-window relaxation: (lower-line argmax i*, flat index of i*, upper slope du,
        upper bias bu, window lower bounds' max, dominant) with (B, C, oh, ow) tensors."""
        k, s, p = self.geometry()
        l, u = x.bounds
        B, C, H, W = l.shape
        # Windows of the input, padded with -inf (padding never wins a max): (B, C, kh*kw, L).
        wl, pos = _windows(l, k, s, p)
        wu, _ = _windows(u, k, s, p)
        # i*: the input with the largest lower bound in each window.  Everything below is per
        # window, so overlapping windows (stride < kernel) that share inputs stay independent.
        lmax, arg = wl.max(2, keepdim=True)
        umax = wu.max(2).values
        # Largest upper bound among the *other* inputs of the same window.
        u_other = wu.scatter(2, arg, float("-inf")).max(2).values
        lmax = lmax.squeeze(2)
        idx = pos.gather(2, arg).squeeze(2)  # flat input index of i*, (B, C, L)
        oh, ow = (H + 2 * p[0] - k[0]) // s[0] + 1, (W + 2 * p[1] - k[1]) // s[1] + 1
        dominant = (lmax >= u_other).view(B, C, oh, ow)
        umax = umax.view(B, C, oh, ow)
        one = torch.ones_like(umax)
        du = torch.where(dominant, one, torch.zeros_like(umax))
        bu = torch.where(dominant, torch.zeros_like(umax), umax)
        return arg.squeeze(2).view(B, C, oh, ow), idx.view(B, C, oh, ow), du, bu, lmax.view(B, C, oh, ow), dominant

    def _to_input(self, A, idx, shape):
        """Adjoint of "pick x[idx]": scatter-add each output coefficient onto its argmax (several
        windows may pick the same input; their coefficients add up)."""
        if A is None:
            return None
        C, H, W = shape
        Bn, N = A.shape[:2]
        out = A.new_zeros(Bn, N, C, H * W)
        index = idx.flatten(2).unsqueeze(1).expand(Bn, N, C, -1)
        return out.scatter_add_(3, index, A.flatten(3)).view(Bn, N, C, H, W)

    def backward(self, lA, uA, x, *args, **kwargs):
        _, idx, du, bu, _, _ = self._relax(x)
        one = torch.ones_like(du)
        # Lower line y >= x[i*] (slope 1 on i*); upper line du * x[i*] + bu.
        nl, lbias, nu, ubias = relax_backward(lA, uA, one, None, du, bu)
        shape = x.value.shape[1:]
        return [(x, self._to_input(nl, idx, shape), self._to_input(nu, idx, shape))], lbias, ubias

    # ---------------------------------------------------------------- α-CROWN
    # The lower line may be any y >= sum_k a_k x_k + (1 - sum_k a_k) L over the window's inputs x_k,
    # with a_k >= 0, sum_k a_k <= 1 and L = max_k l_k <= y (y >= each x_k and y >= L); CROWN's
    # line is a = e_{i*}.  α in [0, 1]^K per window (shape (C, oh, ow, K) per row) is made such
    # a weight vector by zeroing the padding entries and dividing by max(1, sum): every α in the
    # box is sound (auto_LiRPA optimizes MaxPool's lower line the same way).
    alpha_range = (0.0, 1.0)

    def _valid(self, shape, like):
        """(oh, ow, K) mask of window entries that are real inputs (not padding)."""
        k, s, p = self.geometry()
        _, H, W = shape
        ones = like.new_ones(1, 1, H, W)
        v = F.unfold(F.pad(ones, (p[1], p[1], p[0], p[0])), k, stride=s)[0]  # (K, L)
        oh, ow = (H + 2 * p[0] - k[0]) // s[0] + 1, (W + 2 * p[1] - k[1]) // s[1] + 1
        return (v > 0.5).t().reshape(oh, ow, -1)

    def alpha_free(self, x, *args, **kwargs):
        _, _, _, _, _, dominant = self._relax(x)
        return (~dominant).unsqueeze(-1) & self._valid(x.value.shape[1:], x.value)

    def alpha_start(self, x, *args, **kwargs):
        arg, _, du, _, _, _ = self._relax(x)
        k, _, _ = self.geometry()
        return F.one_hot(arg, k[0] * k[1]).to(du.dtype)

    def backward_alpha(self, lA, uA, alpha, x, *args, **kwargs):
        """Backward with the lower line's window weights ``alpha`` = (for the lower bound's rows, for
        the upper bound's rows), each (B, N or 1, C, oh, ow, K) in [0, 1]."""
        k, s, p = self.geometry()
        _, idx, du, bu, lmax, _ = self._relax(x)
        shape = x.value.shape[1:]
        C, H, W = shape
        valid = self._valid(shape, du).to(du.dtype)

        def side(A, a, lower_rows):
            if A is None:
                return None, 0
            if a is None:  # CROWN's lines
                nl, lb_, nu, ub_ = relax_backward(A if lower_rows else None, None if lower_rows else A,
                                                  torch.ones_like(du), None, du, bu)
                return self._to_input(nl if lower_rows else nu, idx, shape), (lb_ if lower_rows else ub_)
            A = to_dense(A)
            Bn, N = A.shape[:2]
            w = a.clamp(0, 1) * valid
            w = w / w.sum(-1, keepdim=True).clamp(min=1)
            # the lower line serves the positive coefficients of lower-bound rows and the negative
            # ones of upper-bound rows; the upper line the others
            low = A.clamp(min=0) if lower_rows else A.clamp(max=0)
            up = A - low
            wsum = w.sum(-1)
            bias = (up * bu.unsqueeze(1)).flatten(2).sum(-1) + (low * (1 - wsum) * lmax.unsqueeze(1)).flatten(2).sum(-1)
            coef = low.unsqueeze(-1) * w  # (B, N, C, oh, ow, K)
            coef = coef.flatten(3, 4).permute(0, 1, 2, 4, 3).reshape(Bn * N, C * k[0] * k[1], -1)
            folded = F.fold(coef, (H + 2 * p[0], W + 2 * p[1]), k, stride=s)[..., p[0]:p[0] + H, p[1]:p[1] + W]
            out = folded.reshape(Bn, N, C, H, W) + self._to_input(up * du.unsqueeze(1), idx, shape)
            return out, bias

        nl, lbias = side(lA, alpha[0], True)
        nu, ubias = side(uA, alpha[1], False)
        return [(x, nl, nu)], lbias, ubias


def _windows(t, k, s, p):
    """(values, flat input positions) of every pooling window: (B, C, kh*kw, L) each; padded
    entries hold -inf (and position 0, never selected since a window always holds a real input)."""
    B, C, H, W = t.shape
    tp = F.pad(t, (p[1], p[1], p[0], p[0]), value=float("-inf"))
    vals = F.unfold(tp.reshape(B * C, 1, *tp.shape[2:]), k, stride=s).view(B, C, k[0] * k[1], -1)
    grid = torch.arange(H * W, device=t.device, dtype=torch.float64).view(1, 1, H, W)
    gp = F.pad(grid, (p[1], p[1], p[0], p[0]), value=0.0)
    pos = F.unfold(gp, k, stride=s).view(1, 1, k[0] * k[1], -1).round().long()
    return vals, pos.expand(B, C, -1, -1)
