"""Sequence-model ops: trace-time substitutes (nn.MultiheadAttention, nn.LSTMCell, nn.LayerNorm,
nn.Softmax) compute the layers' outputs; softmax, LayerNorm (full and mean-only) and GELU rules are
exact where a closed form exists and sound; a Transformer and an LSTMCell classifier with a ball on
their input embeddings get sound IBP / CROWN-IBP / CROWN / α-CROWN bounds (f32 and f64)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bound_checks import assert_sound
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm
from certtrain.bounds.graph import TraceError
from certtrain.bounds.ops import UnsupportedOperation
from certtrain.bounds.ops.gelu import offsets
from certtrain.bounds.ops.softmax import closed_form
from seq_op_models import LSTMCellClassifier, TransformerClassifier

FAST = {"iteration": 6, "lr_alpha": 0.3}
MODELS = {
    "transformer": (lambda: TransformerClassifier(), (4, 8)),
    "transformer_meanln": (lambda: TransformerClassifier(mean_only=True), (4, 8)),
    "lstmcell": (lambda: LSTMCellClassifier(), (3, 6)),
}


class _Wrap(nn.Module):
    def __init__(self, fn, **mods):
        super().__init__()
        self.fn = fn
        for k, m in mods.items():
            self.add_module(k, m)

    def forward(self, x):
        return self.fn(self, x)


SUBSTITUTED = {
    "mha": (lambda: _Wrap(lambda s, x: s.m(x, x, x)[0], m=nn.MultiheadAttention(6, 3, batch_first=True)), (4, 6)),
    "mha_weights": (lambda: _Wrap(lambda s, x: s.m(x, x, x)[1].flatten(1),
                                  m=nn.MultiheadAttention(6, 2, batch_first=True)), (4, 6)),
    "mha_per_head_weights": (lambda: _Wrap(lambda s, x: s.m(x, x, x, average_attn_weights=False)[1].flatten(1),
                                           m=nn.MultiheadAttention(6, 2, batch_first=True)), (4, 6)),
    "mha_kdim": (lambda: _Wrap(lambda s, x: s.m(x[..., :6], x, x[..., 2:])[0],
                               m=nn.MultiheadAttention(6, 2, batch_first=True, kdim=8, vdim=6)), (4, 8)),
    "mha_no_bias": (lambda: _Wrap(lambda s, x: s.m(x, x, x, need_weights=False)[0],
                                  m=nn.MultiheadAttention(6, 2, batch_first=True, bias=False)), (4, 6)),
    "lstmcell": (lambda: _Wrap(lambda s, x: torch.cat(s.m(x), 1), m=nn.LSTMCell(5, 4)), (5,)),
    "lstmcell_state": (lambda: _Wrap(lambda s, x: s.m(x[:, :5], (x[:, 5:9], x[:, 9:]))[1], m=nn.LSTMCell(5, 4)), (13,)),
    "layernorm": (lambda: _Wrap(lambda s, x: s.m(x), m=nn.LayerNorm((3, 4))), (2, 3, 4)),
    "layernorm_functional": (lambda: _Wrap(lambda s, x: F.layer_norm(x, (4,), eps=1e-3)), (3, 4)),
    "softmax": (lambda: _Wrap(lambda s, x: s.m(x), m=nn.Softmax(dim=1)), (5, 3)),
    "softmax_functional": (lambda: _Wrap(lambda s, x: x.softmax(-1) + torch.softmax(x, dim=1)), (5, 5)),
    "gelu": (lambda: _Wrap(lambda s, x: s.m(x) + F.gelu(2 * x), m=nn.GELU()), (7,)),
}


@pytest.mark.parametrize("name", list(SUBSTITUTED))
def test_substitutes_compute_the_layer(name):
    torch.manual_seed(0)
    make, shape = SUBSTITUTED[name]
    model = make().double().eval()
    x0 = torch.randn(3, *shape, dtype=torch.float64) * 2
    net = BoundedModule(model, x0)
    torch.testing.assert_close(net(x0), model(x0), rtol=1e-12, atol=1e-12)
    x = torch.randn(5, *shape, dtype=torch.float64)  # another batch size
    torch.testing.assert_close(net(x), model(x), rtol=1e-12, atol=1e-12)
    lb, ub = net.compute_bounds(x=(BoundedTensor(x0, PerturbationLpNorm(eps=0.1)),), method="CROWN")
    assert_sound(model, x0, PerturbationLpNorm(eps=0.1), lb, ub, n_random=100, pgd_steps=15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("norm", [math.inf, 2], ids=["linf", "l2"])
@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "CROWN", "alpha-CROWN"])
@pytest.mark.parametrize("name", list(MODELS))
def test_sequence_classifiers_sound(name, method, norm, dtype):
    torch.manual_seed(0)
    make, shape = MODELS[name]
    model = make().to(dtype).eval()
    x0 = torch.randn(2, *shape, dtype=dtype)
    ptb = PerturbationLpNorm(norm=norm, eps={math.inf: 0.03, 2: 0.1}[norm])
    net = BoundedModule(model, x0)
    kw = {"optimize_bound_args": FAST} if method == "alpha-CROWN" else {}
    with torch.no_grad():
        lb, ub = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method=method, **kw)
    assert lb.shape == ub.shape == (2, 3) and torch.isfinite(lb).all() and torch.isfinite(ub).all()
    assert_sound(model, x0, ptb, lb, ub, n_random=100, pgd_steps=20)


def test_crown_tighter_than_ibp_on_sequence_models():
    """Not a soundness check: CROWN's margin to IBP on these models (why CROWN matters for them)."""
    for name in MODELS:
        torch.manual_seed(0)
        make, shape = MODELS[name]
        model = make().double().eval()
        x0 = torch.randn(2, *shape, dtype=torch.float64)
        net = BoundedModule(model, x0)
        x = BoundedTensor(x0, PerturbationLpNorm(eps=0.03))
        with torch.no_grad():
            li, ui = net.compute_bounds(x=(x,), method="IBP")
            lc, uc = net.compute_bounds(x=(x,), method="CROWN")
        assert (uc - lc).sum() < (ui - li).sum(), name


