"""The notes' first CNNs: LeNet-5, AlexNet, VGG and Network-in-Network, plain stacks of
convolutions and pooling with no branches or shortcuts."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..base import Classifier


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

    def embed(self, x):  # (N, C, H, W) -> (N, 84), after the last tanh
        return self.classifier[:-1](self.avgpool(self.features(x)))

    def forward(self, x):  # (N, C, H, W) -> (N, K)
        return self.classify(self.embed(x))


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

    def embed(self, x):  # (N, C, H, W) -> (N, 4096), after the second dense layer's ReLU
        return self.classifier[:-1](torch.flatten(self.avgpool(self.features(x)), 1))

    def forward(self, x):
        return self.classify(self.embed(x))


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

    def embed(self, x):  # (N, C, H, W) -> (N, 4096), after the second dense layer's ReLU
        return self.classifier[:-1](torch.flatten(self.avgpool(self.features(x)), 1))

    def forward(self, x):
        return self.classify(self.embed(x))


def nin_block(cin: int, cout: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    """A k x k conv followed by two 1x1 convs: a small MLP slid over every position (Lin et al. 2013)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 1), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 1), nn.ReLU(inplace=True))


def nin_map_side(side: int) -> int:
    """The side of NiN's last feature map for an input side: three blocks, each pooled 3/2."""
    for kernel, stride, padding in ((11, 4, 0), (5, 1, 2), (3, 1, 1)):
        side = (side + 2 * padding - kernel) // stride + 1  # the block's first conv (its 1x1s keep the side)
        side = (side - 3) // 2 + 1  # max-pool 3, stride 2
    return side


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
        self.map_size = tuple(nin_map_side(side) for side in image_size)  # (h, w) of the last feature map

    @property
    def head(self) -> nn.Sequential:
        return self.classifier

    def embed(self, x):  # (N, C, H, W) -> (N, 384 * h * w): the last feature map, flattened
        # NiN has no dense layer: its head is a conv block on the whole map, so the map is its input
        return torch.flatten(self.features(x), 1)

    def classify(self, features):  # (N, 384 * h * w) -> (N, K), on the map of the input it was built for
        return self.classifier(features.unflatten(1, (384, *self.map_size))).mean(dim=(2, 3))

    def forward(self, x):  # any input size: the map need not be the one it was built for
        # The last ReLU makes logits non-negative, as in the paper; the mean over positions is the logit.
        return self.classifier(self.features(x)).mean(dim=(2, 3))
