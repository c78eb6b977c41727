"""ResNeXt for certified training (the ``ResNeXt_cifar`` of auto_LiRPA / Shi et al. 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import FeatureClassifier, as_int_tuple, as_shape, conv_out, norm1d, norm2d

__all__ = ["ResNeXtBlock", "ResNeXt", "resnext"]


class ResNeXtBlock(nn.Module):
    """Bottleneck with grouped 3x3 conv: 1x1 -> 3x3 (groups=cardinality, stride) -> 1x1 (x2), BN after each.

    ``out = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``; the shortcut is a
    strided 1x1 conv + BN when the shape changes, identity otherwise.
    """

    expansion = 2

    def __init__(
        self, in_planes: int, cardinality: int, bottleneck_width: int, stride: int = 1, bn: bool = True
    ) -> None:
        super().__init__()
        group_width = cardinality * bottleneck_width
        out_planes = self.expansion * group_width
        self.conv1 = nn.Conv2d(in_planes, group_width, 1)
        self.bn1 = norm2d(group_width, bn)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(group_width, group_width, 3, stride=stride, padding=1, groups=cardinality)
        self.bn2 = norm2d(group_width, bn)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(group_width, out_planes, 1)
        self.bn3 = norm2d(out_planes, bn)
        if stride != 1 or in_planes != out_planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride), norm2d(out_planes, bn)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class ResNeXt(FeatureClassifier):
    """Stem conv3x3-BN-ReLU -> stages of ResNeXt blocks -> flatten (no pooling) -> FC-BN1d-ReLU -> FC."""


def resnext(
    in_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    num_blocks: Sequence[int] = (1, 1, 1),
    cardinality: int = 2,
    bottleneck_width: int = 32,
    stem_width: int = 64,
    linear_size: int = 512,
    bn: bool = True,
) -> ResNeXt:
    """ResNeXt (Xie et al. 2017) for certified training: ``ResNeXt_2_32`` of Shi et al. 2021.

    (auto_LiRPA's ``ResNeXt_cifar``, Xu et al. 2020, is this net with a 16-channel stem and BN only after conv1.)

    Defaults at (3, 32, 32), output (C, H, W) per layer:

    ====================  ==================================================  ==============
    stem                  conv3x3 3->64, BN, ReLU                              (64, 32, 32)
    stage 1 (stride 1)    1x1 64->64, 3x3 64->64 g=2, 1x1 64->128; sc 1x1+BN   (128, 32, 32)
    stage 2 (stride 2)    1x1 128->128, 3x3 g=2 s2, 1x1 128->256; sc 1x1 s2    (256, 16, 16)
    stage 3 (stride 2)    1x1 256->256, 3x3 g=2 s2, 1x1 256->512; sc 1x1 s2    (512, 8, 8)
    head                  flatten 32768 -> Linear 512, BN1d, ReLU -> Linear 10
    ====================  ==================================================  ==============

    Group width is ``cardinality * bottleneck_width`` (doubling every stage), block output is twice
    that. Like the reference there is no final pooling: the flattened features feed a 512-unit dense
    layer (16.8M of the 17.6M parameters). The reference's TinyImageNet variant is
    ``num_blocks=(2, 2, 2), bottleneck_width=8, stem_width=16`` at (3, 64, 64).
    """
    shape = as_shape(in_shape)
    num_blocks = as_int_tuple(num_blocks, "num_blocks")
    c, h, w = shape
    layers: list[nn.Module] = [nn.Conv2d(c, stem_width, 3, padding=1), norm2d(stem_width, bn), nn.ReLU()]
    c = stem_width
    bw = bottleneck_width
    for stage, n in enumerate(num_blocks):
        for i in range(n):
            stride = 2 if (stage > 0 and i == 0) else 1
            layers.append(ResNeXtBlock(c, cardinality, bw, stride, bn))
            c = ResNeXtBlock.expansion * cardinality * bw
            h, w = conv_out(h, 3, stride, 1), conv_out(w, 3, stride, 1)
        bw *= 2
    head = nn.Sequential(
        nn.Linear(c * h * w, linear_size), norm1d(linear_size, bn), nn.ReLU(), nn.Linear(linear_size, num_classes)
    )
    return ResNeXt(nn.Sequential(*layers), head, shape, num_classes)
