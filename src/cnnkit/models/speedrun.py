"""The CIFAR-10 speedrun network: cnnkit's own implementation of the techniques published with
airbench (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024), for the
`fast-cifar10` recipe.

    whitening  2x2 conv, frozen, set from the training images' patch covariance (init_from_data)
    block 1    conv 3x3 -> maxpool 2 -> BatchNorm -> GELU -> conv 3x3 -> BatchNorm -> GELU
    block 2    the same, wider
    block 3    the same
    head       maxpool 3 -> linear (no bias) -> x 1/9

What differs from a plain VGG-style net, and why (each from the airbench paper):
- The first layer whitens 2x2 patches: its filters are the patch covariance's eigenvectors scaled
  by 1/sqrt(eigenvalue), with their negatives (so the GELU after it passes both signs). It is not
  trained, which is why training can start at a high learning rate.
- Each convolution's first `in_channels` filters start as identities (dirac init): the net starts
  close to a shallower one and trains faster.
- BatchNorm has no trainable scale (the convolutions' scale is free anyway), a large momentum
  (statistics from the last few batches) and eps 1e-12.
- The logits are scaled by 1/9: a lower temperature at initialisation, which pairs with the recipe's
  label smoothing.
Pooling comes before BatchNorm so the normalisation works on a quarter of the pixels.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import Classifier

WIDTHS = (64, 256, 256)  # airbench94's block widths


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm with a trainable shift only; momentum 0.4 in PyTorch's convention (airbench's 0.6)."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class DiracConv(nn.Conv2d):
    """3x3 'same' convolution without bias whose first in_channels filters start as identities."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=1, bias=False)
        with torch.no_grad():
            nn.init.dirac_(self.weight[:min(cin, cout)])


def conv_group(cin: int, cout: int) -> nn.Sequential:  # (N, cin, H, W) -> (N, cout, H/2, W/2)
    return nn.Sequential(DiracConv(cin, cout), nn.MaxPool2d(2), FrozenScaleBatchNorm(cout), nn.GELU(),
                         DiracConv(cout, cout), FrozenScaleBatchNorm(cout), nn.GELU())


class SpeedrunNet(Classifier):
    """airbench-style CIFAR-10 network. 32x32 input: 31 after the 2x2 whitening, then 15, 7, 3, 1."""

    logit_scale = 1 / 9

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: tuple[int, int] = (32, 32),
                 widths: tuple[int, int, int] = WIDTHS, record: dict | None = None):
        super().__init__(num_classes, (in_channels, *image_size), record)
        w1, w2, w3 = widths
        whiten_width = 2 * in_channels * 2 * 2  # each of the c*2*2 eigenvectors and its negative
        self.whiten = nn.Conv2d(in_channels, whiten_width, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set by init_from_data, never trained
        self.features = nn.Sequential(nn.GELU(), conv_group(whiten_width, w1), conv_group(w1, w2), conv_group(w2, w3))
        # 3x3 -> 1 on 32x32 input, as airbench's MaxPool2d(3)
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.linear = nn.Linear(w3, num_classes, bias=False)

    @property
    def head(self) -> nn.Linear:
        return self.linear

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalized training images (N, C, H, W), N ~ 5,000."""
        c = images.shape[1]
        x = images.float().contiguous()
        patches = x.unfold(2, 2, 1).unfold(3, 2, 1)  # (N, C, H-1, W-1, 2, 2)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4).double()  # (P, C*2*2)
        covariance = patches.T @ patches / len(patches)  # (C*4, C*4)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).flip(0)  # largest first
        filters = filters.reshape(c * 4, c, 2, 2).to(self.whiten.weight.dtype)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()

    def embed(self, x):  # (N, C, H, W) -> (N, widths[2]), max-pooled
        return self.pool(self.features(self.whiten(x)))

    def classify(self, features):  # the head, then the 1/9 logit scale
        return self.linear(features) * self.logit_scale

    def forward(self, x):  # (N, C, H, W) -> (N, K)
        return self.classify(self.embed(x))