def test_softmax_closed_form_is_attained():
    """The closed-form interval of softmax_i is attained (x_i at one end, the others at the other)."""
    torch.manual_seed(0)
    l = torch.randn(4, 5, dtype=torch.float64)
    u = l + torch.rand(4, 5, dtype=torch.float64) * 2
    lo, hi = closed_form(l, u, 1)
    for i in range(5):
        xl = u.clone()
        xl[:, i] = l[:, i]
        xu = l.clone()
        xu[:, i] = u[:, i]
        torch.testing.assert_close(lo[:, i], torch.softmax(xl, 1)[:, i])
        torch.testing.assert_close(hi[:, i], torch.softmax(xu, 1)[:, i])


@pytest.mark.parametrize("n", [3, 40], ids=["pairwise", "shifted"])
def test_softmax_ibp_uses_the_closed_form(n):
    """Both decompositions (pairwise up to 4 entries, max-shifted above) give softmax's exact
    per-element interval under IBP, and CROWN bounds that hold."""
    torch.manual_seed(0)
    x0 = torch.randn(3, n, dtype=torch.float64)
    net = BoundedModule(_Wrap(lambda s, x: torch.softmax(x, -1)), x0)
    lb, ub = net.compute_bounds(x=(BoundedTensor(x0, PerturbationLpNorm(eps=0.4)),), method="IBP")
    lo, hi = closed_form(x0 - 0.4, x0 + 0.4, 1)
    torch.testing.assert_close(lb, lo)
    torch.testing.assert_close(ub, hi)
    model = _Wrap(lambda s, x: torch.softmax(x, -1))
    lb, ub = net.compute_bounds(x=(BoundedTensor(x0, PerturbationLpNorm(eps=0.4)),), method="CROWN")
    assert_sound(model, x0, PerturbationLpNorm(eps=0.4), lb, ub, n_random=100, pgd_steps=15)


