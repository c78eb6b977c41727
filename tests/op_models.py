"""Small models that together use every op with a bound rule (for the soundness tests)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ActivationsMLP(nn.Module):
    """Linear, ReLU, LeakyReLU, Sigmoid, Tanh, BatchNorm1d, Dropout, Identity, flatten."""

    def __init__(self, in_shape=(2, 4, 4), hidden=12, out=5):
        super().__init__()
        n = int(torch.tensor(in_shape).prod())
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU(0.1),
            nn.Dropout(0.3), nn.Linear(hidden, hidden), nn.Sigmoid(), nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden), nn.Tanh(), nn.Identity(), nn.Linear(hidden, out))

    def forward(self, x):
        return self.net(x)


class OpsCNN(nn.Module):
    """Normalization buffers (sub/div), Conv2d with stride/padding/dilation/groups, BatchNorm2d,
    ReLU, residual add, sub of two tensors, mul by a constant, cat, MaxPool2d, AvgPool2d,
    AdaptiveAvgPool2d, permute, transpose, view, reshape, functional relu/sigmoid/tanh."""

    def __init__(self, in_ch=2, width=4, out=5):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4, 0.6][:in_ch]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([0.3, 0.2][:in_ch]).view(1, -1, 1, 1))
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=2, dilation=2, groups=2)
        self.conv3 = nn.Conv2d(width, width, 1)
        self.conv4 = nn.Conv2d(2 * width, width, 3, stride=2, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)
        self.gap = nn.AdaptiveAvgPool2d((2, 2))
        self.fc = nn.Linear(width * 4, out)

    def forward(self, x):
        x = (x - self.mean) / self.std
        a = torch.relu(self.bn1(self.conv1(x)))
        b = self.conv2(a)
        c = a + b
        d = c - 0.5 * self.conv3(a)
        e = torch.cat([F.relu(d), torch.tanh(c)], dim=1)
        f = self.conv4(e)
        g = self.pool(torch.sigmoid(f) * 2 - 1)
        h = self.gap(self.avg(g))
        h = h.permute(0, 2, 3, 1).transpose(1, 2)
        h = h.reshape(h.shape[0], -1)
        return self.fc(h.view(h.size(0), -1)) + 1.0


class TrainBNResNet(nn.Module):
    """A residual block with BatchNorm in training mode (batch statistics as constants)."""

    def __init__(self, in_ch=2, width=4, out=5):
        super().__init__()
        self.conv0 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 16, out)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv0(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        x = F.avg_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
    return model


class ExpLogMLP(nn.Module):
    """exp, log, sum and mean reductions, logsumexp."""

    def __init__(self, in_shape=(2, 4, 4), hidden=8, out=5):
        super().__init__()
        n = int(torch.tensor(in_shape).prod())
        self.fc1 = nn.Linear(n, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out)

    def forward(self, x):
        h = torch.exp(torch.tanh(self.fc1(torch.flatten(x, 1))))
        h = torch.log(torch.sigmoid(self.fc2(h)) + 0.1)
        h = h - h.mean(1, keepdim=True) + 0.1 * h.sum(dim=1, keepdim=True)
        return self.fc3(h) + torch.logsumexp(h, 1, keepdim=True)
