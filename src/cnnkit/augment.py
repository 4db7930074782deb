"""Augmentation on whole batches: uint8 images (N, C, H, W) in, float32 (N, C, H, W) in 0..255 out,
on the device that trains, between the batch gather and preprocessing. Every random choice is drawn
per image from an explicit torch.Generator, so a fixed seed augments the same batch the same way
(and a resumed run augments its epochs as an uninterrupted one did).

Geometric:   shift (the notes' width/height_shift_range, edges replicated), horizontal and vertical
             flip, rotation, scale, shear (one affine warp), perspective, cutout.
Photometric: brightness, contrast, saturation, gaussian noise, gaussian blur.
After all:   random erasing (BatchAugment.erasing). RandAugment and TrivialAugment: augment_policy.py.

Written with plain torch ops rather than kornia: on 2 CPU cores a batch of 128 CIFAR images ran
faster this way for each op measured in benchmarks/data/augment_speed.py (NOTES.md, "augmentation"):
integer shifts and flips are index gathers on uint8 with no warp at all, and the affine ops are
composed into a single grid_sample. Whether a flip keeps the class is the dataset's fact
(cnnkit.data.hflip_keeps_class): digits are never mirrored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import PRESETS, AugmentConfig

__all__ = ["PRESETS", "Augment", "AugmentConfig", "BatchAugment", "parse_class_presets", "random_erasing"]


# The strengths, presets and their description live with the configs (config.AugmentConfig), so the
# training config can declare its aug_<op> fields from them without importing torch.
@dataclass(frozen=True)
class Augment(AugmentConfig):
    """AugmentConfig's strengths, applied: an Augment is called on a batch."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x: (N, C, H, W) uint8 (or float 0..255) -> (N, C, H, W) float32 in 0..255."""
        n, c, h, w = x.shape
        device = x.device

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:  # drawn on the CPU: reproducible everywhere
            return (torch.rand(n, *shape, generator=generator) * (high - low) + low).to(device)

        def coin(p: float) -> torch.Tensor:
            return (torch.rand(n, generator=generator) < p).to(device)

        if self.shift > 0:
            x = shift(x, max(1, round(self.shift * h)), max(1, round(self.shift * w)), generator)
        if self.hflip > 0:
            x = torch.where(coin(self.hflip).view(-1, 1, 1, 1), x.flip(3), x)
        if self.vflip > 0:
            x = torch.where(coin(self.vflip).view(-1, 1, 1, 1), x.flip(2), x)
        x = x.float()
        if self.rotate > 0 or self.scale > 0 or self.shear > 0:
            angle = uniform(-self.rotate, self.rotate) if self.rotate > 0 else torch.zeros(n, device=device)
            zoom = uniform(1 - self.scale, 1 + self.scale) if self.scale > 0 else torch.ones(n, device=device)
            sh = uniform(-self.shear, self.shear) if self.shear > 0 else torch.zeros(n, device=device)
            x = warp(x, affine_grid(angle, zoom, sh, (h, w)))
        if self.perspective > 0:
            x = warp(x, perspective_grid(uniform(-self.perspective, self.perspective, 4, 2), (h, w)))
        if self.brightness > 0:
            x = x * uniform(1 - self.brightness, 1 + self.brightness).view(-1, 1, 1, 1)
        if self.contrast > 0:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * uniform(1 - self.contrast, 1 + self.contrast).view(-1, 1, 1, 1) + mean
        if self.saturation > 0 and c == 3:
            grey = (x * torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            x = (x - grey) * uniform(1 - self.saturation, 1 + self.saturation).view(-1, 1, 1, 1) + grey
        if self.blur > 0:
            x = blur(x, uniform(0.0, self.blur))
        if self.noise > 0:
            x = x + torch.randn(x.shape, generator=generator).to(device) * self.noise
        if self.cutout > 0:
            x = cutout(x, max(1, round(self.cutout * min(h, w))), generator)
        return x.clamp_(0, 255)


# ----------------------------------------------------------------------------- the ops
def shift(x: torch.Tensor, max_dy: int, max_dx: int, generator: torch.Generator) -> torch.Tensor:
    """Move each image by whole pixels, dy in [-max_dy, max_dy] and dx likewise, replicating the edge
    pixels into the uncovered border (Keras' fill_mode='nearest', the notes' default). A gather of
    clamped row and column indices: no padding copy, exact on uint8."""
    n, _, h, w = x.shape
    dy = torch.randint(-max_dy, max_dy + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (n,), generator=generator).to(x.device)
    return translate(x, dy, dx)


def translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Image i's content moved down by dy[i] and right by dx[i] pixels, edges replicated."""
    n, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device).view(1, h) - dy.view(n, 1)).clamp_(0, h - 1)  # (N, H) source rows
    cols = (torch.arange(w, device=x.device).view(1, w) - dx.view(n, 1)).clamp_(0, w - 1)  # (N, W)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return x.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)  # (N, C, H, W)


