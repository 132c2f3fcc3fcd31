"""The paper's benchmark networks (Table II), defined here so nothing is downloaded.

``cifarnet`` is TF-slim's CifarNet without local response normalisation (its ReLUs after
the max-pools, the same function); ``alexnet`` and ``vgg19`` follow the originals with a
``width`` multiplier on every channel count and an ``image_size`` knob so they run on small
inputs on a CPU. ``functional_net`` uses
``F.conv2d`` with stride 2 and no bias (it exercises the functional rewrite).

>>> import torch
>>> cifarnet(in_channels=1, image_size=28)(torch.randn(2, 1, 28, 28)).shape
torch.Size([2, 10])
>>> vgg19(width=0.125, image_size=32)(torch.randn(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarNet", "cifarnet", "alexnet", "vgg19", "FunctionalNet", "functional_net", "MODELS"]


def _pooled(size: int, times: int) -> int:
    for _ in range(times):
        size = (size - 1) // 2 + 1  # MaxPool2d(3, 2, padding=1) and MaxPool2d(2, 2, ceil_mode=True)
    return size


class CifarNet(nn.Module):
    """conv 5x5x64, pool, conv 5x5x64, pool, fc 384, fc 192, fc 10.

    Each convolution's ReLU runs after its max-pool (``pool_first=True``, the default), on a
    quarter of the elements. Max-pooling and ReLU commute (ReLU is monotonic), so the values
    and the gradients are those of TF-slim's order, conv -> ReLU -> pool (``pool_first=False``),
    bit for bit; only the time differs (docs/performance.md, "Training step")."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width: float = 1.0,
        pool_first: bool = True,
    ):
        super().__init__()
        self.pool_first = pool_first
        c = max(1, round(64 * width))
        self.conv1 = nn.Conv2d(in_channels, c, 5, padding=2)
        self.pool1 = nn.MaxPool2d(3, 2, padding=1)
        self.conv2 = nn.Conv2d(c, c, 5, padding=2)
        self.pool2 = nn.MaxPool2d(3, 2, padding=1)
        s = _pooled(image_size, 2)
        self.fc1 = nn.Linear(c * s * s, 384)
        self.fc2 = nn.Linear(384, 192)
        self.fc3 = nn.Linear(192, num_classes)

    def forward(self, x):
        if self.pool_first:
            x = F.relu(self.pool1(self.conv1(x)))
            x = F.relu(self.pool2(self.conv2(x)))
        else:
            x = self.pool1(F.relu(self.conv1(x)))
            x = self.pool2(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def cifarnet(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: float = 1.0, pool_first: bool = True
) -> CifarNet:
    return CifarNet(num_classes, in_channels, image_size, width, pool_first)


class _Classifier(nn.Module):
    """torchvision's layout: ``features`` -> ``avgpool`` -> flatten -> ``classifier``."""

    def __init__(self, features: nn.Module, pool: int, classifier: nn.Module):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.classifier = classifier

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def alexnet(num_classes: int = 10, in_channels: int = 3, image_size: int = 224, width: float = 1.0) -> nn.Module:
    """AlexNet (5 conv layers). Below 100 pixels the 11x11 stem runs at stride 1."""

    def w(c):
        return max(1, round(c * width))

    stride = 4 if image_size >= 100 else 1
    features = nn.Sequential(
        nn.Conv2d(in_channels, w(64), 11, stride=stride, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(w(64), w(192), 5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(w(192), w(384), 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(w(384), w(256), 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(w(256), w(256), 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, padding=1),
    )
    pool = 6 if image_size >= 100 else 2
    hidden = w(4096)
    classifier = nn.Sequential(
        nn.Dropout(),
        nn.Linear(w(256) * pool * pool, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )
    return _Classifier(features, pool, classifier)


_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def vgg19(num_classes: int = 10, in_channels: int = 3, image_size: int = 224, width: float = 1.0) -> nn.Module:
    """VGG-19 (16 conv layers, 3x3). Pools use ceil_mode so 28-pixel inputs survive."""
    layers, c = [], in_channels
    for v in _VGG19:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            out = max(1, round(v * width))
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(inplace=True)]
            c = out
    pool = 7 if image_size >= 100 else 1
    hidden = max(1, round(4096 * width))
    classifier = nn.Sequential(
        nn.Linear(c * pool * pool, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(hidden, num_classes),
    )
    return _Classifier(nn.Sequential(*layers), pool, classifier)


class FunctionalNet(nn.Module):
    """Two ``F.conv2d`` calls on raw parameters: 3x3 stride 2 without bias, then 3x3 with
    bias and dilation 2."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(width, in_channels, 3, 3) * (2 / (9 * in_channels)) ** 0.5)
        self.w2 = nn.Parameter(torch.randn(width, width, 3, 3) * (2 / (9 * width)) ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, None, stride=2, padding=1))
        x = F.relu(F.conv2d(x, self.w2, self.b2, padding=2, dilation=2))
        return self.head(x.mean((2, 3)))


def functional_net(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> FunctionalNet:
    return FunctionalNet(num_classes, in_channels, width)


MODELS = {"cifarnet": cifarnet, "alexnet": alexnet, "vgg19": vgg19, "functional": functional_net}
