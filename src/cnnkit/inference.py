"""The forward path every command shares: device and precision, logits for uint8 images in batches,
calibrated probabilities, test-time augmentation, top-k accuracy.

This layer imports no training, evaluation or reporting code and no matplotlib: training
(validation), evaluate, explain, predict and, later, export and serving all stand on it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CnnkitError
from .hardware import precision_choice
from .modelfile import ModelInfo
from .preprocess import Preprocess


# ----------------------------------------------------------------------------- device and precision
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CnnkitError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """'bf16' or 'fp32' for --precision NAME on this device: hardware.precision_choice's rule (bf16
    only where this machine runs it faster), the one every use of bf16 goes through."""
    return precision_choice(name, device)[0]


# ----------------------------------------------------------------------------- logits and probabilities
# Images per inference batch. Measured on 2 CPU cores (benchmarks/NOTES.md, "inference batch"):
# 128 is 1.2-2.4x faster than 512 for seed-mnist-torch, seed-mnist-keras and seed-cifar10 in fp32
# and bf16, as the activations stay in cache, with bit-identical logits.
INFERENCE_BATCH = 128


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, preprocess: Preprocess, device: torch.device | None = None,
                   precision: str = "fp32", batch_size: int = INFERENCE_BATCH) -> torch.Tensor:
    """Logits (N, K) in float32 on the CPU for uint8 images (N, C, H, W), in eval mode.

    device: where the model and preprocess live (default: the model's parameters' device)."""
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i:i + batch_size].to(device, non_blocking=True))  # (B, C, H, W) float32
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def top_k_accuracy(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, k: int = 5) -> float:
    """The share of rows whose label is among the k highest scores (logits or probabilities)."""
    scores, labels = torch.as_tensor(scores), torch.as_tensor(labels)
    if len(labels) == 0:
        return 0.0
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (N, k)
    return (top == labels[:, None]).any(1).double().mean().item()


def class_logits(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Logits over the classes, (N, K): a binary model's one logit z (N, 1) becomes (-z/2, z/2), whose
    softmax is (1 - sigmoid(z), sigmoid(z)) and whose Grad-CAM has a gradient for either class."""
    if task != "binary":
        return logits
    return torch.cat([-logits / 2, logits / 2], dim=1)


def decide(probs: np.ndarray, info: ModelInfo) -> np.ndarray:
    """(N,) the class each row of probabilities (N, K) decides: the most probable, or for a binary
    model the second class where its probability reaches the model file's threshold."""
    if info.task == "binary":
        return (probs[:, 1] >= info.decision_thresholds[0]).astype(np.int64)
    return probs.argmax(1)


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """loss, accuracy, n and (with at least 5 classes) top-5 accuracy. Multi-label labels (N, K) of
    0/1: the mean binary cross-entropy per label, and as accuracy the share of images whose every
    label is right at probability 0.5 (subset accuracy; the tuned thresholds come after training)."""
    n, k = logits.shape
    if k == 1 and labels.ndim == 1:  # binary: one logit, the second class's
        return {"loss": F.binary_cross_entropy_with_logits(logits[:, 0], labels.float()).item(),
                "accuracy": ((logits[:, 0] > 0) == (labels == 1)).float().mean().item(), "n": n}
    if labels.ndim == 2:
        return {"loss": F.binary_cross_entropy_with_logits(logits, labels.float()).item(),
                "accuracy": ((logits > 0) == (labels > 0.5)).all(1).float().mean().item(), "n": n}
    result = {"loss": F.cross_entropy(logits, labels).item(),
              "accuracy": (logits.argmax(1) == labels).float().mean().item(), "n": n}
    if k >= 5:
        result["top5_accuracy"] = top_k_accuracy(logits, labels, 5)
    return result


def tta_views(x: torch.Tensor, hflip: bool, shift_pixels: int = 2) -> list[torch.Tensor]:
    """The notes' test-time augmentation: the image, its mirror (unless flipping changes the class,
    as for digits), and copies shifted by a few pixels in four directions (edges replicated)."""
    views = [x, x.flip(3)] if hflip else [x]
    h, w = x.shape[2:]
    s = shift_pixels
    padded = F.pad(x, (s, s, s, s), mode="replicate")
    for dy, dx in ((0, s), (2 * s, s), (s, 0), (s, 2 * s)):  # offsets into padded: content moves down, up, right, left
        views.append(padded[:, :, dy:dy + h, dx:dx + w])
    return views


@torch.no_grad()
def probabilities(model: nn.Module, info: ModelInfo, images: torch.Tensor, tta: bool = False,
                  calibrated: bool = True, device: torch.device = torch.device("cpu"),
                  batch_size: int = INFERENCE_BATCH, logits: torch.Tensor | None = None) -> np.ndarray:
    """softmax(logits / T) for uint8 images (N, C, H, W), averaged over TTA views if asked, in fp32;
    for a multi-label model sigmoid(logits), each label's probability on its own; for a binary
    model (1 - p, p) with p = sigmoid(z / T) (class_logits).
    logits: the plain view's logits when the caller has them already (one pass fewer).

    Channels-last activations: 1.5-2x faster fp32 inference on the CPU, results equal to 1e-5
    (measured on seed-mnist-torch, MNIST test)."""
    temperature = info.temperature if calibrated else 1.0
    preprocess = Preprocess.from_info(info, channels_last=True).to(device)
    model = model.eval().to(memory_format=torch.channels_last)
    if logits is None:
        logits = predict_logits(model, images, preprocess, device, batch_size=batch_size)
    logits = class_logits(logits, info.task)
    if info.task == "multi-label":  # one sigmoid per label; its thresholds decide (info.thresholds)
        if tta:
            raise CnnkitError("test-time augmentation averages single-label probabilities; leave --tta out")
        return torch.sigmoid(logits).numpy().astype(np.float64)
    probs = F.softmax(logits / temperature, dim=1)  # (N, K)
    if not tta:
        return probs.numpy().astype(np.float64)
    hflip, shift = info.tta.hflip, info.tta.shift_pixels
    total = probs.clone()
    views = 1
    for i in range(0, len(images), batch_size):
        others = tta_views(preprocess(images[i:i + batch_size].to(device)), hflip, shift)[1:]
        views = 1 + len(others)
        for v in others:  # the mirror and the four shifts; the plain view is `probs`
            v = v.contiguous(memory_format=torch.channels_last)
            logits_v = class_logits(model(v).float(), info.task)
            total[i:i + batch_size] += F.softmax(logits_v / temperature, dim=1).cpu()
    return (total / views).numpy().astype(np.float64)