@pytest.mark.parametrize("n", [3, 40], ids=["pairwise", "shifted"])
def test_softmax_of_a_huge_box_stays_bounded(n):
    """Inputs far wider than exp's range (a loose IBP early in training): the pairwise denominator
    is >= 1, so IBP stays finite and inside [0, 1]; the shifted form's sum may underflow to 0, and
    the guard keeps the closed form (its lines too); CROWN's lines through an overflowed exp say
    nothing (±inf, never NaN); all sound."""
    torch.manual_seed(0)
    x0 = torch.randn(2, n)
    model = _Wrap(lambda s, x: torch.softmax(x * 50.0, -1))
    net = BoundedModule(model, x0)
    ptb = PerturbationLpNorm(eps=4.0)
    for method in ("IBP", "CROWN-IBP", "CROWN"):
        with torch.no_grad():
            lb, ub = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method=method)
        assert not lb.isnan().any() and not ub.isnan().any()
        if method == "IBP":
            assert (lb >= 0).all() and (ub <= 1 + 1e-6).all()
        assert_sound(model, x0, ptb, lb, ub, n_random=100, pgd_steps=10)


def test_gelu_ibp_exact_and_lines_tight():
    """IBP of GELU is its exact range; the relaxation's offsets are the exact extremes of
    gelu(x) - k x over [l, u] (dense grid), never inside them."""
    torch.manual_seed(0)
    c = torch.randn(400, dtype=torch.float64) * 3
    w = torch.rand(400, dtype=torch.float64) * 4
    l, u = c - w, c + w
    grid = l[:, None] + (u - l)[:, None] * torch.linspace(0, 1, 20001, dtype=torch.float64)
    f = F.gelu(grid)
    net = BoundedModule(nn.GELU(), c[:, None])
    lb, ub = net.compute_bounds(x=(BoundedTensor(c[:, None], PerturbationLpNorm(eps=w[:, None])),), method="IBP")
    assert (lb[:, 0] <= f.min(1).values + 1e-12).all() and (ub[:, 0] >= f.max(1).values - 1e-12).all()
    assert (f.min(1).values - lb[:, 0]).max() < 1e-7 and (ub[:, 0] - f.max(1).values).max() < 1e-12
    k = (F.gelu(u) - F.gelu(l)) / (u - l)
    lo, hi = offsets(l, u, k)
    g = f - k[:, None] * grid
    assert (lo <= g.min(1).values + 1e-12).all() and (hi >= g.max(1).values - 1e-12).all()
    assert (g.min(1).values - lo).max() < 1e-6 and (hi - g.max(1).values).max() < 1e-6


@pytest.mark.parametrize("case,match", [
    ("lstm", "nn.LSTMCell"), ("mha_seq_first", "batch_first=True"), ("mha_mask", "mask"),
    ("softmax_nodim", "dim="), ("gelu_tanh", "approximate")])
def test_clear_errors(case, match):
    torch.manual_seed(0)
    if case == "lstm":
        model, x0 = _Wrap(lambda s, x: s.m(x)[0].flatten(1), m=nn.LSTM(4, 3, batch_first=True)), torch.randn(2, 3, 4)
    elif case == "mha_seq_first":
        model, x0 = _Wrap(lambda s, x: s.m(x, x, x)[0].flatten(1), m=nn.MultiheadAttention(4, 2)), torch.randn(2, 3, 4)
    elif case == "mha_mask":
        mask = torch.zeros(3, 3, dtype=torch.bool)
        model = _Wrap(lambda s, x: s.m(x, x, x, attn_mask=mask)[0].flatten(1), m=nn.MultiheadAttention(4, 2, batch_first=True))
        x0 = torch.randn(2, 3, 4)
    elif case == "softmax_nodim":
        model, x0 = _Wrap(lambda s, x: s.m(x), m=nn.Softmax()), torch.randn(2, 4)
    else:
        model, x0 = _Wrap(lambda s, x: s.m(x), m=nn.GELU(approximate="tanh")), torch.randn(2, 4)
    with pytest.raises((TraceError, UnsupportedOperation), match=match):
        net = BoundedModule(model, x0)
        net.compute_bounds(x=(BoundedTensor(x0, PerturbationLpNorm(eps=0.1)),), method="IBP")
