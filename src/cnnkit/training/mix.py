"""MixUp and CutMix: a training batch mixed with a shuffled copy of itself, and the loss mixed alike.

    Mix                 the settings (--mixup, --cutmix, --mix-prob, --mix-switch-prob) and the draw
    Mixed               one batch's draw: the partner order, the first images' weight, which kind
    Mixed.loss(...)     lam * loss(logits, y) + (1 - lam) * loss(logits, y[partner])

Label-aware through the loss rather than through one-hot targets: every loss cnnkit trains with
(cross-entropy with label smoothing and class weights, the binary logit's and the multi-label
sigmoids' binary cross-entropy) is linear in its target, so mixing two losses by lam is mixing their
targets by lam, exactly, with each task's own smoothing and weighting kept. One lam per batch, as
timm's default batch mode (and fastai's): the batch then stays one tensor op.

MixUp's weight is max(lam, 1 - lam) as fastai draws it, so each image stays mostly itself and
alpha -> 0 is the identity (lam -> 1), not a coin flip between two images. CutMix's weight is
1 minus the pasted rectangle's area fraction after clipping it to the image: exactly what was pasted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Mixed:
    """One batch's mixing: image i is mixed with image partner[i]; the images keep weight lam."""
    partner: torch.Tensor  # (B,) int64 on the batch's device
    lam: float  # weight of each image's own label (MixUp: of its pixels; CutMix: 1 - the pasted area fraction)
    kind: str  # 'mixup' | 'cutmix'

    def loss(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """loss_fn(targets) -> the batch's mean loss; mixed: lam of the images' own, the rest of their partners'."""
        return self.lam * loss_fn(y) + (1 - self.lam) * loss_fn(y[self.partner])


@dataclass(frozen=True)
class Mix:
    mixup: float = 0.0  # MixUp's Beta alpha; 0: off
    cutmix: float = 0.0  # CutMix's Beta alpha; 0: off
    prob: float = 1.0  # probability that a batch is mixed
    switch_prob: float = 0.5  # with both: probability of CutMix for a mixed batch

    @property
    def active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.prob > 0

    def describe(self) -> str:
        parts = ([f"mixup alpha {self.mixup:g}"] * (self.mixup > 0)
                 + [f"cutmix alpha {self.cutmix:g}"] * (self.cutmix > 0))
        if self.mixup > 0 and self.cutmix > 0:
            parts.append(f"cutmix for {self.switch_prob:.0%} of mixed batches")
        return ", ".join(parts) + (f", {self.prob:.0%} of batches" if self.prob < 1 else "")

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, Mixed | None]:
        """x: (B, C, H, W) uint8 or float 0..255 -> (the mixed batch, float32 for MixUp, or x; the draw or None).

        Every draw comes from `generator` on the CPU, so a seed mixes the same way on any device."""
        if float(torch.rand((), generator=generator)) >= self.prob:
            return x, None
        use_cutmix = self.cutmix > 0 and (self.mixup == 0
                                          or float(torch.rand((), generator=generator)) < self.switch_prob)
        partner = torch.randperm(len(x), generator=generator).to(x.device)
        if use_cutmix:
            return cutmix(x, partner, beta(self.cutmix, generator), generator)
        lam = beta(self.mixup, generator)
        lam = max(lam, 1 - lam)
        mixed = x.float() * lam + x[partner].float() * (1 - lam)  # (B, C, H, W) float32 0..255
        return mixed, Mixed(partner, lam, "mixup")


def beta(alpha: float, generator: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha) from `generator` (torch.distributions takes none): X / (X + Y)
    for X, Y ~ Gamma(alpha), each drawn in log space as log Gamma(alpha + 1) + log(U) / alpha
    (Marsaglia and Tsang's boost), so a tiny alpha gives 0 or 1 instead of two underflowed zeros."""
    a = torch.full((2,), float(alpha), dtype=torch.float64)
    log_g = torch._standard_gamma(a + 1, generator=generator).log() + torch.rand(2, generator=generator,
                                                                                dtype=torch.float64).log() / a
    return float(torch.sigmoid(log_g[0] - log_g[1]))


def cutmix(x: torch.Tensor, partner: torch.Tensor, lam: float, generator: torch.Generator
           ) -> tuple[torch.Tensor, Mixed]:
    """Paste one rectangle of each image's partner into it (the same box for the whole batch, timm's
    batch mode): sides sqrt(1 - lam) of the image's, centred anywhere, clipped by the border. The
    label weight is 1 - the clipped box's area / the image's: the pasted pixels, exactly."""
    _, _, h, w = x.shape
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = int(torch.randint(0, h, (), generator=generator)), int(torch.randint(0, w, (), generator=generator))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    out = x.clone()
    out[:, :, top:bottom, left:right] = x[partner, :, top:bottom, left:right]
    pasted = (bottom - top) * (right - left) / (h * w)
    return out, Mixed(partner, 1.0 - pasted, "cutmix")
