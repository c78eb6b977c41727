"""Architecture zoo: plain ``torch.nn`` models for certified training (no dependency on certtrain).

**Image models** (:data:`IMAGE_MODELS`): every constructor has the signature
``name(in_shape=(C, H, W), num_classes=10, **width_options)`` and returns a module mapping
(B, *in_shape) -> (B, num_classes). All are ``torch.fx``-traceable and use only Linear, Conv2d,
BatchNorm1d/2d, ReLU, AvgPool2d/AdaptiveAvgPool2d, flatten, residual ``+``, channel ``torch.cat``,
Identity and Sequential. Inputs are expected normalised; certtrain prepends
``certtrain.normalize.Normalize`` so that data and perturbations stay in pixel space.

**Text models** (:data:`TEXT_MODELS`: ``lstm``, ``transformer``), for certified robustness to word
substitutions (Xu et al. 2020, auto_LiRPA's language experiments): ``name(vocab_size=5000,
num_classes=2, embed_dim=64, ..., max_len=32, pad_id=0)`` returns a :class:`~certtrain_models.text.TextClassifier`
mapping token ids (B, T <= max_len) to logits. The embedding lookup (``model.embedding``) stays outside
the bounded graph; ``model.encoder(emb (B, max_len, D), mask (B, max_len))`` is what the bound engine
traces, with the embeddings perturbed and the 1/0 mask a constant input
(``emb, mask = model.embed(ids)``). ``lstm`` is an LSTM with explicit gates unrolled over ``max_len``
steps with masked state updates, classifying the final hidden state; ``transformer`` is a post-LN
encoder with explicit multi-head self-attention (key mask -10000), mean-only LayerNorm by default
(``layer_norm="mean" | "standard" | "none"``), a masked mean over tokens and a Linear. Padding never
changes their output.

Parameter counts of the defaults: image models at CIFAR shape (3, 32, 32), 10 classes (mlp / cnn_small
default to MNIST (1, 28, 28), where they have 269,322 / 166,406); text models at their defaults
(vocab_size 5000, embed_dim 64, max_len 32, 2 classes; the embedding is 320,000 of their parameters):

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
lstm              353,154  (hidden 64)
transformer       355,650  (1 layer, 4 heads, ffn 128, mean-only LayerNorm)
=============  ==========

Note: ``certtrain_models.<name>`` is the constructor (it shadows the submodule of the same name, which is what
Hydra's ``_target_: certtrain_models.<name>`` needs); import classes with ``from certtrain_models.resnet import BasicBlock``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .cnn import cnn_7layer, cnn_7layer_bn, cnn_small, dm_large
from .densenet import densenet
from .lstm import lstm
from .mlp import mlp
from .resnet import resnet
from .resnext import resnext
from .transformer import transformer
from .wide_resnet import wide_resnet

__all__ = [
    "IMAGE_MODELS",
    "MODELS",
    "TEXT_MODELS",
    "cnn_7layer",
    "cnn_7layer_bn",
    "cnn_small",
    "densenet",
    "dm_large",
    "get_model",
    "lstm",
    "mlp",
    "resnet",
    "resnext",
    "transformer",
    "wide_resnet",
]

# Constructors taking ``in_shape=(C, H, W)``.
IMAGE_MODELS: dict[str, Callable[..., nn.Module]] = {
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

# Constructors taking ``vocab_size`` / ``max_len`` / ``pad_id`` (token ids in, no ``in_shape``).
TEXT_MODELS: dict[str, Callable[..., nn.Module]] = {
    "lstm": lstm,
    "transformer": transformer,
}

MODELS: dict[str, Callable[..., nn.Module]] = {**IMAGE_MODELS, **TEXT_MODELS}


def get_model(
    name: str,
    in_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build model ``name`` from :data:`MODELS` (ValueError listing the names if unknown).

    ``None`` for ``in_shape`` / ``num_classes`` keeps the constructor's default. ``in_shape`` is for the
    image models only: a text model (:data:`TEXT_MODELS`) reads token ids, whose length is its
    ``max_len``, so ``in_shape`` is ignored for it; pass ``vocab_size`` / ``max_len`` / ``pad_id`` as
    keyword arguments instead.
    """
    try:
        ctor = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(sorted(MODELS))}") from None
    if in_shape is not None and name not in TEXT_MODELS:
        kwargs["in_shape"] = in_shape
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return ctor(**kwargs)
