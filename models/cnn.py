"""Plain feed-forward convolutional networks from the certified-training literature."""

from __future__ import annotations

from torch import nn

from ._common import FeatureClassifier, as_shape, conv_out, norm1d

__all__ = ["CNN", "cnn_small", "cnn_7layer", "cnn_7layer_bn", "dm_large"]


class CNN(FeatureClassifier):
    """Conv stack (``features``) -> flatten -> fully-connected head (``classifier``)."""


def _conv_stack(
    in_shape: tuple[int, int, int],
    num_classes: int,
    convs: list[tuple[int, int, int, int]],
    linear_size: int,
    bn: bool,
    bn_linear: bool,
) -> CNN:
    """Build conv(-BN)-ReLU layers from ``(out_ch, kernel, stride, padding)`` specs, then the head."""
    c, h, w = in_shape
    features: list[nn.Module] = []
    for out_ch, k, s, p in convs:
        features.append(nn.Conv2d(c, out_ch, k, stride=s, padding=p))
        if bn:
            features.append(nn.BatchNorm2d(out_ch))
        features.append(nn.ReLU())
        c, h, w = out_ch, conv_out(h, k, s, p), conv_out(w, k, s, p)
    head: list[nn.Module] = [nn.Linear(c * h * w, linear_size)]
    if bn_linear:
        head.append(norm1d(linear_size, True))
    head += [nn.ReLU(), nn.Linear(linear_size, num_classes)]
    return CNN(nn.Sequential(*features), nn.Sequential(*head), in_shape, num_classes)


def _cnn7_convs(width: int, last_stride: int) -> list[tuple[int, int, int, int]]:
    return [
        (width, 3, 1, 1),
        (width, 3, 1, 1),
        (2 * width, 3, 2, 1),
        (2 * width, 3, 1, 1),
        (2 * width, 3, last_stride, 1),
    ]


def cnn_small(
    in_shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    width: int = 16,
    linear_size: int = 100,
) -> CNN:
    """Tiny CNN for quick tests: Conv(C->w,k4,s2,p1)-ReLU-Conv(w->2w,k4,s2,p1)-ReLU-FC(linear_size)-ReLU-FC.

    The small MNIST model of Wong & Kolter 2018 ("Provable defenses..."); default w=16, FC 100.
    """
    shape = as_shape(in_shape)
    convs = [(width, 4, 2, 1), (2 * width, 4, 2, 1)]
    return _conv_stack(shape, num_classes, convs, linear_size, bn=False, bn_linear=False)


def cnn_7layer(
    in_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    width: int = 64,
    linear_size: int = 512,
    last_stride: int = 1,
) -> CNN:
    """CNN-7 without batch norm (Shi et al. 2021, "Fast Certified Robust Training with Short Warmup").

    Five 3x3 convs (w, w, 2w/stride 2, 2w, 2w) with ReLU, FC ``linear_size``-ReLU, FC; no BN anywhere.
    """
    shape = as_shape(in_shape)
    convs = _cnn7_convs(width, last_stride)
    return _conv_stack(shape, num_classes, convs, linear_size, bn=False, bn_linear=False)


def cnn_7layer_bn(
    in_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    width: int = 64,
    linear_size: int = 512,
    last_stride: int = 1,
) -> CNN:
    """CNN-7 of Shi et al. 2021 ("Fast Certified Robust Training with Short Warmup"), with BatchNorm.

    Conv3x3 w, w, 2w (stride 2), 2w, 2w(stride ``last_stride``), each -BN2d-ReLU; flatten;
    Linear(linear_size)-BN1d-ReLU; Linear(num_classes). 17.2M parameters at CIFAR defaults. For
    TinyImageNet (3, 64, 64) Shi et al. use ``last_stride=2`` (flatten size 2w*16*16 = 32768).
    """
    shape = as_shape(in_shape)
    convs = _cnn7_convs(width, last_stride)
    return _conv_stack(shape, num_classes, convs, linear_size, bn=True, bn_linear=True)


def dm_large(
    in_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    width: int = 64,
    linear_size: int = 512,
) -> CNN:
    """DM-large of Gowal et al. 2018 ("On the Effectiveness of Interval Bound Propagation...").

    Conv3x3 64, 64, 128 (stride 2), 128, 128 (padding 1, ReLU), FC 512-ReLU, FC; ``width`` scales 64/128
    as w/2w. Architecturally identical to :func:`cnn_7layer` (without ``last_stride``).
    """
    shape = as_shape(in_shape)
    convs = _cnn7_convs(width, 1)
    return _conv_stack(shape, num_classes, convs, linear_size, bn=False, bn_linear=False)
