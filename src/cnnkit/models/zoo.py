"""Registry entries for the classic architectures (plain nn.Modules in the classic/ package)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from . import classic, speedrun

# Inputs at or below this side length get the small-input stem (3x3/1, no max-pool) automatically,
# because the ImageNet stem's 4x reduction would leave a 32x32 image at 8x8 before the first block.
SMALL_INPUT_MAX_SIDE = 64
IMAGENET_MEAN_STD = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # torchvision's weights expect this


@dataclass
class Arch:
    name: str
    build: Callable[..., nn.Module]  # (num_classes, in_channels, **args) -> module
    description: str
    default_input: tuple[int, int, int] = (3, 224, 224)
    min_size: int = 32  # smallest square input side the network accepts
    small_input: bool = False  # has a small-input stem, chosen for sides <= SMALL_INPUT_MAX_SIDE
    published_params: int | None = None  # PyTorch parameter count at 3x224x224, 1000 classes
    args: dict = field(default_factory=dict)


ARCHS: dict[str, Arch] = {}


def register(arch: Arch) -> None:
    ARCHS[arch.name] = arch


register(Arch("lenet5", classic.LeNet5, "LeNet-5 (1998): tanh convs and average pooling", (1, 28, 28), 28))
register(Arch("alexnet", classic.AlexNet, "AlexNet (2012), torchvision's layout", min_size=63,
              published_params=61_100_840))
register(Arch("vgg11", lambda **kw: classic.VGG(classic.VGG_WIDTHS["vgg11"], **kw), "VGG-11 (2014): a table of widths",
              min_size=32, published_params=132_863_336))
register(Arch("vgg16", lambda **kw: classic.VGG(classic.VGG_WIDTHS["vgg16"], **kw), "VGG-16 (2014): a table of widths",
              min_size=32, published_params=138_357_544))
register(Arch("nin", classic.NiN, "Network in Network (2013): 1x1 conv MLPs and global average pooling",
              min_size=67))
register(Arch("googlenet", classic.GoogLeNet, "GoogLeNet / Inception v1 (2014) with BatchNorm; aux heads off",
              min_size=32, published_params=6_624_904))
register(Arch("resnet18", lambda **kw: classic.ResNet(classic.BasicBlock, [2, 2, 2, 2], **kw),
              "ResNet-18 (2015); 3x3 stem for small inputs", min_size=8, small_input=True, published_params=11_689_512))
register(Arch("resnet34", lambda **kw: classic.ResNet(classic.BasicBlock, [3, 4, 6, 3], **kw),
              "ResNet-34 (2015); 3x3 stem for small inputs", min_size=8, small_input=True, published_params=21_797_672))
register(Arch("resnet50", lambda **kw: classic.ResNet(classic.Bottleneck, [3, 4, 6, 3], **kw),
              "ResNet-50 (2015), bottleneck blocks; 3x3 stem for small inputs", min_size=8, small_input=True,
              published_params=25_557_032))
register(Arch("mobilenet_v2", classic.MobileNetV2, "MobileNetV2 (2018): inverted residuals, depthwise convs",
              min_size=8, small_input=True, published_params=3_504_872))
register(Arch("efficientnet_lite0", classic.EfficientNetLite0,
              "EfficientNet-Lite0 (2019/2020): MBConv without SE, ReLU6; ImageNet weights installable",
              min_size=8, small_input=True, published_params=4_652_008))
register(Arch("speedrun", speedrun.SpeedrunNet,
              "airbench94-style CIFAR-10 net (2024): frozen patch whitening, 3 conv groups of 64/256/256",
              (3, 32, 32), min_size=16))
register(Arch("speedrun-small", lambda **kw: speedrun.SpeedrunNet(widths=(64, 128, 128), **kw),
              "airbench93-style CIFAR-10 net: speedrun with groups of 64/128/128 (the fast-cifar10 recipe's)",
              (3, 32, 32), min_size=16))
