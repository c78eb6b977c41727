"""Every value of every α-optimizable relaxation parameter gives sound bounds, not only the
optimized one: ReLU / LeakyReLU slopes, Sigmoid / Tanh / exp / log tangent points, MaxPool's lower
line weights, per spec row, per intermediate layer, and per group of rows (`RowGroups`, per-channel
α).  Random α in each op's ``alpha_range`` (and its corners) are attacked by random points, corners
and PGD, in float32 and float64, L∞ and L2."""
import math

import pytest
import torch
from torch import nn

from bound_checks import assert_sound
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm
from certtrain.bounds.ops.activation import RowGroups, relax_backward
from certtrain.bounds.patches import Patches
from op_models import ExpLogMLP, OpsCNN, randomize_bn


class PoolNet(nn.Module):
    """Overlapping, padded MaxPool after ReLU and after Sigmoid, LeakyReLU, Tanh."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.c1(x)), 3, stride=2, padding=1)        # 8 -> 4
        g = nn.functional.max_pool2d(torch.sigmoid(self.c2(h)) - 0.5, 2, stride=1, padding=1)  # 4 -> 5
        g = nn.functional.leaky_relu(g[:, :, :4, :4], 0.2) + torch.tanh(h)
        return self.fc(g.flatten(1))


def _model(name, dtype):
    torch.manual_seed(3)
    m, shape = {"smooth": (ExpLogMLP, (2, 4, 4)), "cnn": (OpsCNN, (2, 8, 8)), "pool": (PoolNet, (2, 8, 8))}[name]
    return randomize_bn(m(), 3).to(dtype).eval(), torch.rand(2, *shape, dtype=dtype)


def _random_alpha(net, state, rows, gen, dtype):
    """{node: (lower-side α, upper-side α)}, (B, rows, *param shape), uniform in the op's range with a
    third of the entries at its ends."""
    out = {}
    for n in net.optimizable_nodes(state):
        args, kwargs = net.op_args(state, n.name)
        start = n.op.alpha_start(*args, **kwargs)
        lo, hi = n.op.alpha_range
        pair = []
        for _ in range(2):
            u = torch.rand(start.shape[0], rows, *start.shape[1:], generator=gen, dtype=torch.float64)
            ends = torch.rand(u.shape, generator=gen, dtype=torch.float64)
            u = torch.where(ends < 0.17, 0.0, torch.where(ends > 0.83, 1.0, u))
            pair.append((lo + (hi - lo) * u).to(dtype))
        out[n.name] = tuple(pair)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("norm", [math.inf, 2], ids=["linf", "l2"])
@pytest.mark.parametrize("name", ["smooth", "cnn", "pool"])
def test_random_alpha_is_sound(name, norm, dtype, one_thread):
    model, x0 = _model(name, dtype)
    eps = {math.inf: 0.1, 2: 0.5}[norm]
    ptb = PerturbationLpNorm(norm=norm, eps=eps)
    net = BoundedModule(model, x0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _, _, state = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="CROWN", return_state=True)
        kinds = {type(n.op).__name__ for n in net.optimizable_nodes(state)}
        expected = {"smooth": {"BoundExp", "BoundLog", "BoundSigmoid", "BoundTanh"},
                    "cnn": {"BoundReLU", "BoundSigmoid", "BoundTanh", "BoundMaxPool2d"},
                    "pool": {"BoundReLU", "BoundSigmoid", "BoundTanh", "BoundMaxPool2d", "BoundLeakyReLU"}}[name]
        assert expected <= kinds, kinds
        # intermediate layers: one random α per layer (shared by its rows), then the output with one
        # random α per output row
        inter = {s: _random_alpha(net, state, 1, gen, dtype) for s in net.refined_names(state)}
        net.interval_pass(state, refine=True, alphas=inter)
        n_out = net.output_shape[0]
        lb, ub = net.output_bounds(state, None, alphas=_random_alpha(net, state, n_out, gen, dtype))
    assert torch.isfinite(lb).all() and torch.isfinite(ub).all()
    assert_sound(model, x0, ptb, lb, ub, n_random=100, pgd_steps=15)


@pytest.mark.parametrize("op", ["relu", "sigmoid"])
def test_row_groups_equal_dense_rows(op, one_thread):
    """Per-channel α as `RowGroups` (windows picked per group) gives exactly the bounds of the same
    α expanded to one copy per row, through Patches and dense coefficients."""
    torch.manual_seed(0)
    dtype = torch.float64
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Sigmoid() if op == "sigmoid" else nn.ReLU(),
                          nn.Conv2d(3, 4, 3, stride=2, padding=1)).to(dtype).eval()
    x0 = torch.rand(2, 2, 6, 6, dtype=dtype)
    net = BoundedModule(model, x0)
    with torch.no_grad():
        _, _, state = net.compute_bounds(x=(BoundedTensor(x0, PerturbationLpNorm(eps=0.3)),), method="CROWN",
                                         return_state=True)
        r = net.optimizable_nodes(state)[0].name
        start = net.final_name
        rows = torch.arange(4 * 3 * 3)
        group = rows // 9  # output channel of each row
        vals = _random_alpha(net, state, 4, torch.Generator().manual_seed(1), dtype)[r]
        grouped = {r: tuple(RowGroups(v, group) for v in vals)}
        dense = {r: tuple(v.index_select(1, group) for v in vals)}
        for mode in ("patches", "matrix"):
            net.bound_opts["conv_mode"] = mode
            a = net.node_bounds(state, start, rows, alphas=grouped)
            b = net.node_bounds(state, start, rows, alphas=dense)
            for s, t in zip(a, b):
                torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-12)


def test_patches_row_extraction_matches_dense(one_thread):
    """`Patches.extract_rows` / `extract_groups` pick each row's window of per-row / per-group
    tensors (checked against dense products), and `relax_backward` mixes them with per-neuron lines."""
    torch.manual_seed(0)
    B, N, C, H, W = 2, 7, 3, 6, 5
    off = torch.randint(-2, 5, (N, 2))
    P = Patches(torch.randn(B, N, C, 3, 3), off, (C, H, W))
    P = P.with_patches(P.patches * P.inside_mask())
    dense = P.to_dense()
    t = torch.randn(B, N, C, H, W)
    torch.testing.assert_close(P.with_patches(P.patches * P.extract_rows(t)).to_dense(), dense * t)
    g = torch.randn(B, 3, C, H, W)
    group = torch.randint(0, 3, (N,))
    torch.testing.assert_close(P.with_patches(P.patches * P.extract_groups(g, group)).to_dense(),
                               dense * g.index_select(1, group))
    dl, du, bu = torch.rand(B, C, H, W), torch.rand(B, N, C, H, W), torch.randn(B, C, H, W)
    bl = RowGroups(torch.randn(B, 3, C, H, W), group)
    nl, lb, nu, ub = relax_backward(P, P, dl, bl, du, bu)
    el, elb, eu, eub = relax_backward(dense, dense, dl, bl.dense(), du, bu)
    torch.testing.assert_close(nl.to_dense(), el)
    torch.testing.assert_close(nu.to_dense(), eu)
    torch.testing.assert_close(lb, elb)
    torch.testing.assert_close(ub, eub)


class _Elementwise(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


ELEMENTWISE = {
    "sigmoid": (torch.sigmoid, -6.0, 6.0), "tanh": (torch.tanh, -4.0, 4.0), "exp": (torch.exp, -3.0, 2.0),
    "log": (torch.log, 0.05, 5.0), "relu": (torch.relu, -2.0, 2.0),
    "leaky_relu": (lambda x: nn.functional.leaky_relu(x, 0.1), -2.0, 2.0), "sqrt": (torch.sqrt, 0.0, 4.0),
    "reciprocal": (torch.reciprocal, 0.2, 4.0), "pow1.5": (lambda x: x ** 1.5, 0.0, 4.0),
    "square": (torch.square, -2.0, 2.0), "cube": (lambda x: x ** 3, -2.0, 2.0)}


def _intervals(lo, hi, n, gen, dtype):
    """n intervals inside [lo, hi]: wide, narrow, across the middle, and points."""
    a = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    b = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    l, u = torch.minimum(a, b), torch.maximum(a, b)
    narrow = torch.rand(n, generator=gen, dtype=torch.float64) < 0.2
    u = torch.where(narrow, torch.minimum(l + 1e-3 * (hi - lo), torch.full_like(l, hi)), u)
    mid = (lo + hi) / 2
    cross = torch.rand(n, generator=gen, dtype=torch.float64) < 0.3
    l = torch.where(cross, mid - (mid - lo) * torch.rand(n, generator=gen, dtype=torch.float64), l)
    u = torch.where(cross, mid + (hi - mid) * torch.rand(n, generator=gen, dtype=torch.float64), u)
    u[:3] = l[:3]  # degenerate intervals
    return l.to(dtype), u.to(dtype)


def _lines(net, state, name, gen, dtype):
    """The op's linear bounds for rows A = [I; -I] (lower and upper bound), with random α per row:
    (lower-bound coefficients, biases, upper-bound coefficients, biases), dense."""
    node = net.node(name)
    args, kwargs = net.op_args(state, name)
    out = state.values[name].value
    B, M = out.shape[0], out[0].numel()
    eye = torch.eye(M, dtype=dtype).expand(B, M, M).reshape(B, M, *out.shape[1:])
    A = torch.cat([eye, -eye], 1)
    alpha = _random_alpha(net, state, 2 * M, gen, dtype)[name]
    res, lbias, ubias = node.op.backward_alpha(A, A, alpha, *args, **kwargs)
    (_, nl, nu), = res
    return A, nl, lbias, nu, ubias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op", list(ELEMENTWISE))
def test_elementwise_lines_sound_for_random_alpha(op, dtype, one_thread):
    """Each neuron's lines for random α (uniform, and at the range's ends) enclose f on a dense grid
    of its interval: l_k x + b_k <= f(x) <= u_k x + c_k."""
    fn, lo, hi = ELEMENTWISE[op]
    gen = torch.Generator().manual_seed(0)
    l, u = _intervals(lo, hi, 64, gen, dtype)
    x0 = ((l + u) / 2).unsqueeze(0)
    ptb = PerturbationLpNorm(eps=((u - l) / 2).unsqueeze(0), x_L=l.unsqueeze(0), x_U=u.unsqueeze(0))
    net = BoundedModule(_Elementwise(fn), x0)
    with torch.no_grad():
        _, _, state = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="CROWN", return_state=True)
        nodes = net.optimizable_nodes(state)
        assert nodes, f"{op}: no α-optimizable relaxation"
        A, nl, lb, nu, ub = _lines(net, state, nodes[0].name, gen, dtype)
        t = torch.linspace(0, 1, 401, dtype=torch.float64).to(dtype).unsqueeze(1)
        xs = l + t * (u - l)                                   # (points, n)
        y = fn(xs)
        sign = torch.cat([torch.ones(64), -torch.ones(64)]).to(dtype)  # rows: y, then -y
        idx = torch.arange(128) % 64
        kl, ku = nl[0, torch.arange(128), idx], nu[0, torch.arange(128), idx]
        val = sign * y[:, idx]                                 # (points, 128): y or -y
        tol = 64 * torch.finfo(dtype).eps * (1 + y.abs().max())
        low = kl * xs[:, idx] + lb[0]
        up = ku * xs[:, idx] + ub[0]
        assert (low <= val + tol).all(), f"{op}: lower line above f by {(low - val).max().item():.3g}"
        assert (up >= val - tol).all(), f"{op}: upper line below f by {(val - up).max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (2, 1, 0), (2, 2, 1)])
def test_maxpool_lines_sound_for_random_alpha(k, s, p, dtype, one_thread):
    """MaxPool's lower line for random window weights (and its upper line) hold at random points and
    corners of the input box, padding included."""
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 2, 5, 5, generator=gen, dtype=torch.float64).to(dtype)
    eps = (torch.rand(1, 2, 5, 5, generator=gen, dtype=torch.float64) * 0.8).to(dtype)
    ptb = PerturbationLpNorm(eps=eps)
    net = BoundedModule(_Elementwise(lambda x: nn.functional.max_pool2d(x, k, s, p)), x0)
    with torch.no_grad():
        _, _, state = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="CROWN", return_state=True)
        name = net.final_name
        assert [n.name for n in net.optimizable_nodes(state)] == [name]
        A, nl, lb, nu, ub = _lines(net, state, name, gen, dtype)
        lo, hi = ptb.interval(x0)
        r = torch.rand(600, *x0.shape, generator=gen, dtype=torch.float64).to(dtype)
        r[:300] = (r[:300] > 0.5).to(dtype)
        xs = lo + r * (hi - lo)                                 # (points, B, C, H, W)
        y = torch.stack([nn.functional.max_pool2d(x, k, s, p) for x in xs])  # (points, B, C, oh, ow)
        val = torch.einsum("bnchw,pbchw->pbn", A, y)
        low = torch.einsum("bnchw,pbchw->pbn", nl, xs) + lb
        up = torch.einsum("bnchw,pbchw->pbn", nu, xs) + ub
        tol = 64 * torch.finfo(dtype).eps * (1 + y.abs().max())
        assert (low <= val + tol).all(), f"lower line above max by {(low - val).max().item():.3g}"
        assert (up >= val - tol).all(), f"upper line below max by {(val - up).max().item():.3g}"
