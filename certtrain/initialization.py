"""IBP initialization of Shi et al. 2021 ("Fast Certified Robust Training with Short Warmup", Sec. 3.2).

For a layer z = W h with W_ij ~ N(0, σ²) and fan-in n, the expected IBP radius of z is
n · E|W_ij| · r_h = n σ sqrt(2/π) · r_h; a ReLU keeps about half of it.  σ = sqrt(2π) / n makes the
expected radius after the ReLU equal to the input's, so interval bounds neither explode nor vanish
with depth at initialization (standard initializations preserve the variance instead, and let the
bounds grow by about sqrt(n) per layer).

As in the authors' code: every Linear / Conv weight is redrawn except the last layer's (it keeps
its initialization); biases and BatchNorm parameters are left as they are; a layer fed by a
residual sum (its input is a sum, or an elementwise op of a sum) gets half the σ, because the sum
of two branches doubles the radius.
"""

from __future__ import annotations

import math
import operator
import warnings

import torch
from torch import fx, nn

__all__ = ["count_batchnorm", "ibp_init", "ibp_init_std"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ADDS = {operator.add, operator.iadd, torch.add}


def ibp_init_std(layer: nn.Module) -> float:
    """σ = sqrt(2π) / fan_in of a Linear / Conv layer (fan_in = in_features, or in_channels/groups × kernel size)."""
    if not isinstance(layer, _LAYERS):
        raise TypeError(f"ibp_init_std needs a Linear or Conv layer, got {type(layer).__name__}")
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(layer.weight)
    return math.sqrt(2 * math.pi) / fan_in


def _is_sum(node: object) -> bool:
    if not isinstance(node, fx.Node):
        return False
    two_tensors = sum(isinstance(a, fx.Node) for a in node.args) >= 2
    if node.op == "call_function" and node.target in _ADDS:
        return two_tensors
    return node.op == "call_method" and node.target in ("add", "add_") and two_tensors


def _residual_layers(model: nn.Module) -> set[str]:
    """Names of the Linear / Conv submodules whose input is a residual sum (or one op after it)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # an untraceable model still gets the plain initialization
        warnings.warn(f"ibp_init: the model cannot be traced by torch.fx ({type(e).__name__}: {e}); "
                      "layers after residual sums are not scaled down", stacklevel=3)
        return set()
    out = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        if not isinstance(gm.get_submodule(node.target), _LAYERS):
            continue
        src = node.args[0]
        if _is_sum(src) or (isinstance(src, fx.Node) and src.args and _is_sum(src.args[0])):
            out.add(str(node.target))
    return out


@torch.no_grad()
def ibp_init(model: nn.Module, residual: bool = True) -> dict[str, float]:
    """Redraw the weights of every Linear / Conv layer of ``model`` but the last (in module order)
    from N(0, σ²), σ = :func:`ibp_init_std` (halved after a residual sum when ``residual``).

    Returns ``{weight name: σ}`` of the layers redrawn.  Works on any plain ``nn.Module``."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _LAYERS)]
    if len(layers) < 2:
        return {}
    after_sum = _residual_layers(model) if residual else set()
    out = {}
    for name, m in layers[:-1]:
        std = ibp_init_std(m) / (2 if name in after_sum else 1)
        m.weight.normal_(0.0, std)
        out[f"{name}.weight" if name else "weight"] = std
    return out


def count_batchnorm(model: nn.Module) -> tuple[int, int]:
    """(number of BatchNorm layers, number of Linear / Conv layers) of ``model``."""
    bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return bn, sum(isinstance(m, _LAYERS) for m in model.modules())
