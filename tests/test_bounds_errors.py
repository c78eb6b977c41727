"""Bad input gets a clear error before any work."""

import pytest
import torch
from torch import nn

from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm, UnsupportedOperation
from op_models import ActivationsMLP


class Sin(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.sin(self.fc(x))


def test_unsupported_op_names_op_node_line_and_fix():
    with pytest.raises(UnsupportedOperation) as e:
        BoundedModule(Sin(), torch.rand(2, 4))
    msg = str(e.value)
    assert "function torch.sin" in msg
    assert "'sin'" in msg  # the graph node
    assert "test_bounds_errors.py" in msg and "torch.sin(self.fc(x))" in msg  # the source line
    assert "register_op" in msg


@pytest.mark.parametrize("body,match", [
    ("ranks", "different ranks"), ("batch", "batch"), ("vector", "vector operand")])
def test_matmul_shapes_that_have_no_rule(body, match):
    """matmul forms the rule cannot bound say what to change, at trace-time shapes."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.v = nn.Parameter(torch.rand(4))

        def forward(self, x):
            h = self.fc(x)                        # (B, 4)
            if body == "ranks":                   # (B, 2, 2) @ (B, 1, 2, 2) would mix the batch
                return torch.matmul(h.view(-1, 2, 2), h.view(-1, 1, 2, 2)).flatten(1)
            if body == "batch":                   # h^T h contracts over the batch
                return torch.matmul(h.t(), h)
            return torch.matmul(h, self.v)        # a vector on the right

    net = BoundedModule(M(), torch.rand(2, 4))
    with pytest.raises(UnsupportedOperation, match=match):
        net.compute_bounds(x=(BoundedTensor(torch.rand(2, 4), PerturbationLpNorm(eps=0.1)),), method="IBP")


def test_division_by_a_bounded_tensor_that_may_be_zero():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            h = self.fc(x)
            return h[:, :1] / h[:, 1:]

    net = BoundedModule(M(), torch.rand(2, 3))
    with pytest.raises(ValueError, match="positive domain.*divisor"):
        net.compute_bounds(x=(BoundedTensor(torch.rand(2, 3), PerturbationLpNorm(eps=5.0)),), method="IBP")


@pytest.fixture
def net():
    return BoundedModule(ActivationsMLP().eval(), torch.rand(2, 2, 4, 4))


def test_wrong_input_shape(net):
    with pytest.raises(ValueError, match=r"per-example shape \(2, 4, 4\)"):
        net.compute_bounds(x=(BoundedTensor(torch.rand(2, 3, 4, 4), PerturbationLpNorm(eps=0.1)),))


@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf")])
def test_bad_eps(net, eps):
    with pytest.raises(ValueError, match="eps"):
        net.compute_bounds(x=(BoundedTensor(torch.rand(2, 2, 4, 4), PerturbationLpNorm(eps=eps)),))


def test_negative_eps_tensor(net):
    eps = torch.full((1, 2, 4, 4), 0.1)
    eps[0, 0, 0, 0] = -1e-3
    with pytest.raises(ValueError, match="eps must be >= 0"):
        net.compute_bounds(x=(BoundedTensor(torch.rand(2, 2, 4, 4), PerturbationLpNorm(eps=eps)),))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_input(net, bad):
    x = torch.rand(2, 2, 4, 4)
    x[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        net.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(eps=0.1)),))


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 3), (3, 2, 5)])
def test_bad_C(net, shape):
    with pytest.raises(ValueError, match=r"C must have shape \(batch=2, n_spec, n_out=5\)"):
        net.compute_bounds(x=(BoundedTensor(torch.rand(2, 2, 4, 4), PerturbationLpNorm(eps=0.1)),),
                           C=torch.rand(*shape))


def test_unknown_method_and_norm(net):
    x = BoundedTensor(torch.rand(2, 2, 4, 4), PerturbationLpNorm(eps=0.1))
    with pytest.raises(ValueError, match="unknown method"):
        net.compute_bounds(x=(x,), method="magic")
    with pytest.raises(NotImplementedError, match="not implemented yet"):
        net.compute_bounds(x=(x,), method="forward")
    with pytest.raises(ValueError, match="norm"):
        PerturbationLpNorm(eps=0.1, norm=3)


def test_dtype_mismatch(net):
    with pytest.raises(TypeError, match="float64"):
        net.compute_bounds(x=(BoundedTensor(torch.rand(2, 2, 4, 4).double(), PerturbationLpNorm(eps=0.1)),))


def test_active_dropout_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    net = BoundedModule(model, torch.rand(2, 3))
    with pytest.raises(UnsupportedOperation, match="Dropout"):
        net.compute_bounds(x=(BoundedTensor(torch.rand(2, 3), PerturbationLpNorm(eps=0.1)),), method="IBP")


@pytest.mark.parametrize("body", ["sort", "argmax"])
def test_values_derived_from_perturbed_inputs_are_never_constants(body):
    """Tuples of tensors and integer tensors computed from the input must not be treated as
    constants (that would give unsound bounds): they need a bound rule."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            if body == "sort":  # a tuple (values, indices) with no bound rule
                v, _ = h.sort(dim=1)
                return v
            return h.gather(1, h.argmax(1, keepdim=True))

    with pytest.raises(UnsupportedOperation):
        BoundedModule(M(), torch.rand(2, 4))
