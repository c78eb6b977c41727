"""Tests for the text classifiers of the zoo (``models/lstm.py``, ``models/transformer.py``; CPU, fast).

Each model is an ``nn.Embedding`` (outside the bounded graph) and an encoder
``(emb (B, max_len, D), mask (B, max_len)) -> logits`` that the bound engine traces with the embeddings
perturbed and the mask a constant input. Checked: shapes and the wrapper's padding of short inputs;
padding never changes the output (content, amount, and for the LSTM its position); gradients reach the
embedding; the LSTM is nn.LSTMCell's cell and a Transformer layer is nn.TransformerEncoderLayer's;
IBP / CROWN-IBP / CROWN bounds of the encoders (masks with padding, float64 and float32) equal the
output at eps = 0 and hold at random points, corners and PGD points of the L∞ box; a box on the padded
positions changes no bound.

Parameter counts of the defaults (vocab_size 5000, embed_dim 64, max_len 32, 2 classes; 320,000 of
them are the embedding; checked in ``test_default_parameter_counts``):

=========================================  ==========  ========
model                                      parameters  encoder
=========================================  ==========  ========
lstm (hidden 64)                              353,154    33,154
transformer (1 layer, mean-only LN)           355,650    35,650
transformer, layer_norm="none"                355,394    35,394
transformer, num_layers=2                     389,122    69,122
transformer, pooler=True                      359,810    39,810
=========================================  ==========  ========
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bound_checks import assert_sound, tolerance
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm
from certtrain_models import MODELS, TEXT_MODELS, get_model, lstm, transformer
from certtrain_models.text import TextClassifier
from certtrain_models.transformer import MeanLayerNorm

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny graphs: threads only add overhead

VOCAB, T, CLASSES = 30, 6, 3

# Small widths: every forward, trace and bound below is cheap.
SMALL = {
    "lstm": lambda: lstm(vocab_size=VOCAB, num_classes=CLASSES, embed_dim=6, hidden=5, max_len=T),
    "transformer": lambda: transformer(vocab_size=VOCAB, num_classes=CLASSES, embed_dim=8, heads=2, ffn=12, max_len=T),
    "transformer_2layer_std_pooler": lambda: transformer(
        vocab_size=VOCAB, num_classes=CLASSES, embed_dim=8, heads=2, ffn=12, max_len=T, num_layers=2,
        layer_norm="standard", pooler=True),
    "transformer_no_ln": lambda: transformer(
        vocab_size=VOCAB, num_classes=CLASSES, embed_dim=8, heads=4, ffn=6, max_len=T, layer_norm="none"),
}
LENGTHS = (6, 4, 1, 2)  # a full sentence and padded ones


def _build(name: str, dtype=torch.float64) -> TextClassifier:
    torch.manual_seed(0)
    model = SMALL[name]().to(dtype).eval()
    with torch.no_grad():  # non-trivial norms, so that their parameters matter
        for mod in model.modules():
            if isinstance(mod, (nn.LayerNorm, MeanLayerNorm)):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    return model


def _ids(lengths=LENGTHS, seed: int = 1) -> torch.Tensor:
    """(len(lengths), T) token ids in 1..VOCAB-1, padded with 0 after each length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), T), generator=g)
    for b, n in enumerate(lengths):
        ids[b, n:] = 0
    return ids


