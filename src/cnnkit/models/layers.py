"""Layers in the lecture notes' vocabulary that PyTorch lacks or names differently:
padding 'same' (also with stride, TensorFlow's rule) and 'full', and L2 pooling."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "softmax": lambda: nn.Softmax(dim=1),
    "none": nn.Identity,
}


def same_padding(n: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding so that the output has ceil(n / stride) elements.

    TensorFlow's rule: any odd pixel of padding goes after (right / bottom)."""
    total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
    return total // 2, total - total // 2


def resolve_padding(padding: str | int, kernel: int, stride: int, n: int) -> tuple[int, int]:
    """Padding for one spatial axis of length n as (before, after)."""
    if padding == "valid":
        return 0, 0
    if padding == "full":  # every partial overlap of kernel and input: o = n + k - 1 at stride 1
        return kernel - 1, kernel - 1
    if padding == "same":
        return same_padding(n, kernel, stride)
    return int(padding), int(padding)


def output_size(n: int, kernel: int, before: int, after: int, stride: int) -> int:
    """o = floor((n + p_before + p_after - m) / s) + 1, the notes' formula with 2p split in two."""
    return (n + before + after - kernel) // stride + 1


class Conv(nn.Module):
    """Convolution (cross-correlation, as every framework computes it) + activation.

    Symmetric padding goes to nn.Conv2d itself (fastest); asymmetric padding ('same' with an even
    kernel or a stride) is an explicit F.pad in front."""

    def __init__(self, in_channels: int, filters: int, kernel: int, stride: int,
                 pad_h: tuple[int, int], pad_w: tuple[int, int], activation: str):
        super().__init__()
        symmetric = pad_h[0] == pad_h[1] and pad_w[0] == pad_w[1]
        self.pad = None if symmetric else (pad_w[0], pad_w[1], pad_h[0], pad_h[1])
        self.conv = nn.Conv2d(in_channels, filters, kernel, stride,
                              padding=(pad_h[0], pad_w[0]) if symmetric else 0)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, F, H', W')
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return self.act(self.conv(x))


class Pool(nn.Module):
    """Max, average or L2 pooling over size x size windows (stride < size overlaps them)."""

    def __init__(self, kind: str, size: int, stride: int, pad_h: tuple[int, int], pad_w: tuple[int, int]):
        super().__init__()
        self.kind, self.size, self.stride = kind, size, stride
        self.pad = (pad_w[0], pad_w[1], pad_h[0], pad_h[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            # Max pooling pads with -inf so padding never wins; average and L2 count zeros, like Keras.
            x = F.pad(x, self.pad, value=float("-inf") if self.kind == "max" else 0.0)
        if self.kind == "max":
            return F.max_pool2d(x, self.size, self.stride)
        if self.kind == "avg":
            return F.avg_pool2d(x, self.size, self.stride)
        # L2 pooling: sqrt of the sum of squares in each window. nn.LPPool2d's gradient is NaN
        # where a window is all zeros (common after ReLU); clamping at the dtype's smallest normal
        # number keeps the value (to 1e-19 in float32) and gives those windows a zero gradient.
        sumsq = F.avg_pool2d(x * x, self.size, self.stride) * (self.size * self.size)
        return torch.sqrt(sumsq.clamp_min(torch.finfo(sumsq.dtype).tiny))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, size={self.size}, stride={self.stride}, pad={self.pad}"


class GlobalPool(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C)
        return x.mean(dim=(2, 3)) if self.kind == "avg" else x.amax(dim=(2, 3))

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


class Dense(nn.Module):
    """Fully connected layer + activation."""

    def __init__(self, in_features: int, units: int, activation: str):
        super().__init__()
        self.linear = nn.Linear(in_features, units)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, d_in) -> (N, units)
        return self.act(self.linear(x))
