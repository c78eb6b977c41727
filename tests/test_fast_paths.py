"""Fast IBP paths (certtrain.bounds.ibp_program) against the reference path (``ibp_skip_clean=False``):
the generated program without the clean forward pass and its torch.compile'd form give the same
bounds and parameter gradients, never reuse a stale compiled graph, and stay sound.

Compiled tests use a counting dynamo backend that runs the captured graph as is (no code
generation, so they take seconds): it proves what matters here, that the whole program is one
graph whose guards send every change to a fresh or matching graph.  ``aot_eager`` covers the
compiled backward.  Inductor itself (minutes of C++ compilation on a cold cache) runs with
``CERTTRAIN_TEST_INDUCTOR=1``, and ``scripts/bench.py`` checks it against the reference before timing.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from torch import nn

import certtrain_models as models
from bound_checks import assert_sound
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm, UnsupportedOperation
from certtrain.bounds.ibp_program import compile_ibp, ibp_program_source, program_supported
from certtrain.loss_fusion import CrossEntropyBound, one_hot
from op_models import ActivationsMLP, ExpLogMLP, OpsCNN, TrainBNResNet, randomize_bn

SHAPE = (3, 8, 8)
ZOO = {
    "mlp": dict(hidden=(16, 16)),
    "cnn_7layer_bn": dict(width=4, linear_size=16),
    "resnet": dict(num_blocks=(1, 1), widths=(4, 8)),
    "resnext": dict(num_blocks=(1, 1), stem_width=4, bottleneck_width=2, linear_size=16),
    "densenet": dict(growth_rate=2, num_blocks=(1, 1), linear_size=16),
    "wide_resnet": dict(widen_factor=1, linear_size=16),
}
REF = {"ibp_skip_clean": False}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def zoo(name: str, dtype=torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(getattr(models, name)(in_shape=SHAPE, **ZOO[name]), seed).to(dtype)


def box(x, eps=0.03, norm=math.inf):
    lim = dict(x_L=0.0, x_U=1.0) if norm == math.inf else {}
    return BoundedTensor(x, PerturbationLpNorm(eps=eps, norm=norm, **lim))


def tiny_bn() -> nn.Module:
    """Conv-BN-ReLU-Linear: the smallest model with train/eval behaviour (quick to trace)."""
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Flatten(), nn.Linear(4 * 8 * 8, 10)))


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


class Counter:
    """A dynamo backend that counts the graphs it is given and runs them unchanged."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def assert_same(r, f, rel: float):
    """Bounds within ``rel`` relative error; gradients within ``rel`` of the largest gradient entry
    (a bias before a training-mode BatchNorm has a zero gradient up to rounding noise, whose size is
    that of the other gradients)."""
    for a, b in zip(r[:2], f[:2]):
        torch.testing.assert_close(b, a, rtol=rel, atol=rel)
    scale = max(g.abs().max().item() for g in r[2]) + 1
    for i, (a, b) in enumerate(zip(r[2], f[2])):
        err = (a - b).abs().max().item()
        assert err <= rel * scale, f"gradient {i} differs by {err:.3g} (scale {scale:.3g})"


def bounds_and_grads(net, model, x, C, **kw):
    """(lb, ub) of one IBP call and the gradients of their sum w.r.t. the model's parameters."""
    lb, ub = net.compute_bounds(x=(box(x, **kw),), C=C, method="IBP")
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(lb.sum() + 2 * ub.sum(), params)
    return lb.detach(), ub.detach(), grads


