"""Word-substitution sets (`PerturbationSynonym`): every bound method is checked against the exact
extremes over *all* sentences with at most `budget` substitutions (exhaustive enumeration on small
sentences), in float32 and float64; CROWN's concretization is exact for the budget; a per-token
Linear is bounded over the set itself; the ramp (eps < 1) shrinks the set and never certifies."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from bound_checks import tolerance
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationSynonym
from seq_op_models import LSTMCellClassifier, TransformerClassifier

METHODS = ["IBP", "CROWN-IBP", "CROWN", "alpha-CROWN"]
FAST = {"iteration": 5, "lr_alpha": 0.3}


class TokenMLP(nn.Module):
    """Per-token Linear + ReLU, a masked mean over the positions, a Linear head (the mask is a
    plain second input, as text models take it)."""

    def __init__(self, d=4, h=6, out=3):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(5, d) * 0.3)
        self.fc, self.head = nn.Linear(d, h), nn.Linear(h, out)

    def forward(self, x, mask):
        h = torch.relu(self.fc(x + self.pos[: x.shape[1]]))
        h = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return self.head(h)


class FlatLinear(nn.Module):
    """One Linear over the whole flattened sentence: its exact extremes need the budget."""

    def __init__(self, t=5, d=4, out=3):
        super().__init__()
        self.fc = nn.Linear(t * d, out)

    def forward(self, x):
        return self.fc(x.flatten(1))


def enumerate_sentences(x0, moves, budget):
    """Every sentence of one example with at most ``budget`` substitutions: (n, T, D)."""
    T, K, _ = moves.shape
    options = [[k for k in range(K) if moves[t, k].abs().sum() > 0] for t in range(T)]
    out = [x0]
    subs = [t for t in range(T) if options[t]]
    for r in range(1, min(budget, len(subs)) + 1):
        for pos in itertools.combinations(subs, r):
            for ks in itertools.product(*(options[t] for t in pos)):
                x = x0.clone()
                for t, k in zip(pos, ks):
                    x[t] = x0[t] + moves[t, k]
                out.append(x)
    return torch.stack(out)


def make_case(T=5, D=4, K=3, B=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, T, D, generator=g, dtype=dtype)
    cands = x0.unsqueeze(2) + 0.4 * torch.randn(B, T, K, D, generator=g, dtype=dtype)
    mask = torch.rand(B, T, K, generator=g) > 0.35
    mask[:, 1] = False  # a position without candidates (stop word / padding)
    return x0, cands, mask


def exact_extremes(fn, x0, ptb):
    """min / max of fn over the whole set, per example: (B, n_out) each."""
    moves = ptb.moves(x0)
    lo, hi = [], []
    for b in range(x0.shape[0]):
        xs = enumerate_sentences(x0[b], moves[b], ptb.budget)
        y = fn(xs, b)
        lo.append(y.min(0).values)
        hi.append(y.max(0).values)
    return torch.stack(lo), torch.stack(hi)


MODELS = {
    "token_mlp": lambda: TokenMLP(),
    "flat_linear": lambda: FlatLinear(),
    "transformer": lambda: TransformerClassifier(d=4, heads=2, ffn=6, out=3, mean_only=True),
    "lstmcell": lambda: LSTMCellClassifier(d=4, hidden=4, steps=5, out=3),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("budget", [1, 2, 3])
def test_sound_against_every_substitution(name, budget, dtype):
    torch.manual_seed(1)
    model = MODELS[name]().to(dtype).eval()
    x0, cands, cmask = make_case(dtype=dtype, seed=budget)
    mask = torch.ones(x0.shape[:2], dtype=dtype)
    mask[1, -1] = 0  # example 1 is one token shorter (the model sees the mask)
    two = name == "token_mlp"
    args = lambda x: (x, mask) if two else (x,)  # noqa: E731
    net = BoundedModule(model, args(x0))
    ptb = PerturbationSynonym(budget, cands, cmask)
    with torch.no_grad():
        lo, hi = exact_extremes(lambda xs, b: model(*((xs, mask[b].expand(len(xs), -1)) if two else (xs,))),
                                x0, ptb)
        for m in METHODS:
            opts = {"optimize_bound_args": FAST} if m == "alpha-CROWN" else {}
            lb, ub = net.compute_bounds(x=args(BoundedTensor(x0, ptb)), method=m, **opts)
            tol = tolerance(lb, ub)
            assert (lb <= lo + tol).all(), (m, (lb - lo).max())
            assert (ub >= hi - tol).all(), (m, (hi - ub).max())


@pytest.mark.parametrize("budget", [0, 1, 2, 4, 9])
def test_crown_concretization_is_exact_for_the_budget(budget):
    """For a linear model the CROWN bound is the exact extreme over the set (the closed form of the
    dynamic program over positions); budgets beyond the length change nothing."""
    torch.manual_seed(0)
    model = FlatLinear().double().eval()
    x0, cands, cmask = make_case(seed=7)
    ptb = PerturbationSynonym(budget, cands, cmask)
    net = BoundedModule(model, x0)
    with torch.no_grad():
        lb, ub = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="CROWN")
        lo, hi = exact_extremes(lambda xs, b: model(xs), x0, ptb)
    torch.testing.assert_close(lb, lo, rtol=0, atol=1e-12)
    torch.testing.assert_close(ub, hi, rtol=0, atol=1e-12)
    if budget == 0:
        torch.testing.assert_close(lb, model(x0), rtol=0, atol=1e-12)


def test_per_token_linear_is_bounded_over_the_set():
    """IBP of a Linear applied per token (after a constant positional add) is the exact interval of
    every output element, tighter than the Linear of the candidates' box."""
    torch.manual_seed(0)
    fc = nn.Linear(4, 6).double()
    pos = torch.randn(5, 4, dtype=torch.float64)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = fc
            self.register_buffer("pos", pos)

        def forward(self, x):
            return self.fc((x + self.pos) * 2.0)

    x0, cands, cmask = make_case(seed=3)
    ptb = PerturbationSynonym(1, cands, cmask)
    net = BoundedModule(M(), x0)
    with torch.no_grad():
        lb, ub = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="IBP")
        xs_lo, xs_hi = exact_extremes(lambda xs, b: M()(xs).flatten(1), x0, ptb)
        torch.testing.assert_close(lb.flatten(1), xs_lo, rtol=0, atol=1e-12)
        torch.testing.assert_close(ub.flatten(1), xs_hi, rtol=0, atol=1e-12)
        l, u = ptb.interval(x0)
        r = (2 * (u - l) / 2) @ fc.weight.abs().t()  # the box's radius through the layer
        assert ((ub - lb) <= 2 * r + 1e-12).all() and ((ub - lb) < 2 * r - 1e-6).any()


