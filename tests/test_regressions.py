"""Named regression tests: every soundness bug, crash or mutation found so far (issue 15's audit
and the random-graph suite, tests/test_fuzz_soundness.py), reduced to its smallest model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bound_checks import assert_sound
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm, TraceError, UnsupportedOperation

METHODS = ["IBP", "CROWN-IBP", "CROWN", "alpha-CROWN"]
DTYPES = [torch.float32, torch.float64]


def _bounds(model, x0, ptb, method, C=None, **opts):
    net = BoundedModule(model, x0, bound_opts=opts)
    with torch.no_grad():
        kw = dict(optimize_bound_args={"iteration": 5}) if method == "alpha-CROWN" else {}
        return net.compute_bounds(x=(BoundedTensor(x0, ptb),), C=C, method=method, **kw)


class RepeatedOperand(nn.Module):
    """Issue 15's model: one tensor used twice by one op, inside a conv net."""

    def __init__(self, op: str):
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3, padding=1)
        self.c2 = nn.Conv2d(4 if op == "cat" else 2, 2, 3, stride=2)
        self.o = nn.Linear(8, 3)
        self.op = op

    def forward(self, x):
        h = torch.relu(self.c(x))
        if self.op == "add":
            h = h + h
        elif self.op == "sub":
            h = h - h + h
        else:
            h = torch.cat([h, h], 1)
        return self.o(torch.relu(self.c2(h)).flatten(1))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("conv_mode", ["patches", "matrix"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("op", ["add", "cat", "sub"])
def test_repeated_operand_in_conv_net(op, method, conv_mode, dtype):
    """Bug: `LinearOp.backward` merged its results by node when the lower and upper coefficients
    differed, so the second operand of ``h + h`` / ``cat([h, h])`` overwrote the first (CROWN
    beaten by 0.0084 and 0.117 in the issue)."""
    torch.manual_seed(0)
    model = RepeatedOperand(op).to(dtype).eval()
    x0 = torch.randn(1, 1, 6, 6, dtype=dtype)
    ptb = PerturbationLpNorm(eps=0.2)
    lb, ub = _bounds(model, x0, ptb, method, conv_mode=conv_mode)
    assert_sound(model, x0, ptb, lb, ub, n_random=2000)


def test_repeated_operand_cancels_exactly():
    """h - h is 0 for every input: CROWN, which sums both operands' coefficients, says so."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            h = torch.relu(self.c(x))
            return (h - h).flatten(1)

    m = M().double().eval()
    x0 = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    lb, ub = _bounds(m, x0, PerturbationLpNorm(eps=0.3), "CROWN")
    assert torch.equal(lb, torch.zeros_like(lb)) and torch.equal(ub, torch.zeros_like(ub))


@pytest.mark.parametrize("norm", [2, 1])
@pytest.mark.parametrize("method", METHODS)
def test_per_example_eps_l2_l1_on_conv(norm, method):
    """Bug: an L2/L1 ball's per-example radius (B, 1) was broadcast against a conv output
    (1, C, 1, 1) as (1, C, B, 1): a RuntimeError for B != C (the issue's crash)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).double().eval()
    x0 = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    ptb = PerturbationLpNorm(norm=norm, eps=torch.tensor([0.05, 0.5, 1.0], dtype=torch.float64))
    lb, ub = _bounds(model, x0, ptb, method)
    assert_sound(model, x0, ptb, lb, ub)
    for i in range(3):  # each example's bound is the bound of its own ball
        one = PerturbationLpNorm(norm=norm, eps=float(ptb.eps[i]))
        li, ui = _bounds(model, x0[i:i + 1], one, method)
        if method != "alpha-CROWN":  # alpha-CROWN's optimizer couples the batch
            assert torch.allclose(li, lb[i:i + 1], atol=1e-10) and torch.allclose(ui, ub[i:i + 1], atol=1e-10)


def test_per_example_eps_on_sequence_linear_with_batch_equal_length():
    """A Linear on (B, T, in) with a per-example L2 radius: (B, 1) * (out,) broadcast against
    (B, T, out) silently took the radii per position when T == B."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Flatten(), nn.Linear(15, 2)).double().eval()
    x0 = torch.rand(3, 3, 4, dtype=torch.float64)
    ptb = PerturbationLpNorm(norm=2, eps=torch.tensor([0.01, 0.3, 1.0], dtype=torch.float64))
    for method in ("IBP", "CROWN-IBP", "CROWN"):
        lb, ub = _bounds(model, x0, ptb, method)
        assert_sound(model, x0, ptb, lb, ub)
        small = _bounds(model, x0[:1], PerturbationLpNorm(norm=2, eps=0.01), method)
        assert torch.allclose(small[0], lb[:1], atol=1e-12)


def test_inplace_relu_does_not_mutate_the_input():
    """Bug: ``nn.ReLU(inplace=True)`` on the input node overwrote the caller's tensor."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 3)).eval()
    x0 = torch.randn(2, 4)
    keep = x0.clone()
    for method in METHODS:
        lb, ub = _bounds(model, x0, PerturbationLpNorm(eps=0.1), method)
        assert torch.equal(x0, keep), method
    plain = nn.Sequential(nn.ReLU(), model[1])
    assert_sound(plain, x0, PerturbationLpNorm(eps=0.1), lb, ub)


class InPlaceZoo(nn.Module):
    """In-place ops whose result is read through the *old* name afterwards (PyTorch semantics:
    the tensor itself changed), in every spelling."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 3, 3, padding=1)
        self.r = nn.ReLU(inplace=True)
        self.l = nn.Linear(3 * 36 * 2, 2)

    def forward(self, x):
        a = self.c(x)
        self.r(a)                 # a is now relu(a)
        b = self.c(x) * 0.5
        b.relu_()                 # method
        b += a                    # operator.iadd
        c = self.c(x)
        F.leaky_relu(c, 0.1, True)  # functional with positional inplace
        torch.relu_(c)
        return self.l(torch.cat([a + b, c], 1).flatten(1))


class InPlaceZooTwin(InPlaceZoo):
    def forward(self, x):
        a = torch.relu(self.c(x))
        b = torch.relu(self.c(x) * 0.5) + a
        c = torch.relu(F.leaky_relu(self.c(x), 0.1))
        return self.l(torch.cat([a + b, c], 1).flatten(1))


@pytest.mark.parametrize("method", METHODS)
def test_inplace_ops_keep_their_meaning(method):
    torch.manual_seed(4)
    model = InPlaceZoo().double().eval()
    twin = InPlaceZooTwin().double().eval()
    twin.load_state_dict(model.state_dict())
    x0 = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model(x0.clone()), twin(x0))
    keep = x0.clone()
    ptb = PerturbationLpNorm(eps=0.05, x_L=0.0, x_U=1.0)
    lb, ub = _bounds(model, x0, ptb, method)
    assert torch.equal(x0, keep)
    ref = _bounds(twin, x0, ptb, method)
    assert torch.allclose(lb, ref[0], atol=1e-10) and torch.allclose(ub, ref[1], atol=1e-10)
    assert_sound(twin, x0, ptb, lb, ub)


def test_inplace_on_a_view_is_refused():
    """An in-place op on a tensor that shares memory with another one read later would need alias
    analysis; the engine refuses it with a clear error instead of bounding another function."""
    class M(nn.Module):
        def forward(self, x):
            v = x.view(x.shape[0], -1)
            v.relu_()
            return x.flatten(1) + v

    with pytest.raises(TraceError, match="shares memory"):
        BoundedModule(M(), torch.randn(2, 4))


def test_setitem_is_refused():
    class M(nn.Module):
        def forward(self, x):
            y = torch.zeros_like(x)
            y[:, 0] = x[:, 0]
            return y

    with pytest.raises(TraceError, match="item assignment"):
        BoundedModule(M(), torch.randn(2, 4))


def test_python_value_of_a_perturbed_tensor_is_refused():
    """``x.sum().item()`` would enter the graph as a constant: bounds would ignore its dependence
    on the input."""
    class M(nn.Module):
        def forward(self, x):
            return x + x.sum(dim=1).item()

    with pytest.raises(UnsupportedOperation, match="non-tensor value"):
        BoundedModule(M(), torch.randn(1, 4))


def test_overlapping_maxpool_windows():
    """Bug: the max-pool upper line excluded, in every window, the argmax of *any* window, so a
    window sharing an input with its neighbour claimed max = its own argmax.  Box
    l = [0, 1, 2], u = [0.5, 3, 2.5], windows {0, 1} and {1, 2}: max(x1, x2) reaches 3."""
    model = nn.Sequential(nn.MaxPool2d((1, 2), stride=1), nn.Flatten())
    center = torch.tensor([0.25, 2.0, 2.25]).view(1, 1, 1, 3)
    eps = torch.tensor([0.25, 1.0, 0.25]).view(1, 1, 1, 3)
    ptb = PerturbationLpNorm(eps=eps)
    for method in ("CROWN", "CROWN-IBP", "alpha-CROWN"):
        lb, ub = _bounds(model, center, ptb, method)
        assert ub[0, 1] >= 3.0 - 1e-6, (method, ub)
        assert_sound(model, center, ptb, lb, ub)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_overlapping_padded_maxpool_sound(dtype):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.MaxPool2d(3, stride=1, padding=1),
                          nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.Linear(3 * 25, 4)).to(dtype).eval()
    x0 = torch.rand(2, 2, 6, 6, dtype=dtype)
    ptb = PerturbationLpNorm(eps=0.2)
    for method in ("CROWN", "CROWN-IBP", "alpha-CROWN"):
        for mode in ("patches", "matrix"):
            lb, ub = _bounds(model, x0, ptb, method, conv_mode=mode)
            assert_sound(model, x0, ptb, lb, ub)


def test_log_after_saturated_sigmoid_uses_the_interval():
    """Fuzz seed 945: CROWN's bound of sigmoid(z) + 0.1 went below 0 where IBP's is > 0.1, and
    log refused the node.  Intermediate bounds are now CROWN ∩ IBP (both hold)."""
    torch.manual_seed(6)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)
            with torch.no_grad():
                self.a.weight.mul_(8)

        def forward(self, x):
            return self.b(torch.log(torch.sigmoid(torch.relu(self.a(x))) + 0.1))

    model = M().eval()
    x0 = torch.rand(2, 4)
    ptb = PerturbationLpNorm(norm=2, eps=1.0)
    lb, ub = _bounds(model, x0, ptb, "CROWN")
    assert_sound(model, x0, ptb, lb, ub)


def test_intersection_tightens_intermediate_bounds():
    """CROWN ∩ IBP intermediate bounds are never looser than CROWN's alone, node by node (the
    output bound can still move either way: CROWN-Ada's slope choice depends on them), and sound."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double().eval()
    x0 = torch.rand(4, 6, dtype=torch.float64)
    ptb = PerturbationLpNorm(eps=0.3)
    inter = {}
    for flag in (True, False):
        net = BoundedModule(model, x0, bound_opts={"intersect_intermediate": flag})
        with torch.no_grad():
            lb, ub, state = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="CROWN", return_state=True)
        inter[flag] = state.intermediate()
        assert_sound(model, x0, ptb, lb, ub)
    for name in net.pre_activation_names():
        (l1, u1), (l0, u0) = inter[True][name], inter[False][name]
        assert (l1 >= l0 - 1e-12).all() and (u1 <= u0 + 1e-12).all(), name


class _Fn(nn.Module):
    def __init__(self, fn, d_in=3, d_out=4):
        super().__init__()
        self.fc, self.fn = nn.Linear(d_in, d_out), fn

    def forward(self, x):
        return self.fn(self.fc(x))


@pytest.mark.parametrize("method", METHODS)
def test_softmax_over_one_entry(method):
    """Fuzz: a softmax over a single entry left a node without elements (no pairs j ≠ i), and CROWN
    concatenated an empty list of chunks. It is the constant 1."""
    torch.manual_seed(0)
    model = _Fn(lambda h: torch.softmax(h[:, :1] * 30, dim=1) + h).eval()
    x0 = torch.randn(2, 3)
    ptb = PerturbationLpNorm(eps=0.5)
    lb, ub = _bounds(model, x0, ptb, method)
    assert_sound(model, x0, ptb, lb, ub)


@pytest.mark.parametrize("method", ["CROWN-IBP", "CROWN"])
def test_division_domain_with_crown_alone(method):
    """Fuzz: with intersect_intermediate=False a divisor's CROWN bound (through a sigmoid) dropped
    below 0 where IBP proves it >= 0.5, and the reciprocal refused; rules with a domain always get
    CROWN ∩ IBP."""
    torch.manual_seed(0)
    model = _Fn(lambda h: h[:, :2] / (torch.sigmoid(h[:, 2:] * 5) + 0.5)).eval()
    model.fc = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4))
    x0 = torch.randn(2, 3)
    ptb = PerturbationLpNorm(eps=3.0)
    lb, ub = _bounds(model, x0, ptb, method, intersect_intermediate=False)
    assert_sound(model, x0, ptb, lb, ub)