# ------------------------------------------------------------------ the program, eager
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(ZOO))
def test_program_equals_reference_on_the_zoo(name, dtype):
    """Same arithmetic as the reference: bitwise the same bounds and gradients, eval and train
    BN, with and without C; no module runs its forward (no clean pass) unless a BatchNorm in
    training mode needs its batch."""
    model = zoo(name, dtype)
    x = torch.rand(3, *SHAPE, dtype=dtype)
    fast, ref = BoundedModule(model, x[:1]), BoundedModule(model, x[:1], bound_opts=REF)
    assert program_supported(fast) is None
    C = torch.randn(3, 4, 10, dtype=dtype)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d))]
    for mode in ("eval", "train"):
        getattr(model, mode)()
        for c in (None, C):
            r = bounds_and_grads(ref, model, x, c)
            calls.clear()
            f = bounds_and_grads(fast, model, x, c)
            has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
            if mode == "train" and has_bn:
                assert calls, "training-mode BatchNorm needs the clean batch"
            else:
                assert not calls, "the fast path ran the clean forward pass"
            for a, b in zip(r[:2] + r[2], f[:2] + f[2]):
                assert torch.equal(a, b)
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("norm", [math.inf, 2, 1], ids=["linf", "l2", "l1"])
@pytest.mark.parametrize("cls", [OpsCNN, ActivationsMLP, ExpLogMLP, TrainBNResNet])
def test_program_equals_reference_on_every_op(cls, norm):
    """Every op with a rule (shape queries, cat, pooling, reductions, ...), and the Lp-ball path."""
    torch.manual_seed(0)
    model = randomize_bn(cls()).double()
    model.train(cls is TrainBNResNet)
    side = 8 if cls in (OpsCNN, TrainBNResNet) else 4
    x = torch.rand(3, 2, side, side, dtype=torch.float64)
    fast, ref = BoundedModule(model, x[:1]), BoundedModule(model, x[:1], bound_opts=REF)
    assert program_supported(fast) is None
    C = torch.randn(3, 2, 5, dtype=torch.float64)
    for c in (None, C):
        r = bounds_and_grads(ref, model, x, c, norm=norm, eps=0.05)
        f = bounds_and_grads(fast, model, x, c, norm=norm, eps=0.05)
        for a, b in zip(r[:2] + r[2], f[:2] + f[2]):
            assert torch.equal(a, b)


def test_program_with_an_unperturbed_input_and_the_errors_of_the_reference():
    """Loss fusion's model: the label input is a clean constant.  A rule's own error (active
    Dropout) is raised as on the reference path."""
    torch.manual_seed(0)
    model = zoo("mlp").eval()
    x, y = torch.rand(4, *SHAPE), torch.randint(0, 10, (4,))
    oh = one_hot(y, 10, x)
    fast = BoundedModule(CrossEntropyBound(model), (x[:1], oh[:1]))
    ref = BoundedModule(CrossEntropyBound(model), (x[:1], oh[:1]), bound_opts=REF)
    for a, b in zip(fast.compute_bounds(x=(box(x), oh), method="IBP"), ref.compute_bounds(x=(box(x), oh), method="IBP")):
        assert torch.equal(a, b)
    drop = ActivationsMLP().train()
    xd = torch.rand(2, 2, 4, 4)
    with pytest.raises(UnsupportedOperation, match="Dropout"):
        BoundedModule(drop, xd[:1]).compute_bounds(x=(box(xd),), method="IBP")


def test_forward_cache_serves_the_training_step():
    """net(x) then IBP in training mode: one clean pass in all (the cached one), the reference's
    bounds and gradients, and the cache serves one call only."""
    model = zoo("cnn_7layer_bn").train()
    x = torch.rand(4, *SHAPE)
    fast, ref = BoundedModule(model, x[:1]), BoundedModule(model, x[:1], bound_opts=REF)
    C = torch.randn(4, 9, 10)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    runs = []
    h = bn.register_forward_hook(lambda *a: runs.append(1))
    ref(x)
    r = bounds_and_grads(ref, model, x, C)
    runs.clear()
    fast(x)
    f = bounds_and_grads(fast, model, x, C)
    assert len(runs) == 1, "the fast path ran a second clean pass instead of the cached one"
    for a, b in zip(r[:2] + r[2], f[:2] + f[2]):
        assert torch.equal(a, b)
    fast.compute_bounds(x=(box(x),), C=C, method="IBP")
    assert len(runs) == 2  # the cache was consumed by the previous call
    h.remove()


