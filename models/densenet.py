"""DenseNet-BC style network for certified training (auto_LiRPA's ``Densenet_cifar_32``)."""

from __future__ import annotations

from collections.abc import Sequence
from math import floor

import torch
from torch import nn

from ._common import FeatureClassifier, as_int_tuple, as_shape, norm2d

__all__ = ["DenseBottleneck", "DenseTransition", "DenseNet", "densenet"]


class DenseBottleneck(nn.Module):
    """BN-ReLU-conv1x1(4g)-BN-ReLU-conv3x3(g); returns ``torch.cat([out, x], 1)`` (in_planes + g channels)."""

    def __init__(self, in_planes: int, growth_rate: int, bn: bool = True) -> None:
        super().__init__()
        self.bn1 = norm2d(in_planes, bn)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, 1)
        self.bn2 = norm2d(4 * growth_rate, bn)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([out, x], 1)


class DenseTransition(nn.Module):
    """BN-ReLU-conv1x1(in->out)-AvgPool2d(2)."""

    def __init__(self, in_planes: int, out_planes: int, bn: bool = True) -> None:
        super().__init__()
        self.bn = norm2d(in_planes, bn)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_planes, out_planes, 1)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(FeatureClassifier):
    """Stem conv3x3 -> dense blocks separated by transitions -> BN-ReLU -> flatten -> FC-ReLU -> FC."""


def densenet(
    in_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    growth_rate: int = 32,
    num_blocks: Sequence[int] = (2, 4, 4),
    bn: bool = True,
    reduction: float = 0.5,
    linear_size: int = 512,
    pool: bool = False,
) -> DenseNet:
    """DenseNet-BC (Huang et al. 2017) as in auto_LiRPA's ``Densenet_cifar_32`` (Xu et al. 2020).

    Defaults at (3, 32, 32): stem conv3x3 3->64 (2g, no BN/ReLU); dense block of 2 bottlenecks -> 128 ch;
    transition (BN-ReLU-1x1 128->64-AvgPool2) -> (64, 16, 16); 4 bottlenecks -> 192; transition 192->96 ->
    (96, 8, 8); 4 bottlenecks -> (224, 8, 8); BN-ReLU; flatten 14336 -> Linear 512-ReLU -> Linear 10.
    Like the reference there is no final pooling (``pool=True`` inserts a global AdaptiveAvgPool2d(1)).
    Spatial sizes entering a transition must be even so that AvgPool2d(2) covers the input exactly.
    """
    shape = as_shape(in_shape)
    num_blocks = as_int_tuple(num_blocks, "num_blocks")
    if not num_blocks:
        raise ValueError("num_blocks must be non-empty")
    c, h, w = shape
    planes = 2 * growth_rate
    layers: list[nn.Module] = [nn.Conv2d(c, planes, 3, padding=1)]
    for stage, n in enumerate(num_blocks):
        for _ in range(n):
            layers.append(DenseBottleneck(planes, growth_rate, bn))
            planes += growth_rate
        if stage < len(num_blocks) - 1:
            if h % 2 or w % 2:
                raise ValueError(
                    f"densenet: spatial size {h}x{w} before transition {stage + 1} is odd; "
                    f"AvgPool2d(2) would drop pixels (in_shape={shape})"
                )
            out_planes = int(floor(planes * reduction))
            layers.append(DenseTransition(planes, out_planes, bn))
            planes, h, w = out_planes, h // 2, w // 2
    layers += [norm2d(planes, bn), nn.ReLU()]
    if pool:
        layers.append(nn.AdaptiveAvgPool2d(1))
        h = w = 1
    head = nn.Sequential(nn.Linear(planes * h * w, linear_size), nn.ReLU(), nn.Linear(linear_size, num_classes))
    return DenseNet(nn.Sequential(*layers), head, shape, num_classes)
