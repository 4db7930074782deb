"""One pass over the training images: batches gathered by index, augmented, preprocessed as whole
batches, and one optimizer step each. No per-sample Python runs here.

    EpochSettings        what an epoch does besides model and optimizer (batch, lr, precision, loss, hooks)
    run_epoch(...)       (summed loss, correct, seen, last lr)
    NonFinite            raised at the first non-finite loss; the epoch loop turns it into TrainingDiverged
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..augment import BatchAugment
from ..distributed import World
from ..inference import class_logits
from ..modelfile import non_finite
from ..models.base import unwrap
from ..preprocess import Preprocess
from .distill import Teacher, soft_loss
from .mix import Mix, Mixed

PROGRESS_EVERY = 20  # steps between reads of the loss (.item() syncs a GPU): the bar and the GPU's finite check


@dataclass(frozen=True)
class EpochSettings:
    """Everything one epoch needs besides the model, the optimizer and the images."""
    batch_size: int  # images per optimizer step; in a torchrun job the global batch, each process training a shard
    lr_fn: Callable[[int], float]  # the step's index in this epoch (0-based) -> learning rate
    preprocess: Preprocess  # uint8 or 0..255 float batches -> normalized float32, on the training device
    precision: str = "fp32"  # 'bf16': the forward pass under bf16 autocast; 'fp32': none
    label_smoothing: float = 0.0  # cross-entropy label smoothing, 0..1
    task: str = "single-label"  # single-label: softmax, cross-entropy | multi-label: labels (N, K) of 0/1, one
                                # sigmoid per label, binary cross-entropy | binary: labels (N,) of 0/1, one logit
    frozen_bn: bool = False  # BatchNorm layers keep their statistics (transfer learning: training.optim.set_phase)
    augment: BatchAugment | None = None  # applied to every batch, drawing from `generator`; None: no augmentation
    generator: torch.Generator | None = None  # the augmentation's random draws (seeded per epoch)
    mix: Mix | None = None  # MixUp / CutMix after the augmentation, drawing from mix_generator; None: off
    mix_generator: torch.Generator | None = None  # the mixing's random draws (seeded per epoch)
    teacher: Teacher | None = None  # distillation: the teacher whose soft targets join the loss; None: off
    teacher_logits: torch.Tensor | None = None  # (N, K) the teacher's logits of every training image, where
                                                # nothing augments or mixes this epoch (else computed per batch)
    kd_alpha: float = 0.0  # weight of the distillation loss; the labels' loss weighs 1 - kd_alpha
    kd_temperature: float = 1.0  # both models' logits are divided by it in the distillation loss
    class_weight: torch.Tensor | None = None  # (K,) loss weight of each class (balance: weights); None: equal
    pos_weight: torch.Tensor | None = None  # multi-label: (K,) weight of each label's positives (--pos-weight)
    grad_clip: float = 0.0  # largest global gradient norm before each step; 0: no clipping
    after_step: Callable[[], None] | None = None  # called after every optimizer step (the weight average)
    on_step: Callable[[int, dict], None] | None = None  # (step index in this epoch, {"loss", "accuracy", "lr"} of
                                                        # its batch): the trackers' hook (callbacks.py), called
                                                        # every step on a CPU, every PROGRESS_EVERY on a GPU
    world: World = World()  # this process in a torchrun job; sums returned are over all processes
    seen_indices: list[torch.Tensor] | None = None  # a list: each batch's indices are appended (CNNKIT_RECORD_SHARDS)


class NonFinite(Exception):
    """Raised inside an epoch at the first non-finite loss; the epoch loop turns it into TrainingDiverged."""

    def __init__(self, step: int, steps: int, what: str):
        super().__init__(what)
        self.step, self.steps, self.what = step, steps, what


def run_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
              perm: torch.Tensor, settings: EpochSettings, bar=None) -> tuple[float, int, int, float]:
    """One pass over images[perm] in batches of settings.batch_size; returns (summed loss, correct,
    seen, last lr).

    images: (N, C, H, W) uint8, on the training device, the CPU, or on disk (data.DiskImages): each
    batch is gathered by index and moved to labels' device. labels: (N,) int64. perm: the order, (N,).
    bar: a progress bar advanced once per step, or None."""
    s = settings
    train_mode(model, s.frozen_bn)
    device = labels.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, lr = 0, 0.0
    first_bad: NonFinite | None = None
    steps = math.ceil(len(perm) / s.batch_size)
    for i in range(steps):
        lr = s.lr_fn(i)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # fine-tuning: backbone slower than the head
        idx = distributed.shard(perm[i * s.batch_size:(i + 1) * s.batch_size], s.world)
        y = labels[idx]  # (B,), or this process's B / world.size
        if s.seen_indices is not None:
            s.seen_indices.append(idx)
        logits, loss = batch_forward(model, images[idx].to(device, non_blocking=True), y, idx, s)
        if device.type == "cpu" or i % PROGRESS_EVERY == 0 or i == steps - 1:
            first_bad = check_loss(loss, i, steps, s.world, first_bad)
        optimizer_step(optimizer, loss, s)
        if s.after_step is not None:
            s.after_step()
        loss_sum += loss.detach() * len(y)
        right = batch_correct(logits, y, s.task)
        correct += right
        seen += len(y)
        if s.on_step is not None and (device.type == "cpu" or i % PROGRESS_EVERY == 0 or i == steps - 1):
            s.on_step(i, {"loss": loss.item(), "accuracy": right.item() / len(y), "lr": lr})
        if bar is not None:
            bar.update(1)
            if i % PROGRESS_EVERY == 0 or i == steps - 1:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
    if s.world.active:
        total, right, count = distributed.sum_over_ranks(loss_sum.item(), correct.item(), seen)
        return total, int(right), int(count), lr
    return loss_sum.item(), int(correct.item()), seen, lr


def train_mode(model: nn.Module, frozen_bn: bool) -> None:
    """Training mode; frozen_bn (transfer learning): BatchNorm layers keep their pretrained statistics
    (see optim.set_phase). run_epoch and the lr finder both set it here."""
    model.train()
    if frozen_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def batch_forward(model: nn.Module, batch: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, s: EpochSettings
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch (B, C, H, W) uint8 (the images at idx, labels y) through the augmentation,
    the mixing, the teacher, preprocessing and the model: (logits (B, K) or (B, 1), the loss).
    run_epoch and the lr finder (lr_find.py) both step through here."""
    if s.augment is not None:
        batch = s.augment(batch, y, s.generator)  # (B, C, H, W) float32 in 0..255
    mixed = None
    if s.mix is not None:
        batch, mixed = s.mix(batch, s.mix_generator)  # the same shape; MixUp: float32 in 0..255
    teacher = None
    if s.teacher is not None:  # (B, K): on the very pixels the student sees
        teacher = s.teacher_logits[idx] if s.teacher_logits is not None else s.teacher(batch, s.precision)
    x = s.preprocess(batch)  # (B, C, H, W) float32, normalized
    with torch.autocast(y.device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16"):
        logits = model(x)  # (B, K); binary: (B, 1)
        return logits, training_loss(logits.float(), y, s, mixed, teacher)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, s: EpochSettings) -> None:
    """Backward, the optional gradient clipping, and the optimizer's step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if s.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], s.grad_clip)
    optimizer.step()


def training_loss(logits: torch.Tensor, y: torch.Tensor, s: EpochSettings, mixed: Mixed | None,
                  teacher: torch.Tensor | None) -> torch.Tensor:
    """The loss a step descends: the labels' (mixed by MixUp / CutMix's weight where the batch was
    mixed), and with a teacher (1 - alpha) of it plus alpha of the distillation loss. The teacher's
    term is computed even at alpha 0, where it adds exactly 0: plain training, bit for bit."""
    loss = mixed.loss(lambda t: batch_loss(logits, t, s), y) if mixed is not None else batch_loss(logits, y, s)
    if teacher is None:
        return loss
    soft = soft_loss(class_logits(logits, s.task), teacher, s.kd_temperature, s.task)
    return (1 - s.kd_alpha) * loss + s.kd_alpha * soft


def batch_loss(logits: torch.Tensor, y: torch.Tensor, s: EpochSettings) -> torch.Tensor:
    """The batch's mean loss. A binary model's one logit z stands for the two-class logits (0, z):
    its binary cross-entropy with smoothed targets (1 - e) y + e / 2 is then exactly the two-class
    cross-entropy with label smoothing e, and with class weights it is written as cross_entropy weighs."""
    if s.task == "multi-label":
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=s.pos_weight)
    if s.task == "binary":
        z, e = logits[:, 0], s.label_smoothing
        if s.class_weight is None:
            return F.binary_cross_entropy_with_logits(z, y.float() * (1 - e) + e / 2)
        # cross_entropy's weighted form: the true class's term weighs w[y], the smoothing term each
        # class's own weight, and the sum is divided by the sum of w[y]
        w, log_p1, log_p0 = s.class_weight, F.logsigmoid(z), F.logsigmoid(-z)
        nll = -torch.where(y == 1, log_p1, log_p0)
        smooth = -(w[0] * log_p0 + w[1] * log_p1) / 2
        return ((1 - e) * w[y] * nll + e * smooth).sum() / w[y].sum()
    return F.cross_entropy(logits, y, weight=s.class_weight, label_smoothing=s.label_smoothing)


def batch_correct(logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Right answers in the batch at probability 0.5; a multi-label image is right when every label is
    (subset accuracy)."""
    if task == "multi-label":
        return ((logits > 0) == (y > 0.5)).all(1).sum()
    if task == "binary":
        return ((logits[:, 0] > 0) == (y == 1)).sum()
    return (logits.argmax(1) == y).sum()


def check_loss(loss: torch.Tensor, i: int, steps: int, world: World, first_bad: NonFinite | None) -> NonFinite | None:
    """Stop a diverging run (too high a learning rate, an overflow) at its first non-finite loss.

    .item() syncs a GPU, so there the caller checks at the progress bar's pace. In a torchrun job each
    process sees its own shard's loss: the one that sees it first takes one more step, whose
    all-reduced gradients make every process's weights (and next loss) non-finite, so all of them
    stop at the same step instead of one waiting for the others. Returns the pending failure."""
    if math.isfinite(loss.item()):
        return first_bad
    if not world.active or first_bad is not None:
        raise first_bad or NonFinite(i + 1, steps, f"the loss became {loss.item()}")
    return NonFinite(i + 1, steps, f"the loss became {loss.item()}")


def non_finite_tensors(*modules: nn.Module | None) -> list[str]:
    """Names of the floating-point tensors (parameters and buffers) holding a nan or an inf."""
    return [k for m in modules if m is not None for k in non_finite(unwrap(m).state_dict())]