def test_keep_intermediate_and_undeclared_rules():
    model = zoo("resnet").eval()
    x = torch.rand(2, *SHAPE)
    fast, ref = BoundedModule(model, x[:1]), BoundedModule(model, x[:1], bound_opts=REF)
    fast.compute_bounds(x=(box(x),), method="IBP", keep_intermediate=True)
    ref.compute_bounds(x=(box(x),), method="IBP", keep_intermediate=True)
    a, b = fast.save_intermediate(), ref.save_intermediate()
    assert list(a) == list(b) and len(a) > 10
    for k in a:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
    fast.compute_bounds(x=(box(x),), method="IBP")
    with pytest.raises(RuntimeError, match="keep_intermediate"):
        fast.save_intermediate()
    # A rule that does not declare its clean-value reads (ibp_operands) sends the model to the
    # reference path.
    other = BoundedModule(model, x[:1])
    node = next(n for n in other.nodes if type(n.op).__name__ == "BoundReLU")
    node.op = type("MyReLU", (type(node.op),), {"ibp_operands": None})(node.op.node, node.op.module, node.op.opts)
    reason = program_supported(other)
    assert reason is not None and "MyReLU" in reason and node.name in reason
    with pytest.raises(ValueError, match="MyReLU"):
        ibp_program_source(other)
    torch.testing.assert_close(other.compute_bounds(x=(box(x),), method="IBP"),
                               ref.compute_bounds(x=(box(x),), method="IBP"), rtol=0, atol=0)


def test_program_source_is_straight_line():
    model = zoo("cnn_7layer_bn")
    net = BoundedModule(model, torch.rand(1, *SHAPE))
    src = ibp_program_source(net)
    n_rules = sum(1 for n in net.nodes if n.op is not None)
    assert src.count("_ibp(") == n_rules
    assert not any(w in src for w in ("for ", "while ", "if ")), src


