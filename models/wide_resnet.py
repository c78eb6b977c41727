"""Wide ResNet for certified training (auto_LiRPA's ``wide_resnet_cifar_bn_wo_pooling``)."""

from __future__ import annotations

import torch
from torch import nn

from ._common import FeatureClassifier, as_shape, conv_out, norm2d

__all__ = ["WideBasic", "WideResNet", "wide_resnet"]


class WideBasic(nn.Module):
    """Pre-activation wide block: ``conv2(relu(conv1(relu(bn(x))))) + shortcut(x)`` (no add-ReLU).

    conv1 is 3x3 stride 1, conv2 is 3x3 with the block's stride; the shortcut is a strided 1x1 conv when
    the shape changes, identity otherwise. As in the reference, the only BN is on the block input.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, bn: bool = True) -> None:
        super().__init__()
        self.bn1 = norm2d(in_planes, bn)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Conv2d(in_planes, planes, 1, stride=stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(out))
        return out + self.shortcut(x)


class WideResNet(FeatureClassifier):
    """Stem conv3x3 -> 3 stages of WideBasic blocks -> ReLU -> flatten (no pooling) -> FC-ReLU -> FC."""


def wide_resnet(
    in_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    depth: int = 10,
    widen_factor: int = 4,
    bn: bool = True,
    linear_size: int = 512,
) -> WideResNet:
    """WRN (Zagoruyko & Komodakis 2016) as auto_LiRPA's ``wide_resnet_cifar_bn_wo_pooling`` (Xu et al. 2020).

    WRN-``depth``-``widen_factor``: (depth-4)/6 blocks per stage, stage widths 16 * (2k, 4k, 8k) — note the
    reference uses 2x the widths of the original WRN — strides 1/2/2. Defaults at (3, 32, 32): stem conv3x3
    3->16; stages -> (128, 32, 32), (256, 16, 16), (512, 8, 8); ReLU; no final average pooling: flatten
    32768 -> Linear 512-ReLU -> Linear 10 (~21.5M parameters, 16.8M of them in the first Linear).
    """
    shape = as_shape(in_shape)
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"wide_resnet depth must be 6n+4 with n >= 1, got {depth}")
    n = (depth - 4) // 6
    c, h, w = shape
    layers: list[nn.Module] = [nn.Conv2d(c, 16, 3, padding=1)]
    c = 16
    for stage, planes in enumerate((32 * widen_factor, 64 * widen_factor, 128 * widen_factor)):
        for i in range(n):
            stride = 2 if (stage > 0 and i == 0) else 1
            layers.append(WideBasic(c, planes, stride, bn))
            c, h, w = planes, conv_out(h, 3, stride, 1), conv_out(w, 3, stride, 1)
    layers.append(nn.ReLU())
    head = nn.Sequential(nn.Linear(c * h * w, linear_size), nn.ReLU(), nn.Linear(linear_size, num_classes))
    return WideResNet(nn.Sequential(*layers), head, shape, num_classes)