class FixedMask(nn.Module):
    """``x -> encoder(x, mask)`` for a fixed mask of B rows, on batches of k * B (bound_checks' points
    are (k, B, ...) flattened, example b of copy j at row j * B + b)."""

    def __init__(self, encoder: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, self.mask.repeat(x.shape[0] // self.mask.shape[0], 1))


# ---------------------------------------------------------------------------- the models themselves


@pytest.mark.parametrize("name", list(SMALL))
def test_shapes_and_attributes(name):
    model = _build(name)
    ids = _ids()
    y = model(ids)
    assert y.shape == (len(LENGTHS), CLASSES) and torch.isfinite(y).all()
    assert isinstance(model, TextClassifier) and isinstance(model.embedding, nn.Embedding)
    attrs = (model.pad_id, model.max_len, model.embed_dim, model.vocab_size, model.num_classes)
    assert attrs == (0, T, model.embedding.embedding_dim, VOCAB, CLASSES)
    assert model.embedding.padding_idx == 0
    emb, mask = model.embed(ids)
    assert emb.shape == (len(LENGTHS), T, model.embed_dim) and emb.dtype == mask.dtype == torch.float64
    torch.testing.assert_close(mask.sum(1), torch.tensor(LENGTHS, dtype=torch.float64))
    torch.testing.assert_close(model.encoder(emb, mask), y, rtol=0, atol=0)
    # a shorter batch is padded to max_len on the right; a longer one is refused
    torch.testing.assert_close(model(ids[:, :4][1:]), y[1:], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(2, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        model.encoder(emb[:, :4], mask[:, :4])
    # the encoder traces with torch.fx, and the trace computes the same
    gm = torch.fx.symbolic_trace(model.encoder)
    torch.testing.assert_close(gm(emb, mask), y, rtol=1e-12, atol=1e-12)
    assert not any(isinstance(m, (nn.LSTM, nn.LSTMCell, nn.MultiheadAttention)) for m in model.modules())


@pytest.mark.parametrize("name", list(SMALL))
def test_padding_does_not_change_the_output(name):
    model = _build(name)
    ids = _ids()
    with torch.no_grad():
        y = model(ids)
        # each sentence alone, at its own length (the wrapper pads it)
        for b, n in enumerate(LENGTHS):
            torch.testing.assert_close(model(ids[b : b + 1, :n]), y[b : b + 1], rtol=1e-12, atol=1e-12)
        # anything at the padded positions of the encoder's input
        emb, mask = model.embed(ids)
        noise = torch.randn_like(emb) * 10 * (1 - mask)[..., None]
        torch.testing.assert_close(model.encoder(emb + noise, mask), y, rtol=1e-12, atol=1e-12)
        if name == "lstm":  # the LSTM skips padded steps wherever they are (left / inner padding)
            short = ids[1:2, :4]  # length 4
            left = torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1)
            inner = torch.cat([short[:, :1], torch.zeros(1, 2, dtype=torch.long), short[:, 1:]], 1)
            torch.testing.assert_close(model(left), y[1:2], rtol=0, atol=0)
            torch.testing.assert_close(model(inner), y[1:2], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(SMALL))
def test_gradient_reaches_the_embedding(name):
    model = _build(name).train()
    ids = _ids()
    loss = nn.functional.cross_entropy(model(ids), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    g = model.embedding.weight.grad
    assert g is not None and torch.isfinite(g).all()
    used = torch.unique(ids[ids != 0])
    assert (g[used].abs().sum(1) > 0).all()
    assert (g[0] == 0).all()  # padding_idx: the pad row never learns
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_lstm_is_lstmcell():
    """The explicit cell computes nn.LSTMCell (gate order i, f, g, o; one bias = b_ih + b_hh)."""
    model = _build("lstm")
    enc = model.encoder
    cell = nn.LSTMCell(enc.embed_dim, enc.hidden).double()
    with torch.no_grad():
        cell.weight_ih.copy_(enc.input_gates.weight)
        cell.weight_hh.copy_(enc.hidden_gates.weight)
        cell.bias_ih.copy_(enc.input_gates.bias * 0.3)
        cell.bias_hh.copy_(enc.input_gates.bias * 0.7)
        ids = _ids(lengths=(T, T, T))
        emb, _ = model.embed(ids)
        h, c = cell(emb[:, 0])
        for t in range(1, T):
            h, c = cell(emb[:, t], (h, c))
        torch.testing.assert_close(model(ids), enc.classifier(h), rtol=1e-12, atol=1e-12)
        # a sentence of length 4 ends at the state after its 4th token
        h, c = cell(emb[:1, 0])
        for t in range(1, 4):
            h, c = cell(emb[:1, t], (h, c))
        torch.testing.assert_close(model(ids[:1, :4]), enc.classifier(h), rtol=1e-12, atol=1e-12)


def test_transformer_layer_is_torch_encoder_layer():
    """With ``layer_norm="standard"`` a layer computes nn.TransformerEncoderLayer (post-LN, ReLU, no
    dropout) with a key padding mask, at every real token."""
    model = _build("transformer_2layer_std_pooler")
    ours = model.encoder.layers[0]
    ref = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True).double().eval()
    att = ours.attention
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(torch.cat([att.query.weight, att.key.weight, att.value.weight]))
        ref.self_attn.in_proj_bias.copy_(torch.cat([att.query.bias, att.key.bias, att.value.bias]))
        ref.self_attn.out_proj.weight.copy_(att.out.weight)
        ref.self_attn.out_proj.bias.copy_(att.out.bias)
        ref.linear1.load_state_dict(ours.ffn[0].state_dict())
        ref.linear2.load_state_dict(ours.ffn[2].state_dict())
        ref.norm1.load_state_dict(ours.norm1.state_dict())
        ref.norm2.load_state_dict(ours.norm2.state_dict())
        ids = _ids()
        emb, mask = model.embed(ids)
        key_bias = ((1 - mask) * -10000.0)[:, None, None, :]
        got = ours(emb, key_bias)
        want = ref(emb, src_key_padding_mask=mask == 0)
        keep = mask.bool()
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-10, atol=1e-10)


def test_mean_layer_norm():
    model = _build("transformer")
    norm = model.encoder.layers[0].norm1
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(norm(x), (x - x.mean(-1, keepdim=True)) * norm.weight + norm.bias)
    assert isinstance(_build("transformer_2layer_std_pooler").encoder.layers[1].norm2, nn.LayerNorm)
    assert isinstance(_build("transformer_no_ln").encoder.layers[0].norm1, nn.Identity)


# ---------------------------------------------------------------------------- bounds

EPS = 0.05


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "CROWN"])
@pytest.mark.parametrize("name", list(SMALL))
def test_encoder_bounds_sound(name, method, dtype):
    model = _build(name, dtype)
    ids = _ids()
    with torch.no_grad():
        emb, mask = model.embed(ids)
    net = BoundedModule(model.encoder, (emb, mask))
    ptb = PerturbationLpNorm(norm=math.inf, eps=EPS)
    with torch.no_grad():
        lb, ub = net.compute_bounds(x=(BoundedTensor(emb, ptb), mask), method=method)
    assert lb.shape == ub.shape == (len(LENGTHS), CLASSES)
    assert torch.isfinite(lb).all() and torch.isfinite(ub).all() and (lb <= ub).all()
    reference = FixedMask(_build(name, torch.float64).encoder, mask.double()) if dtype == torch.float32 else None
    assert_sound(FixedMask(model.encoder, mask), emb, ptb, lb, ub, n_random=100, pgd_steps=10, reference=reference)