# ------------------------------------------------------------------ options
def test_channels_last_and_bad_options(monkeypatch):
    model = zoo("cnn_7layer_bn").eval()
    x = torch.rand(3, *SHAPE)
    ref = BoundedModule(model, x[:1], bound_opts=REF)
    cl = BoundedModule(model, x[:1], bound_opts={"ibp_channels_last": True})
    seen = []
    conv2d = torch.nn.functional.conv2d

    def spy(inp, *a, **k):
        seen.append(inp.is_contiguous(memory_format=torch.channels_last) and not inp.is_contiguous())
        return conv2d(inp, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    got = cl.compute_bounds(x=(box(x),), method="IBP")
    monkeypatch.undo()
    assert seen and seen[0], "the first convolution did not get a channels_last box"
    torch.testing.assert_close(got, ref.compute_bounds(x=(box(x),), method="IBP"), **tol(torch.float32))
    for opts, match in (({"ibp_cuda_graphs": True}, "CUDA"), ({"ibp_compile": "yes"}, "ibp_compile"),
                        ({"ibp_compile": {"backnd": "eager"}}, "backnd"), ({"ibp_autocast": "float16"}, "ibp_autocast"),
                        ({"ibp_skip_clean": 1}, "ibp_skip_clean")):
        with pytest.raises(ValueError, match=match):
            BoundedModule(model, x[:1], bound_opts=opts).compute_bounds(x=(box(x),), method="IBP")


def test_bf16_autocast_in_training_only():
    """Under autocast the bounds move by bf16 rounding (and come back as float32); under no_grad
    or in eval mode (verification) the option does nothing."""
    model = zoo("cnn_7layer_bn").train()
    x = torch.rand(4, *SHAPE)
    C = torch.randn(4, 9, 10)
    ref = BoundedModule(model, x[:1], bound_opts=REF)
    bf = BoundedModule(model, x[:1], bound_opts={"ibp_autocast": "bfloat16"})
    lr, ur = ref.compute_bounds(x=(box(x),), C=C, method="IBP")
    lb, ub = bf.compute_bounds(x=(box(x),), C=C, method="IBP")
    assert lb.dtype == torch.float32 and lb.requires_grad
    scale = lr.abs().max() + ur.abs().max()
    assert not torch.equal(lb, lr), "autocast was not applied"
    assert (lb - lr).abs().max() < 0.05 * scale and (ub - ur).abs().max() < 0.05 * scale
    with torch.no_grad():
        for a, b in zip(bf.compute_bounds(x=(box(x),), C=C, method="IBP"),
                        ref.compute_bounds(x=(box(x),), C=C, method="IBP")):
            assert torch.equal(a, b)
    model.eval()
    for a, b in zip(bf.compute_bounds(x=(box(x),), C=C, method="IBP"), ref.compute_bounds(x=(box(x),), C=C, method="IBP")):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ compiled
def assert_compiled_is_one_graph_like_reference(model, x, C):
    """The compiled program is one dynamo graph and gives the reference's bounds and gradients."""
    counter = Counter()
    fast = BoundedModule(model, x[:1], bound_opts={"ibp_compile": {"backend": counter}})
    ref = BoundedModule(model, x[:1], bound_opts=REF)
    r = bounds_and_grads(ref, model, x, C)
    f = bounds_and_grads(fast, model, x, C)
    assert len(counter.graphs) == 1, "graph breaks in the IBP program"
    assert_same(r, f, 1e-5)


@pytest.mark.parametrize("name", list(ZOO))
def test_compiled_training_step_equals_reference(name):
    """The training case (train-mode BN, C, gradients) of every zoo model is one dynamo graph
    with the reference's bounds and gradients."""
    model = zoo(name).train()
    x = torch.rand(3, *SHAPE)
    assert_compiled_is_one_graph_like_reference(model, x, torch.randn(3, 9, 10))


@pytest.mark.parametrize("cls", [OpsCNN, TrainBNResNet, ExpLogMLP])
def test_compiled_every_op(cls):
    """Functional ops (whose rules read fx.Node.args), shape queries, cat, pooling, reductions:
    still one graph, the reference's bounds and gradients."""
    torch.manual_seed(0)
    model = randomize_bn(cls()).train(cls is TrainBNResNet)
    side = 4 if cls is ExpLogMLP else 8
    x = torch.rand(3, 2, side, side)
    assert_compiled_is_one_graph_like_reference(model, x, torch.randn(3, 2, 5))


def test_compiled_never_serves_a_stale_graph():
    """After each change (ε, batch, parameters, mode, spec, dtype) the compiled bounds equal the
    reference's; a new ε or an optimizer step reuses the graph, a new mode or dtype does not."""
    model = tiny_bn().eval()
    counter = Counter()
    x = torch.rand(3, *SHAPE)
    fast = BoundedModule(model, x[:1], bound_opts={"ibp_compile": {"backend": counter}})
    ref = BoundedModule(model, x[:1], bound_opts=REF)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def check(x, C, eps, dtype=torch.float32):
        with torch.no_grad():
            a = fast.compute_bounds(x=(box(x, eps),), C=C, method="IBP")
            b = ref.compute_bounds(x=(box(x, eps),), C=C, method="IBP")
        torch.testing.assert_close(a, b, **tol(dtype))
        return len(counter.graphs)

    C = torch.randn(3, 4, 10)
    g = check(x, C, 0.03)
    assert check(x, C, 0.1) == g, "a new eps recompiled"
    x5 = torch.rand(5, *SHAPE)
    C5 = torch.randn(5, 4, 10)
    g = check(x5, C5, 0.1)
    assert check(x5[:4], C5[:4], 0.1) == g, "the batch size did not become dynamic"
    with torch.no_grad():
        before = fast.compute_bounds(x=(box(x5),), C=C5, method="IBP")[0]
    opt.zero_grad()
    ref.compute_bounds(x=(box(x5),), C=C5, method="IBP")[0].mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()  # in place: the compiled program must read the new values
    assert check(x5, C5, 0.1) == g, "an optimizer step recompiled"
    with torch.no_grad():
        assert not torch.allclose(before, fast.compute_bounds(x=(box(x5),), C=C5, method="IBP")[0])
    model.train()
    assert check(x5, C5, 0.1) > g
    g = len(counter.graphs)
    model.eval()
    assert check(x5, C5, 0.1) == g, "back to eval mode did not reuse the eval graph"
    check(x5, torch.randn(5, 9, 10), 0.1)
    check(x5, None, 0.1)
    g = len(counter.graphs)
    model.double()
    assert check(x5.double(), C5.double(), 0.1, torch.float64) > g


def test_compiled_gradients_through_aot_autograd():
    """aot_eager: the compiled forward *and* backward of the training step (train-mode BN with the
    cached clean pass), twice with an optimizer step in between."""
    model = tiny_bn().train()
    x = torch.rand(4, *SHAPE)
    fast = BoundedModule(model, x[:1], bound_opts={"ibp_compile": {"backend": "aot_eager"}})
    ref = BoundedModule(model, x[:1], bound_opts=REF)
    C = torch.randn(4, 9, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        ref(x)
        r = bounds_and_grads(ref, model, x, C)
        fast(x)
        f = bounds_and_grads(fast, model, x, C)
        assert_same(r, f, 1e-5)
        for p, g in zip(model.parameters(), f[2]):
            p.grad = g
        opt.step()


def test_compile_failure_falls_back_with_one_warning():
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    model = zoo("mlp").eval()
    x = torch.rand(2, *SHAPE)
    net = compile_ibp(BoundedModule(model, x[:1]), backend=broken)
    ref = BoundedModule(model, x[:1], bound_opts=REF)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        a = net.compute_bounds(x=(box(x),), method="IBP")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = net.compute_bounds(x=(box(x, 0.1),), method="IBP")
    for got, eps in ((a, 0.03), (b, 0.1)):
        for u, v in zip(got, ref.compute_bounds(x=(box(x, eps),), method="IBP")):
            assert torch.equal(u, v)


def test_fast_paths_are_sound():
    model = zoo("cnn_7layer_bn", torch.float64).eval()
    x = torch.rand(2, *SHAPE, dtype=torch.float64)
    C = torch.randn(2, 3, 10, dtype=torch.float64)
    ptb = PerturbationLpNorm(eps=0.02, x_L=0.0, x_U=1.0)
    for opts in ({}, {"ibp_compile": {"backend": Counter()}}):
        net = BoundedModule(model, x[:1], bound_opts=opts)
        with torch.no_grad():
            lb, ub = net.compute_bounds(x=(BoundedTensor(x, ptb),), C=C, method="IBP")
        assert_sound(model, x, ptb, lb, ub, C=C, n_random=50, pgd_steps=10)


@pytest.mark.skipif(os.environ.get("CERTTRAIN_TEST_INDUCTOR") != "1",
                    reason="inductor compiles C++ for minutes on a cold cache; CERTTRAIN_TEST_INDUCTOR=1 runs it")
def test_inductor_equals_reference():
    model = zoo("cnn_7layer_bn").eval()
    x = torch.rand(3, *SHAPE)
    fast = BoundedModule(model, x[:1], bound_opts={"ibp_compile": True})
    ref = BoundedModule(model, x[:1], bound_opts=REF)
    C = torch.randn(3, 9, 10)
    with torch.no_grad():
        for eps in (0.01, 0.05):
            torch.testing.assert_close(fast.compute_bounds(x=(box(x, eps),), C=C, method="IBP"),
                                       ref.compute_bounds(x=(box(x, eps),), C=C, method="IBP"), **tol(torch.float32))
    model.train()
    r = bounds_and_grads(ref, model, x, C)
    f = bounds_and_grads(fast, model, x, C)
    assert_same(r, f, 1e-5)
