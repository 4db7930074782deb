"""Knowledge distillation (Hinton, Vinyals and Dean 2015): the model learns from a trained teacher's
softened outputs besides the labels.

    Teacher.load(path, ds, device)   a run folder or model file whose classes and task match the data's
    teacher(batch)                   its logits (B, K) on the student's batch: resized to the teacher's
                                     input, in its own preprocessing, in inference mode
    soft_loss(student, teacher, T)   T^2 KL(softmax(teacher / T) || softmax(student / T)), batch mean

The loss trained on is (1 - alpha) * the labels' loss + alpha * soft_loss (alpha: --kd-alpha), so
alpha 0 is plain training. The teacher sees the same augmented (and mixed) pixels as the student,
so its targets describe the image the student is shown; where nothing changes the images between
epochs (no augmentation, no mixing), its logits per training image are computed once and reused.
The teacher's raw logits are used, not its calibrated temperature: the distillation temperature
replaces it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Dataset
from ..errors import CnnkitError
from ..inference import INFERENCE_BATCH, class_logits
from ..modelfile import ModelInfo, load_model, read_info, resolve_model_path
from ..preprocess import Preprocess
from ..utils import hash_file


@dataclass
class Teacher:
    model: nn.Module  # in eval mode, on the training device, channels-last
    info: ModelInfo
    preprocess: Preprocess  # the teacher's own normalization, on the training device
    record: dict  # what the student's model file says about it (ModelInfo.distillation)
    cached: torch.Tensor | None = None  # (N, K) float32 logits of every training image, when the images never change

    @classmethod
    def load(cls, path: str, ds: Dataset, device: torch.device, alpha: float, temperature: float) -> "Teacher":
        """The teacher at `path` (run folder or model file), checked by check_teacher."""
        file, info = check_teacher(path, ds)
        model, info = load_model(file, device, info)
        model = model.to(memory_format=torch.channels_last).requires_grad_(False)
        record = {"teacher": str(file.resolve()), "sha256": hash_file(file, "sha256"), "architecture": info.name,
                  "input": [info.input.channels, info.input.height, info.input.width],
                  "test_accuracy": info.metrics.get("test_accuracy"), "alpha": alpha, "temperature": temperature}
        return cls(model, info, Preprocess.from_info(info, channels_last=True).to(device), record)

    def describe(self) -> str:
        acc = self.record["test_accuracy"]
        return (f"{self.info.name} from {self.record['teacher']}{f' (test accuracy {acc:.4f})' if acc else ''}, "
                f"input {'x'.join(map(str, self.record['input']))}, alpha {self.record['alpha']:g}, "
                f"temperature {self.record['temperature']:g}")

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor, precision: str) -> torch.Tensor:
        """batch: (B, C, H, W) uint8 or float 0..255 at the student's size -> the teacher's class logits
        (B, K) float32."""
        x = to_input(batch.float(), tuple(self.record["input"]))
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = self.model(self.preprocess(x).contiguous(memory_format=torch.channels_last))
        return class_logits(logits.float(), self.info.task)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor, precision: str) -> float:
        """The teacher's accuracy on images (N, C, H, W) uint8 at the student's input, as it sees them in
        training: a teacher with a larger input sees upsampled pixels, and may decide worse than its
        own test accuracy says (multi-label: every label right)."""
        device = self.preprocess.scale.device
        right = 0
        for i in range(0, len(labels), INFERENCE_BATCH):
            logits = self(images[i:i + INFERENCE_BATCH].to(device), precision)
            y = labels[i:i + INFERENCE_BATCH].to(device)
            right += int((((logits > 0) == (y > 0.5)).all(1) if self.info.task == "multi-label"
                          else logits.argmax(1) == y).sum())
        return right / max(1, len(labels))

    def cache(self, images: torch.Tensor, precision: str) -> torch.Tensor:
        """(N, K) logits of every training image (N, C, H, W) uint8, once."""
        if self.cached is None:
            device = self.preprocess.scale.device
            self.cached = torch.cat([self(images[i:i + INFERENCE_BATCH].to(device), precision)
                                     for i in range(0, len(images), INFERENCE_BATCH)])
        return self.cached


def check_teacher(path: str, ds: Dataset) -> tuple[Path, ModelInfo]:
    """(model file, its metadata) of the teacher at `path`, refused in one line unless it decides the
    data's classes, in the same order, for the same task. Reads the metadata only."""
    file = resolve_model_path(path)
    info = read_info(file)
    if info.class_names != ds.class_names:
        raise CnnkitError(f"--teacher {path} was trained on the classes {', '.join(info.class_names[:6])}"
                          f"{' ...' if len(info.class_names) > 6 else ''}; the data's are "
                          f"{', '.join(ds.class_names[:6])}{' ...' if ds.num_classes > 6 else ''}: a teacher must "
                          "decide the same classes in the same order")
    if info.task != ds.task:
        raise CnnkitError(f"--teacher {path} is a {info.task} model and this run is {ds.task}: give a teacher "
                          "trained for the same task (--task)")
    return file, info


def to_input(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, H, W) float 0..255 -> the teacher's (B, C', H', W'): grey made RGB by repetition, RGB made
    grey by luma (ITU-R 601, as the decoder's 'L'), and resized bilinearly (antialiased when shrinking)."""
    c, h, w = shape
    if x.shape[1] != c:
        x = x.repeat(1, 3, 1, 1) if c == 3 else (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True)
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=h < x.shape[2])
    return x


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, task: str) -> torch.Tensor:
    """The distillation loss, scaled by T^2 so its gradients keep their size as T changes (Hinton et al.).
    student, teacher: (B, K) class logits (a binary model's from inference.class_logits). Multi-label:
    each label's sigmoid is a two-class distribution, so the loss is the binary cross-entropy to the
    teacher's softened probabilities less their entropy (the per-label KL), averaged over labels."""
    t = temperature
    if task == "multi-label":
        p = torch.sigmoid(teacher / t)
        kl = (F.binary_cross_entropy_with_logits(student / t, p, reduction="none")
              - F.binary_cross_entropy_with_logits(teacher / t, p, reduction="none"))
        return kl.mean() * t * t
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                    reduction="batchmean") * t * t
