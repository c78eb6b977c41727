"""Architectures of auto_LiRPA's test models, rebuilt for ``test_autolirpa_refs.py``.

auto_LiRPA's reference results (``$CERTTRAIN_AUTOLIRPA_REFS``, by default ``../shared/autolirpa_refs``)
store weights, inputs and bounds but no code.  The classes below rebuild each model so that its
state dict loads with ``strict=True`` and its ``repr`` matches the ``model_repr`` recorded in the
bundles.  The forward passes follow auto_LiRPA 0.7.1 (commit a050a3d) op for op, including the
in-place residual adds and Python's ``sum`` over a generator in ``Dense``, so that our tracer sees
the same code.  Constructors draw from the global RNG in the same order as the originals, so a
seed reproduces the recorded weights (checked against the bundles in float32).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class cnn_4layer_test(nn.Module):
    """tests/test_vision_models.py (``vision_test_data``), used in eval mode."""

    def __init__(self, fc_in: int = 192):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 4, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.shortcut = nn.Conv2d(3, 3, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 4, stride=2, padding=1)
        self.fc1 = nn.Linear(fc_in, 10)

    def forward(self, x):
        x_ = x
        x = F.relu(self.conv1(self.bn(x)))
        x += self.shortcut(x_)
        x = F.relu(self.conv2(x))
        x = x.view(x.size(0), -1)
        x = self.fc1(x)
        return x


class cnn_4layer_resnet(cnn_4layer_test):
    """tests/test_rectangle_patches.py: the same network on a 28x32 input (Linear(168, 10))."""

    def __init__(self):
        super().__init__(fc_in=168)


class cnn_MNIST(nn.Module):
    """tests/test_constant.py: constants multiply the activations (x*2.0 and out*0.5)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 4, stride=2, padding=1)
        self.fc1 = nn.Linear(784, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = x.view(-1, 784)
        x = 2.0 * x
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return 0.5 * x


def avgpool_model(in_dim: int, hidden: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    """tests/test_avgpool.py: four Conv -> ReLU -> AvgPool stages, then a 2-layer MLP head."""
    def pool():
        return nn.AvgPool2d(kernel, stride=stride, padding=padding)

    layers = [nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), pool(),
              nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), pool()]
    for _ in range(2):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), pool()]
    side = in_dim
    for _ in range(4):
        side = (side + 2 * padding - kernel) // stride + 1
    layers += [nn.Flatten(), nn.Linear(8 * side * side, hidden), nn.ReLU(), nn.Linear(hidden, 2)]
    return nn.Sequential(*layers)


class MaxPoolModel(nn.Module):
    """tests/test_maxpool.py (ONNX-converted naming): Conv -> ReLU -> MaxPool -> Conv -> ReLU ->
    permute to NHWC -> flatten -> 1x1 "dense" Conv.  File ``maxpool_test_data_K-P-K-CP``:
    pool kernel = stride = K, pool padding P, conv padding CP."""

    def __init__(self, kernel: int, padding: int, conv_padding: int, n_features: int):
        super().__init__()
        self.n_n_conv2d = nn.Conv2d(1, 1, 2, stride=1, padding=conv_padding)
        self.n_n_pool = nn.MaxPool2d(kernel, stride=kernel, padding=padding)
        self.n_n_conv2d_2 = nn.Conv2d(1, 1, 2, stride=1, padding=conv_padding)
        self.n_n_flatten_Flatten = nn.Flatten(start_dim=1)
        self.n_n_dense = nn.Conv2d(n_features, 2, 1)
        self.n_n_activation_Flatten = nn.Flatten(start_dim=1)

    def forward(self, x):
        x = F.relu(self.n_n_conv2d(x))
        x = self.n_n_pool(x)
        x = F.relu(self.n_n_conv2d_2(x))
        x = x.permute(0, 2, 3, 1)
        x = self.n_n_flatten_Flatten(x)
        x = torch.unsqueeze(x, 2)
        x = torch.unsqueeze(x, 3)
        return self.n_n_activation_Flatten(self.n_n_dense(x))