@pytest.mark.parametrize("name", list(SMALL))
def test_bounds_at_eps_zero_are_the_output(name):
    # float32: IBP widens the rounding of the clean pass (a few ulps per node) through every node;
    # LayerNorm's x - mean(x), square and rsqrt amplify it (2 standard-LN layers: ~4e-4 at the output)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-3)):
        model = _build(name, dtype)
        with torch.no_grad():
            emb, mask = model.embed(_ids())
            y = model.encoder(emb, mask)
            net = BoundedModule(model.encoder, (emb, mask))
            for method in ("IBP", "CROWN-IBP", "CROWN"):
                lb, ub = net.compute_bounds(x=(BoundedTensor(emb, PerturbationLpNorm(eps=0.0)), mask), method=method)
                t = tolerance(lb, ub)  # a few ulps: the bounds hold in exact arithmetic
                assert (lb - t <= y).all() and (y <= ub + t).all(), (dtype, method)
                torch.testing.assert_close(lb, y, rtol=tol, atol=tol, msg=f"{dtype} {method} lower")
                torch.testing.assert_close(ub, y, rtol=tol, atol=tol, msg=f"{dtype} {method} upper")


@pytest.mark.parametrize("name", list(SMALL))
def test_a_box_on_the_padding_changes_no_bound(name):
    """A box on the padded positions alone (per-element eps) gives the clean output as bounds, and a box on
    every position gives the same bounds as one on the real tokens only."""
    model = _build(name)
    with torch.no_grad():
        emb, mask = model.embed(_ids())
        y = model.encoder(emb, mask)
        net = BoundedModule(model.encoder, (emb, mask))
        pad = (1 - mask)[..., None].expand_as(emb)
        for method in ("IBP", "CROWN-IBP", "CROWN"):
            def bounds(eps, method=method):
                return net.compute_bounds(x=(BoundedTensor(emb, PerturbationLpNorm(eps=eps)), mask), method=method)

            lb, ub = bounds(0.5 * pad)
            torch.testing.assert_close(lb, y, rtol=1e-10, atol=1e-10, msg=method)
            torch.testing.assert_close(ub, y, rtol=1e-10, atol=1e-10, msg=method)
            lb, ub = bounds(torch.full_like(emb, EPS))
            lr, ur = bounds(EPS * (1 - pad))
            assert (ub - lb).max() > 1e-3  # the real tokens' box does matter
            torch.testing.assert_close((lb, ub), (lr, ur), rtol=1e-12, atol=1e-12, msg=method)


