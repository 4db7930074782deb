"""Preprocessing as a module: uint8 pixels in, the normalized float tensor a network expects out.

One object serves training (every batch), evaluation, explain, predict and, through the model file,
export and serving: `Preprocess.from_info(info)` rebuilds exactly the transform a model was trained
with. Its scale and shift are buffers made once, so the training loop creates no tensors per batch,
and `.to(device)` moves them with the model. They are not persistent: the model file records mean
and std as JSON metadata, not as weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn


FIT_CHUNK_BYTES = 32 * 2**20  # uint8 image bytes per histogram pass in Preprocess.fit: bounded memory


class Preprocess(nn.Module):
    """(x / 255 - mean) / std per channel, computed as x * scale - shift on whole batches.

    x: (N, C, H, W) uint8 -> (N, C, H, W) float32, channels-last in memory when asked (oneDNN and
    cuDNN convolutions run faster on NHWC; see benchmarks/NOTES.md)."""

    def __init__(self, mean: list[float], std: list[float], channels_last: bool = False):
        super().__init__()
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.channels_last = channels_last
        std_t = torch.tensor(self.std).view(1, -1, 1, 1)  # (1, C, 1, 1) float32
        mean_t = torch.tensor(self.mean).view(1, -1, 1, 1)
        # The same float32 operations, in the same order, as the inline normalization this replaced,
        # so the same seed still gives the same run bit for bit.
        self.register_buffer("scale", 1 / (255 * std_t), persistent=False)
        self.register_buffer("shift", mean_t / std_t, persistent=False)

    @classmethod
    def fit(cls, images: torch.Tensor, channels_last: bool = False) -> "Preprocess":
        """Mean and (sample) std per channel of uint8 images (N, C, H, W), in [0, 1] units.

        Exact: from each channel's histogram of the 256 pixel values, the sums are whole numbers,
        so mean and variance are exact fractions rounded once. A float64 copy of MNIST's training
        images (340 MB) took 0.2 s; the histograms take a fraction of that."""
        mean, std = [], []
        hist = torch.zeros(images.shape[1], 256, dtype=torch.int64)
        step = max(1, FIT_CHUNK_BYTES // max(1, images[0].numel()))  # images per chunk (MNIST: 42,799)
        for i in range(0, len(images), step):  # in chunks: images on disk (data.DiskImages) are read once
            chunk = images[i:i + step]  # (B, C, H, W) uint8
            for c in range(chunk.shape[1]):
                hist[c] += torch.bincount(chunk[:, c].reshape(-1).to(torch.uint8), minlength=256)
        for c in range(images.shape[1]):
            counts = hist[c].tolist()
            n = sum(counts)
            total = sum(v * k for v, k in enumerate(counts))  # exact integers from here on
            squares = sum(v * v * k for v, k in enumerate(counts))
            mean.append(total / (n * 255))
            variance = (n * squares - total * total) / (n * max(n - 1, 1)) / 255 ** 2
            std.append(max(variance ** 0.5, 1e-3))
        return cls(mean, std, channels_last)

    @classmethod
    def from_info(cls, info, channels_last: bool = False) -> "Preprocess":
        """The preprocessing a model file records (a modelfile.ModelInfo's `preprocessing`; not
        imported here: the model file and preprocessing are sibling layers)."""
        return cls(info.preprocessing.mean, info.preprocessing.std, channels_last)

    def record(self) -> dict:
        """The model file's `preprocessing` metadata, less the decoding rule (the data layer's `resize`)."""
        return {"scale": 255, "mean": self.mean, "std": self.std}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float()  # uint8 -> a new tensor; float input (an augmented batch) is returned as is
        out = (out.mul_(self.scale) if out is not x else out.mul(self.scale)).sub_(self.shift)  # (N, C, H, W) float32
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def extra_repr(self) -> str:
        return (f"mean={[round(m, 4) for m in self.mean]}, std={[round(s, 4) for s in self.std]}, "
                f"channels_last={self.channels_last}")