def test_box_holds_every_candidate_and_ignores_masked_ones():
    x0, cands, cmask = make_case(dtype=torch.float64, seed=5)
    cands = cands.clone()
    cands[~cmask] = 1e6  # masked slots must not matter
    ptb = PerturbationSynonym(2, cands, cmask)
    lo, hi = ptb.interval(x0)
    assert (lo <= x0).all() and (hi >= x0).all()
    real = cands[cmask]
    idx = cmask.nonzero()
    assert (lo[idx[:, 0], idx[:, 1]] <= real).all() and (hi[idx[:, 0], idx[:, 1]] >= real).all()
    assert hi.max() < 1e3
    assert torch.equal(lo[:, 1], x0[:, 1]) and torch.equal(hi[:, 1], x0[:, 1])  # no candidates there
    lo0, hi0 = PerturbationSynonym(0, cands, cmask).interval(x0)
    assert torch.equal(lo0, x0) and torch.equal(hi0, x0)


def test_ramp_shrinks_the_set_and_does_not_certify():
    x0, cands, cmask = make_case(dtype=torch.float64, seed=2)
    half = PerturbationSynonym(2, cands, cmask, eps=0.5)
    full = PerturbationSynonym(2, cands, cmask)
    assert full.certifies and not half.certifies
    torch.testing.assert_close(half.moves(x0), 0.5 * full.moves(x0))
    lh, uh = half.interval(x0)
    lf, uf = full.interval(x0)
    assert (lh >= lf).all() and (uh <= uf).all()


def test_bounds_are_differentiable_in_embeddings_and_candidates():
    """Training minimises a loss of the bounds: gradients reach the sentence's embeddings and the
    candidates' (both come from the embedding table, outside the bounded graph)."""
    torch.manual_seed(0)
    model = TokenMLP().double()
    x0, cands, cmask = make_case(seed=4)
    x0.requires_grad_(True)
    cands.requires_grad_(True)
    mask = torch.ones(x0.shape[:2], dtype=torch.float64)
    net = BoundedModule(model, (x0, mask))
    for m in ["IBP", "CROWN-IBP"]:
        lb, _ = net.compute_bounds(x=(BoundedTensor(x0, PerturbationSynonym(2, cands, cmask, eps=0.7)), mask),
                                   method=m)
        gx, gc = torch.autograd.grad(lb.sum(), [x0, cands])
        assert gx.abs().sum() > 0 and gc.abs().sum() > 0
        assert gc[~cmask].abs().sum() == 0  # masked candidates play no part


@pytest.mark.parametrize("bad, match", [
    (dict(budget=-1), "budget"), (dict(budget=1.5), "budget"), (dict(eps=1.5), "eps"),
    (dict(candidates=torch.zeros(2, 5, 4)), "candidates must be"),
])
def test_bad_settings_are_refused(bad, match):
    x0, cands, cmask = make_case(seed=1)
    kw = {"budget": 1, "candidates": cands, "candidate_mask": cmask, **bad}
    with pytest.raises(ValueError, match=match):
        PerturbationSynonym(**kw)


def test_shape_mismatch_names_the_shapes():
    x0, cands, cmask = make_case(seed=1)
    net = BoundedModule(FlatLinear().double(), x0)
    ptb = PerturbationSynonym(1, cands[:, :4], cmask[:, :4])
    with pytest.raises(ValueError, match=r"do not fit the input"):
        net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="IBP")