def test_lstm_update_keeps_ibp_tight():
    """The masked update m h' + (1 - m) h sees h once: IBP's width grows with the relaxations, not by 2^T
    as for h + m (h' - h) (which IBP widens by h's width twice per step)."""
    model = _build("lstm")
    with torch.no_grad():
        emb, mask = model.embed(_ids(lengths=(T, T)))
        net = BoundedModule(model.encoder, (emb, mask))
        lb, ub = net.compute_bounds(x=(BoundedTensor(emb, PerturbationLpNorm(eps=EPS)), mask), method="IBP")
    assert (ub - lb).max() < 1.0


# ---------------------------------------------------------------------------- registry, options


EXPECTED_PARAMS = {  # (name, kwargs): (parameters, of which the encoder)
    ("lstm", ()): (353_154, 33_154),
    ("transformer", ()): (355_650, 35_650),
    ("transformer", (("layer_norm", "standard"),)): (355_650, 35_650),
    ("transformer", (("layer_norm", "none"),)): (355_394, 35_394),
    ("transformer", (("num_layers", 2),)): (389_122, 69_122),
    ("transformer", (("pooler", True),)): (359_810, 39_810),
}


def test_default_parameter_counts():
    assert {n for n, _ in EXPECTED_PARAMS} == set(TEXT_MODELS)
    for (name, kwargs), (total, encoder) in EXPECTED_PARAMS.items():
        with torch.device("meta"):
            model = MODELS[name](**dict(kwargs))
        n = sum(p.numel() for p in model.parameters())
        e = sum(p.numel() for p in model.encoder.parameters())
        assert (n, e) == (total, encoder), f"{name} {dict(kwargs)}: {n:,} / {e:,} parameters"
        assert model.embedding.weight.shape == (5000, 64) and model.max_len == 32


def test_registry_and_get_model():
    assert set(TEXT_MODELS) == {"lstm", "transformer"} and set(TEXT_MODELS) <= set(MODELS)
    # in_shape is for image models: a text model ignores it
    m = get_model("transformer", (3, 32, 32), 4, vocab_size=VOCAB, max_len=T, embed_dim=8, heads=2, ffn=8)
    assert isinstance(m, TextClassifier) and m.num_classes == 4 and m.max_len == T
    assert m(_ids()).shape == (len(LENGTHS), 4)
    assert get_model("lstm", None, None).num_classes == 2


def test_invalid_arguments():
    with pytest.raises(ValueError, match="divisible by heads"):
        transformer(embed_dim=10, heads=4)
    with pytest.raises(ValueError, match="layer_norm"):
        transformer(layer_norm="rms")
    with pytest.raises(ValueError, match="num_layers"):
        transformer(num_layers=0)
    with pytest.raises(ValueError, match="pad_id"):
        lstm(vocab_size=10, pad_id=10)
    with pytest.raises(ValueError, match="hidden"):
        lstm(hidden=0)
    with pytest.raises(ValueError, match="max_len"):
        lstm(max_len=2.5)
    model = _build("lstm")
    with pytest.raises(ValueError, match="integer"):
        model(torch.ones(2, 3))
    emb, mask = model.embed(_ids())
    with pytest.raises(ValueError, match="mask"):
        model.encoder(emb, mask[:, :3])