def affine_grid(angle_degrees: torch.Tensor, zoom: torch.Tensor, shear_degrees: torch.Tensor,
                size: tuple[int, int]) -> torch.Tensor:
    """Sampling grid (N, H, W, 2) for a rotation (counter-clockwise, degrees), zoom (>1 enlarges) and
    horizontal shear about the image centre, as one matrix per image."""
    a, s = torch.deg2rad(angle_degrees), torch.tan(torch.deg2rad(shear_degrees))
    cos, sin = torch.cos(a), torch.sin(a)
    # output -> input coordinates (normalised, y down): inverse rotation, then inverse shear and zoom
    m = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (N, 2, 2)
    shear = torch.zeros_like(m)
    shear[:, 0, 0], shear[:, 0, 1], shear[:, 1, 1] = 1, -s, 1
    m = (shear @ m) / zoom.view(-1, 1, 1)
    theta = torch.cat([m, torch.zeros(len(m), 2, 1, device=m.device)], dim=2)  # (N, 2, 3)
    h, w = size
    if h != w:  # normalised coordinates stretch a non-square image: rotate in pixel units instead
        aspect = torch.tensor([[1.0, w / h], [h / w, 1.0]], device=m.device)
        theta[:, :, :2] = theta[:, :, :2] * aspect
    return F.affine_grid(theta, [len(m), 1, h, w], align_corners=False)


