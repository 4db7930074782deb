"""The optimizer and what moves it: transfer phases' trainable parameters, per-group learning
rates, the learning-rate schedules, and the two weight averages (EMA and airbench's Lookahead).

    set_phase(model, phase)             which parameters train ('frozen': the head only)
    make_optimizer(cfg, model, phase)   Adam / AdamW / Nesterov SGD, fused where torch has the kernel
    lr_at(step, total, warmup, peak, schedule)
    update_ema / lookahead_step         the weight averages, on every float tensor at once (_foreach)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import TrainConfig


def set_phase(model: nn.Module, phase: str) -> None:
    """'frozen': only the classifier head trains; 'all': everything trains.

    BatchNorm layers stay in inference mode in both transfer phases (EpochSettings.frozen_bn): their
    ImageNet statistics describe the backbone's features better than a few small batches of a new
    dataset would, and updating them while fine-tuning is a known way to wreck pretrained features."""
    head = {id(p) for p in model.head.parameters()}
    for p in model.parameters():
        p.requires_grad_(phase == "all" or id(p) in head)


def param_groups(cfg: TrainConfig, model: nn.Module, phase: str) -> list[dict]:
    """One group normally; in the fine-tuning phase the head at lr x factor and the backbone 10x slower."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if phase != "fine-tune":
        if cfg.bias_lr_factor == 1:
            return [{"params": trainable}]
        # airbench's bias scaler: BatchNorm shifts learn faster, decaying by the same amount per step
        return [{"params": [p for p in trainable if p.ndim > 1]},
                {"params": [p for p in trainable if p.ndim <= 1], "lr_scale": cfg.bias_lr_factor,
                 "weight_decay": cfg.weight_decay / cfg.bias_lr_factor}]
    head = {id(p) for p in model.head.parameters()}
    return [{"params": [p for p in trainable if id(p) in head], "lr_scale": cfg.fine_tune_lr_factor},
            {"params": [p for p in trainable if id(p) not in head], "lr_scale": cfg.fine_tune_lr_factor * 0.1}]


def make_optimizer(cfg: TrainConfig, model: nn.Module, phase: str = "train") -> torch.optim.Optimizer:
    """Adam, AdamW or Nesterov SGD, fused into one kernel where torch supports it: on 2 CPU cores
    the per-tensor Adam took 10% of a seed-mnist-torch step, and fused Adam made the step 1.3x
    faster (benchmarks/NOTES.md)."""
    params = param_groups(cfg, model, phase)
    if cfg.optimizer in ("adam", "adamw"):
        kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        make = lambda **kw: kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)  # noqa: E731
    else:  # sgd (TrainConfig.validate admits no other)
        make = lambda **kw: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,  # noqa: E731
                                            nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay, **kw)
    try:
        return make(fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return make()


ONECYCLE_START, ONECYCLE_END = 1 / 25, 1 / 25e4  # PyTorch OneCycleLR's div_factor and final_div_factor


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str) -> float:
    """The learning rate at `step` (0-based) of `total_steps`: warmup to peak, then
    linear: linear decay to 0; cosine: cosine decay to 0; constant: peak; onecycle (Smith 2018, as
    PyTorch's OneCycleLR): a cosine rise from peak/25 over the warmup and a cosine fall to peak/25e4."""
    if schedule == "onecycle":
        if step < warmup_steps:
            t = (step + 1) / warmup_steps
            return peak * (ONECYCLE_START + (1 - ONECYCLE_START) * (1 - math.cos(math.pi * t)) / 2)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return peak * (ONECYCLE_END + (1 - ONECYCLE_END) * (1 + math.cos(math.pi * t)) / 2)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 0 after warmup .. 1 at the end
    if schedule == "cosine":
        return peak * (1 + math.cos(math.pi * min(t, 1.0))) / 2
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@torch.no_grad()
def lookahead_step(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Lookahead (Zhang et al. 2019) as airbench uses it: ema <- decay * ema + (1 - decay) * model,
    then model <- ema, for every float tensor."""
    floats = [(e, m) for e, m in zip(ema.state_dict().values(), model.state_dict().values()) if e.is_floating_point()]
    torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1 - decay)
    torch._foreach_copy_([m for _, m in floats], [e for e, _ in floats])


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- decay * ema + (1 - decay) * model for every float tensor (parameters and BatchNorm
    statistics), with TensorFlow's warm-up (decay at most (1 + step) / (10 + step)), so the first
    steps are not averaged with the random initialisation."""
    d = min(decay, (1 + step) / (10 + step))
    pairs = [(e, m) for e, m in zip(ema.state_dict().values(), model.state_dict().values())]
    floats = [(e, m) for e, m in pairs if e.is_floating_point()]
    torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1 - d)
    for e, m in pairs:
        if not e.is_floating_point():
            e.copy_(m)
