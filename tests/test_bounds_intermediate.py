"""save_intermediate / pre_activation_names: the per-node bounds that regularizers read."""
import math

import pytest
import torch

from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm
from certtrain_models import cnn_7layer_bn


def test_intermediate_bounds_of_ibp_contain_the_clean_values():
    torch.manual_seed(0)
    model = cnn_7layer_bn(in_shape=(1, 12, 12), width=4, linear_size=16).eval()
    x0 = torch.rand(3, 1, 12, 12)
    net = BoundedModule(model, x0)
    with pytest.raises(RuntimeError, match="keep_intermediate=True"):
        net.save_intermediate()
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.05, x_L=0.0, x_U=1.0)
    lb, ub = net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="IBP", keep_intermediate=True)
    inter = net.save_intermediate()
    names = net.pre_activation_names()
    assert len(names) == 6  # five conv-BN layers and the BN1d of the head feed a ReLU
    assert set(names) <= set(inter)
    lo, hi = inter[net.input_names[0]]
    torch.testing.assert_close(lo, (x0 - 0.05).clamp(min=0))
    torch.testing.assert_close(hi, (x0 + 0.05).clamp(max=1))
    # every kept interval contains the clean activation (hooks on the BN outputs)
    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o))
             for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d))]
    with torch.no_grad():
        model(x0)
    for h in hooks:
        h.remove()
    for name, a in zip(names, acts):
        l, u = inter[name]
        assert l.shape == a.shape and (l <= a + 1e-6).all() and (a <= u + 1e-6).all()
    # without keep_intermediate the next call drops them
    net.compute_bounds(x=(BoundedTensor(x0, ptb),), method="IBP")
    with pytest.raises(RuntimeError):
        net.save_intermediate()
