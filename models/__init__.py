"""Architecture zoo: plain ``torch.nn`` models for certified training (no dependency on certtrain).

Every constructor has the signature ``name(in_shape=(C, H, W), num_classes=10, **width_options)`` and
returns a module mapping (B, *in_shape) -> (B, num_classes). All models are ``torch.fx``-traceable and
use only Linear, Conv2d, BatchNorm1d/2d, ReLU, AvgPool2d/AdaptiveAvgPool2d, flatten, residual ``+``,
channel ``torch.cat``, Identity and Sequential. Inputs are expected normalised; certtrain prepends
``certtrain.normalize.Normalize`` so that data and perturbations stay in pixel space.

Parameter counts of the defaults at CIFAR shape (3, 32, 32), 10 classes (mlp / cnn_small default to
MNIST (1, 28, 28), where they have 269,322 / 166,406):

=============  ==========
model          parameters
=============  ==========
mlp               855,050
cnn_small         214,918
cnn_7layer     17,190,602
cnn_7layer_bn  17,192,650
dm_large       17,190,602
resnet             43,466
resnext        17,611,018
densenet        7,902,058
wide_resnet    21,542,250
=============  ==========

Note: ``certtrain_models.<name>`` is the constructor (it shadows the submodule of the same name, which is what
Hydra's ``_target_: certtrain_models.<name>`` needs); import classes with ``from certtrain_models.resnet import BasicBlock``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .cnn import cnn_7layer, cnn_7layer_bn, cnn_small, dm_large
from .densenet import densenet
from .mlp import mlp
from .resnet import resnet
from .resnext import resnext
from .wide_resnet import wide_resnet

__all__ = [
    "MODELS",
    "cnn_7layer",
    "cnn_7layer_bn",
    "cnn_small",
    "densenet",
    "dm_large",
    "get_model",
    "mlp",
    "resnet",
    "resnext",
    "wide_resnet",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn_small": cnn_small,
    "cnn_7layer": cnn_7layer,
    "cnn_7layer_bn": cnn_7layer_bn,
    "dm_large": dm_large,
    "resnet": resnet,
    "resnext": resnext,
    "densenet": densenet,
    "wide_resnet": wide_resnet,
}


def get_model(
    name: str,
    in_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build model ``name`` from :data:`MODELS` (ValueError listing the names if unknown).

    ``None`` for ``in_shape`` / ``num_classes`` keeps the constructor's default.
    """
    try:
        ctor = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(sorted(MODELS))}") from None
    if in_shape is not None:
        kwargs["in_shape"] = in_shape
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return ctor(**kwargs)