class ToyModel(nn.Module):
    """tests/test_perturbation.py."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 4)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


class ConstrainedConcretizeModel(nn.Module):
    """tests/test_constrained_concretize.py computes ``x.matmul(w1.t())`` with plain tensor
    attributes; a MatMul with a constant right factor is a bias-free Linear layer, which is how it
    is written here (general MatMul has no bound rule in certtrain)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(2, 2, bias=False)
        self.fc2 = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1., -1.], [2., -1.]]))
            self.fc2.weight.copy_(torch.tensor([[1., -1.]]))

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class SigmoidModel(nn.Module):
    """tests/test_s_shaped.py (sigmoid part): y = sigmoid(x)."""

    def forward(self, x):
        return torch.sigmoid(x)


# ---- examples/vision/models/resnet.py (model_resnet, a DenseSequential) -------------------------

class Dense(nn.Module):
    """Sums ``W_i(x_i)`` over the last ``len(Ws)`` outputs of the enclosing DenseSequential;
    ``None`` entries skip an output."""

    def __init__(self, *Ws):
        super().__init__()
        self.Ws = nn.ModuleList(list(Ws))
        if len(Ws) > 0 and hasattr(Ws[0], 'out_features'):
            self.out_features = Ws[0].out_features

    def forward(self, *xs):
        xs = xs[-len(self.Ws):]
        out = sum(W(x) for x, W in zip(xs, self.Ws) if W is not None)
        return out


class DenseSequential(nn.Sequential):
    """Keeps every layer's output; Dense layers see all of them."""

    def forward(self, x):
        xs = [x]
        for module in self._modules.values():
            if 'Dense' in type(module).__name__:
                xs.append(module(*xs))
            else:
                xs.append(module(xs[-1]))
        return xs[-1]


def model_resnet(in_ch=3, in_dim=32, width=1, mult=16, N=1) -> DenseSequential:
    def block(in_filters, out_filters, k, downsample):
        if not downsample:
            k_first, skip_stride, k_skip = 3, 1, 1
        else:
            k_first, skip_stride, k_skip = 4, 2, 2
        return [
            Dense(nn.Conv2d(in_filters, out_filters, k_first, stride=skip_stride, padding=1)),
            nn.ReLU(),
            Dense(nn.Conv2d(in_filters, out_filters, k_skip, stride=skip_stride, padding=0),
                  None,
                  nn.Conv2d(out_filters, out_filters, k, stride=1, padding=1)),
            nn.ReLU(),
        ]

    conv1 = [nn.Conv2d(in_ch, mult, 3, stride=1, padding=3 if in_dim == 28 else 1), nn.ReLU()]
    conv2 = block(mult, mult * width, 3, False)
    for _ in range(N):
        conv2.extend(block(mult * width, mult * width, 3, False))
    conv3 = block(mult * width, mult * 2 * width, 3, True)
    for _ in range(N - 1):
        conv3.extend(block(mult * 2 * width, mult * 2 * width, 3, False))
    conv4 = block(mult * 2 * width, mult * 4 * width, 3, True)
    for _ in range(N - 1):
        conv4.extend(block(mult * 4 * width, mult * 4 * width, 3, False))
    layers = conv1 + conv2 + conv3 + conv4 + [
        nn.Flatten(), nn.Linear(mult * 4 * width * 8 * 8, 1000), nn.ReLU(), nn.Linear(1000, 10)]
    model = DenseSequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2. / n))
            if m.bias is not None:
                m.bias.data.zero_()
    return model


# ---- examples/vision/models/resnet18.py ----------------------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes=10, in_planes=64):
        super().__init__()
        self.in_planes = in_planes
        self.conv1 = nn.Conv2d(3, in_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.layer1 = self._make_layer(block, in_planes, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, in_planes * 2, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, in_planes * 4, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, in_planes * 8, num_blocks[3], stride=2)
        self.linear = nn.Linear(in_planes * 8 * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


def ResNet18(in_planes=64) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], in_planes=in_planes)


class PowModel(nn.Module):
    """test_pow_noninteger's model: y = x ** p elementwise."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x ** self.p


class MinMaxModel(nn.Module):
    """test_min_max's model: y = seq3(max(seq1(x), seq2(x)))."""

    def __init__(self):
        super().__init__()
        self.seq1 = nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1))
        self.seq2 = nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1))
        self.seq3 = nn.Sequential(nn.Conv2d(32, 8, 2, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 100),
                                  nn.ReLU(), nn.Linear(100, 10))

    def forward(self, x):
        return self.seq3(torch.max(self.seq1(x), self.seq2(x)))