def perspective_grid(corners: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sampling grid (N, H, W, 2) of the homography taking the image's corners to corners moved by
    `corners` (N, 4, 2), in fractions of the side (normalised units are twice that)."""
    n = len(corners)
    src = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], device=corners.device).expand(n, 4, 2)
    dst = src + 2 * corners
    # Solve for H (8 unknowns) mapping output corners (src) to input points (dst): dst ~ H src
    x, y, u, v = src[..., 0], src[..., 1], dst[..., 0], dst[..., 1]
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    a = torch.cat([rows_u, rows_v], 1)  # (N, 8, 8)
    b = torch.cat([u, v], 1)  # (N, 8)
    hom = torch.cat([torch.linalg.solve(a, b), torch.ones(n, 1, device=corners.device)], 1).view(n, 3, 3)
    h, w = size
    ys = (torch.arange(h, device=corners.device) * 2 + 1) / h - 1  # pixel centres, align_corners=False
    xs = (torch.arange(w, device=corners.device) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, h * w, 3)  # (1, HW, 3)
    mapped = pts @ hom.transpose(1, 2)  # (N, HW, 3)
    return (mapped[..., :2] / mapped[..., 2:]).view(n, h, w, 2)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of float images at grid (N, H, W, 2); outside the image, the edge pixel."""
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable gaussian blur, each image with its own sigma (N,) in pixels (0: unchanged)."""
    n, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-offsets.view(1, -1) ** 2 / (2 * sigma.clamp_min(1e-3).view(-1, 1) ** 2))  # (N, K)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, K): one per image and channel
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


def cutout(x: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    """Erase one side x side square per image (its centre anywhere in the image, so it may be cut
    by the border) to mid-grey, 128 (DeVries & Taylor 2017)."""
    n, _, h, w = x.shape
    top = torch.randint(0, h, (n, 1), generator=generator).to(x.device) - side // 2  # (N, 1): first row
    left = torch.randint(0, w, (n, 1), generator=generator).to(x.device) - side // 2
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    inside_r = ((rows >= top) & (rows < top + side)).view(n, 1, h, 1)
    inside_c = ((cols >= left) & (cols < left + side)).view(n, 1, 1, w)
    return torch.where(inside_r & inside_c, torch.full_like(x, 128.0), x)


def random_erasing(x: torch.Tensor, p: float, generator: torch.Generator, attempts: int = 10) -> torch.Tensor:
    """With probability p an image gets one rectangle of 2-33% of its area, aspect (h / w) 0.3-3.3
    (log-uniform), filled with per-pixel noise: timm's RandomErasing mode 'pixel', whose N(0, 1) in
    normalised units is here N(128, 64^2) levels, clamped to 0..255 (erasing runs before preprocessing).
    As timm, up to `attempts` draws per image for a rectangle that fits; none fitting: not erased.
    x: (N, C, H, W) float 0..255."""
    n, c, h, w = x.shape
    area = (torch.rand(n, attempts, generator=generator) * (1 / 3 - 0.02) + 0.02) * (h * w)  # (N, attempts) pixels
    aspect = torch.exp(torch.rand(n, attempts, generator=generator) * (2 * math.log(1 / 0.3)) + math.log(0.3))
    rh, rw = torch.round(torch.sqrt(area * aspect)).long(), torch.round(torch.sqrt(area / aspect)).long()
    fits = (rh < h) & (rw < w) & (rh > 0) & (rw > 0)
    first = fits.long().argmax(1, keepdim=True)  # (N, 1): the first attempt that fits
    rh, rw = rh.gather(1, first)[:, 0], rw.gather(1, first)[:, 0]
    top = (torch.rand(n, generator=generator) * (h - rh + 1)).long()  # 0..h - rh, as randint(0, h - rh)
    left = (torch.rand(n, generator=generator) * (w - rw + 1)).long()
    erase = (torch.rand(n, generator=generator) < p) & fits.any(1)
    idx = erase.nonzero()[:, 0]
    if not len(idx):
        return x
    noise = (torch.randn(len(idx), c, h, w, generator=generator) * 64 + 128).clamp_(0, 255).to(x.device, x.dtype)
    rows, cols = torch.arange(h).view(1, h), torch.arange(w).view(1, w)
    inside_r = ((rows >= top[idx, None]) & (rows < (top + rh)[idx, None])).view(-1, 1, h, 1)
    inside_c = ((cols >= left[idx, None]) & (cols < (left + rw)[idx, None])).view(-1, 1, 1, w)
    out = x.clone()
    out[idx.to(x.device)] = torch.where((inside_r & inside_c).to(x.device), noise, x[idx.to(x.device)])
    return out


# ----------------------------------------------------------------------------- per-class augmentation
@dataclass(frozen=True)
class BatchAugment:
    """The augmentation of a training batch: `default` for every image, except the classes in
    `per_class` (class index -> its own Augment), e.g. a rare class augmented harder, as the notes
    suggest for imbalanced data. Each group of images is augmented as one batch; labels and order
    are kept. Then random erasing, with probability `erasing` per image, whatever augmented it."""
    default: Augment  # or an augment_policy.Policy (RandAugment, TrivialAugment): called alike
    per_class: tuple[tuple[int, Augment], ...] = ()
    erasing: float = 0.0

    @property
    def active(self) -> bool:
        return self.default.active or any(a.active for _, a in self.per_class) or self.erasing > 0

    def describe(self, class_names: list[str]) -> str:
        """"shift 0.1, hflip 0.5; bees: strong ...; random erasing 0.25": the log's and preview's words."""
        text = self.default.describe() + "".join(f"; {class_names[c]}: {a.describe()}" for c, a in self.per_class)
        if self.erasing <= 0:
            return text
        return f"random erasing {self.erasing:g}" if text == "none" else f"{text}; random erasing {self.erasing:g}"

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = self.default(x, generator) if not self.per_class else self.by_class(x, labels, generator)
        return random_erasing(out, self.erasing, generator) if self.erasing > 0 else out

    def by_class(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        special = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for cls, aug in self.per_class:
            idx = (labels == cls).nonzero()[:, 0]
            special[idx] = True
            if len(idx):
                out[idx] = aug(x[idx], generator)
        idx = (~special).nonzero()[:, 0]
        if len(idx):
            out[idx] = self.default(x[idx], generator)
        return out


def parse_class_presets(text: str | None, class_names: list[str],
                        flips_allowed: bool) -> tuple[tuple[int, Augment], ...]:
    """"bees=strong,ants=light" -> ((class index, Augment), ...), refusing unknown classes and presets."""
    if not text:
        return ()
    out = []
    for item in text.split(","):
        name, sep, preset = item.strip().rpartition("=")
        if not sep or not name:
            raise ValueError(f"--augment-class takes NAME=PRESET pairs separated by commas, not {item.strip()!r}")
        if name not in class_names:
            raise ValueError(f"--augment-class names {name!r}, which is not a class of the data "
                             f"({', '.join(class_names[:10])}{' ...' if len(class_names) > 10 else ''})")
        out.append((class_names.index(name), Augment.preset(preset.strip(), flips_allowed)))
    return tuple(out)
