"""Small CIFAR-style ResNets built from post-activation BasicBlocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import FeatureClassifier, as_int_tuple, as_shape, conv_out, norm2d

__all__ = ["BasicBlock", "ResNet", "resnet"]


class BasicBlock(nn.Module):
    """relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x)); shortcut = 1x1 conv + BN on shape change."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, bn: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1)
        self.bn1 = norm2d(planes, bn)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1)
        self.bn2 = norm2d(planes, bn)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride), norm2d(planes, bn)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(FeatureClassifier):
    """Stem conv3x3-BN-ReLU -> stages of BasicBlocks -> global average pool -> flatten -> Linear."""


def resnet(
    in_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    num_blocks: Sequence[int] = (2, 2),
    widths: Sequence[int] = (16, 32),
    bn: bool = True,
) -> ResNet:
    """Small CIFAR ResNet (He et al. 2016, "Deep Residual Learning") with BasicBlocks and global avg pool.

    Stem conv3x3(C->widths[0])-BN-ReLU; stage i has num_blocks[i] blocks of width widths[i], stride 2 at
    the first block of every stage but the first; AdaptiveAvgPool2d(1); Linear(widths[-1], num_classes).
    """
    shape = as_shape(in_shape)
    num_blocks = as_int_tuple(num_blocks, "num_blocks")
    widths = as_int_tuple(widths, "widths")
    if len(num_blocks) != len(widths) or not widths:
        raise ValueError(f"num_blocks {num_blocks} and widths {widths} must be non-empty and of equal length")
    c, h, w = shape
    layers: list[nn.Module] = [nn.Conv2d(c, widths[0], 3, padding=1), norm2d(widths[0], bn), nn.ReLU()]
    c = widths[0]
    for stage, (n, planes) in enumerate(zip(num_blocks, widths)):
        for i in range(n):
            stride = 2 if (stage > 0 and i == 0) else 1
            layers.append(BasicBlock(c, planes, stride, bn))
            c, h, w = planes, conv_out(h, 3, stride, 1), conv_out(w, 3, stride, 1)
    layers.append(nn.AdaptiveAvgPool2d(1))
    return ResNet(nn.Sequential(*layers), nn.Sequential(nn.Linear(c, num_classes)), shape, num_classes)
