"""RandAugment (Cubuk et al. 2019) and TrivialAugmentWide (Müller & Hutter 2021) on whole batches, in
augment.py's style: float32 images (N, C, H, W) in 0..255, every choice drawn per image from the explicit
generator on the CPU (so a seed reproduces on any device), each op computed once on the images that drew
it (the warps together, the translations together): a loop over the ops, never over images.

The op list and magnitude ranges are torchvision's (transforms.autoaugment), on its 31 bins (level 0..30):

    op            RandAugment at level 30    TrivialAugmentWide at 30   sign
    identity      -                          -
    shear_x, _y   factor 0.3 (16.7 degrees)  0.99 (44.7 degrees)        random
    translate_x,y 150/331 of the side        32 px                      random
    rotate        30 degrees                 135 degrees                random
    brightness, color (saturation), contrast, sharpness
                  factor 1 +- 0.9            1 +- 0.99                  random
    posterize     8 -> 4 bits                8 -> 2 bits
    solarize      threshold 256 -> 0         256 -> 0
    autocontrast, equalize: no magnitude (the same whatever the level)

Every op with a magnitude is the identity at level 0, exactly. Three departures from torchvision, each
said where it is made: the warps are bilinear (torchvision's default here is nearest) about the image
centre (torchvision shears about the top-left corner, a shear plus a shift); solarize's threshold runs
from 256 (timm's range), not 255, so that level 0 leaves white pixels white; and the pipeline stays in
float rather than rounding to uint8 after each op (posterize and equalize round first: they need levels).
Uncovered pixels of a warp or shift are 0, torchvision's fill. Colour on a grey image is the identity.

Checked against references in tests/test_augment.py: equalize, posterize and solarize equal PIL.ImageOps'
levels on CIFAR-10 photos, autocontrast within 1 level, the enhancements (brightness, color, contrast,
sharpness) PIL.ImageEnhance within 1.5, rotate and shear PIL's bilinear warps within 1 level.
Speed against kornia.augmentation.auto, `python -m benchmarks.data.augment_speed --threads 1 --repeats 7`
(batch 128 x 3 x 32 x 32, medians; a 2-core AMD EPYC shared with other jobs, so rough): RandAugment 2 ops
at 9: 6.7 ms a batch against kornia's 4.7 ms; TrivialAugment 3.4 against 3.5 ms; random erasing 1.3
against 1.7 ms. On two threads of that busy machine the many small calls fared worse (RandAugment 25 ms
against 17 ms): the lead's quiet run is the figure to trust (benchmarks/NOTES.md).
kornia draws RandAugment's ops once per batch, every image the same; these draw them per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import Augment

__all__ = ["POLICIES", "OPS", "Policy", "apply_op", "policy_or_preset"]

POLICIES = ("randaugment", "trivialaugment")
LEVELS = 30  # torchvision's num_magnitude_bins=31: levels 0..30
# op: (RandAugment's value at level 30, TrivialAugmentWide's, signed). Translate: a fraction of the side
# for RandAugment (torchvision: 150/331 x the size), pixels for TrivialAugmentWide (torchvision: 32 px).
SPACE: dict[str, tuple[float, float, bool]] = {
    "identity": (0.0, 0.0, False),
    "shear_x": (0.3, 0.99, True), "shear_y": (0.3, 0.99, True),
    "translate_x": (150 / 331, 32.0, True), "translate_y": (150 / 331, 32.0, True),
    "rotate": (30.0, 135.0, True),
    "brightness": (0.9, 0.99, True), "color": (0.9, 0.99, True),
    "contrast": (0.9, 0.99, True), "sharpness": (0.9, 0.99, True),
    "posterize": (4.0, 6.0, False),  # bits removed: 8 - round(value)
    "solarize": (256.0, 256.0, False),  # threshold 256 - value: timm's range (torchvision's 255 inverts white at 0)
    "autocontrast": (0.0, 0.0, False), "equalize": (0.0, 0.0, False),
}
OPS = tuple(SPACE)
GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


# ----------------------------------------------------------------------------- the policies
@dataclass(frozen=True)
class Policy:
    """`base` (light: shifts, and mirrors where the dataset allows), then the policy on every image:
    randaugment applies `ops` ops, each drawn uniformly from OPS with a random sign, all at level
    `magnitude` (0..30); trivialaugment applies one op at a level drawn uniformly from 0..30."""
    base: Augment
    kind: str = "randaugment"
    ops: int = 2
    magnitude: float = 9.0

    def __post_init__(self) -> None:
        if self.kind not in POLICIES or self.ops < 1 or not 0 <= self.magnitude <= LEVELS:
            raise ValueError(f"a policy is one of {', '.join(POLICIES)} with at least 1 op and a magnitude in "
                             f"0..{LEVELS}, not {self.kind!r}, {self.ops}, {self.magnitude:g}")

    @property
    def active(self) -> bool:
        return True

    def describe(self) -> str:
        base = self.base.describe()
        policy = (f"randaugment {self.ops} ops at magnitude {self.magnitude:g}/30" if self.kind == "randaugment"
                  else "trivialaugment (one op at a random magnitude)")
        return policy if base == "none" else f"{base}, then {policy}"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x: (N, C, H, W) uint8 (or float 0..255) -> (N, C, H, W) float32 in 0..255."""
        x = self.base(x, generator)
        n, wide = len(x), self.kind == "trivialaugment"
        steps = 1 if wide else self.ops
        op = torch.randint(0, len(OPS), (n, steps), generator=generator)  # (N, steps): each image its own
        if wide:
            level = torch.randint(0, LEVELS + 1, (n, 1), generator=generator).float() / LEVELS
        else:
            level = torch.full((n, steps), self.magnitude / LEVELS)
        sign = torch.where(torch.rand(n, steps, generator=generator) < 0.5, -1.0, 1.0)
        op, level = op.to(x.device), (level * sign).to(x.device)
        for step in range(steps):
            x = apply_ops(x, op[:, step], level[:, step], wide)
        return x


def policy_or_preset(name: str, flips_allowed: bool, overrides: dict[str, float], ops: int = 2,
                     magnitude: float = 9.0) -> Augment | Policy:
    """--augment NAME: a preset, or a policy after the light preset (each with --aug-<op> overrides)."""
    if name not in POLICIES:
        return Augment.preset(name, flips_allowed, **overrides)
    return Policy(Augment.preset("light", flips_allowed, **overrides), name, ops, magnitude)


# Ops run together on the images that drew any of them: one warp for the shears and rotations, one
# pair of gathers for the translations, each other op alone (fewer, larger calls); identity never runs.
GROUPS = (("shear_x", "shear_y", "rotate"), ("translate_x", "translate_y"),
          *((op,) for op in OPS if op != "identity" and not op.startswith(("shear", "translate", "rotate"))))


def apply_ops(x: torch.Tensor, op: torch.Tensor, level: torch.Tensor, wide: bool) -> torch.Tensor:
    """Image i through op OPS[op[i]] at signed level[i] in -1..1 (level / 30) -> (N, C, H, W) float32."""
    h, w = x.shape[2:]
    top = torch.tensor([v[1 if wide else 0] for v in SPACE.values()], device=x.device)  # (14,) value at level 30
    if not wide:  # RandAugment's translations are fractions of the side
        top[OPS.index("translate_x")] *= w
        top[OPS.index("translate_y")] *= h
    signed = torch.tensor([v[2] for v in SPACE.values()], device=x.device)
    value = torch.where(signed[op], level, level.abs()) * top[op]  # (N,) each image's op's value, in its unit
    out = x.clone()
    for group in GROUPS:
        ids = [OPS.index(name) for name in group]
        idx = torch.isin(op, torch.tensor(ids, device=op.device)).nonzero()[:, 0]
        if len(idx):
            out[idx] = run_group(group, x[idx], op[idx], value[idx])
    return out


def apply_op(name: str, x: torch.Tensor, level: torch.Tensor, wide: bool = False) -> torch.Tensor:
    """One op on float images x (M, C, H, W) at signed levels (M,) in -1..1 (the sign is ignored by the
    unsigned ops) -> (M, C, H, W) float32 in 0..255."""
    return apply_ops(x, torch.full((len(x),), OPS.index(name), device=x.device), level, wide)


def run_group(group: tuple[str, ...], x: torch.Tensor, op: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The ops of one group on the images x (M, C, H, W) that drew them: op (M,) their OPS indices, v (M,)
    their values."""
    def value_if(name: str) -> torch.Tensor:
        return torch.where(op == OPS.index(name), v, torch.zeros_like(v))
    name = group[0]
    if name == "shear_x":
        return geometric(x, value_if("shear_x"), value_if("shear_y"), value_if("rotate"))
    if name == "translate_x":  # whole pixels, as torchvision's int(magnitude)
        dy, dx = (torch.trunc(value_if(f"translate_{axis}")).long() for axis in "yx")
        return translate_filled(x, dy, dx)
    if name in ("brightness", "color", "contrast", "sharpness"):
        return blend(x, degenerate(x, name), 1 + v)
    if name == "posterize":
        return posterize(x, 8 - torch.round(v).long())
    if name == "solarize":
        return solarize(x, 256 - v)
    return {"autocontrast": autocontrast, "equalize": equalize}[name](x)


# ----------------------------------------------------------------------------- geometric
def geometric(x: torch.Tensor, shear_x: torch.Tensor | None = None, shear_y: torch.Tensor | None = None,
              angle: torch.Tensor | None = None) -> torch.Tensor:
    """Each image sheared along x then y by its factors (M,) and rotated by angle (M,) degrees
    counter-clockwise, about the centre, in one bilinear warp; uncovered pixels 0. An image with all
    three 0 is returned as it was, not resampled."""
    m, _, h, w = x.shape
    zero = torch.zeros(m, device=x.device)
    sx, sy, a = (zero if t is None else t.to(zero.dtype) for t in (shear_x, shear_y, angle))
    # normalised output -> input coordinates (y down), (M, 2, 2) written out: the inverse rotation, its
    # off-diagonal terms scaled by the aspect (as augment.affine_grid), after the shears; x_in = x + sx (y - cy)
    # in pixels is x + sx (H / W) y normalised
    kx, ky = sx * h / w, sy * w / h
    cos, sin = torch.cos(torch.deg2rad(a)), torch.sin(torch.deg2rad(a))
    r00, r01, r10, r11 = cos, -sin * w / h, sin * h / w, cos
    t00, t01 = r00 * (1 + kx * ky) + r01 * ky, r00 * kx + r01  # (rotation) @ (shear x) @ (shear y)
    t10, t11 = r10 * (1 + kx * ky) + r11 * ky, r10 * kx + r11
    xs = ((torch.arange(w, device=x.device) * 2 + 1) / w - 1).view(1, 1, w)  # pixel centres, align_corners=False
    ys = ((torch.arange(h, device=x.device) * 2 + 1) / h - 1).view(1, h, 1)

    def row(c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:  # (M,) coefficients -> (M, H, W)
        return c0.view(m, 1, 1) * xs + c1.view(m, 1, 1) * ys
    grid = torch.stack([row(t00, t01), row(t10, t11)], -1)  # (M, H, W, 2): what F.affine_grid gives, without a bmm
    warped = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    still = (sx == 0) & (sy == 0) & (a == 0)
    return torch.where(still.view(-1, 1, 1, 1), x, warped)


def translate_filled(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Content moved down dy (M,) and right dx (M,) whole pixels, the uncovered border 0 (exact): two
    gathers, of columns then of rows."""
    m, c, h, w = x.shape
    cols = torch.arange(w, device=x.device).view(1, w) - dx.view(-1, 1)  # (M, W): source column of each column
    rows = torch.arange(h, device=x.device).view(1, h) - dy.view(-1, 1)  # (M, H)
    x = x.gather(3, cols.clamp(0, w - 1).view(m, 1, 1, w).expand(m, c, h, w))
    x = x.gather(2, rows.clamp(0, h - 1).view(m, 1, h, 1).expand(m, c, h, w))
    inside = ((rows >= 0) & (rows < h)).view(-1, 1, h, 1) & ((cols >= 0) & (cols < w)).view(-1, 1, 1, w)
    return torch.where(inside, x, torch.zeros((), device=x.device, dtype=x.dtype))


# ----------------------------------------------------------------------------- photometric
def grey(x: torch.Tensor) -> torch.Tensor:
    """(M, C, H, W) -> (M, 1, H, W) luma (a grey image is its own)."""
    if x.shape[1] != 3:
        return x[:, :1]
    return (x * torch.tensor(GREY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)


def degenerate(x: torch.Tensor, name: str) -> torch.Tensor:
    """What each enhancement blends with, as PIL.ImageEnhance: black (brightness), the grey image
    (color), the grey image's mean (contrast), a 3x3 smoothing with the border kept (sharpness)."""
    if name == "brightness":
        return torch.zeros((), device=x.device, dtype=x.dtype)
    if name == "color":
        return grey(x) if x.shape[1] == 3 else x  # nothing to saturate: blending x with itself
    if name == "contrast":
        return grey(x).mean(dim=(1, 2, 3), keepdim=True)  # (M, 1, 1, 1)
    # PIL's SMOOTH kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 as a 3x3 box sum plus 4 x the centre, the box
    # as shifted slices added: on the CPU several times faster than a convolution or avg_pool2d of a few images
    box = x[:, :, :, :-2] + x[:, :, :, 1:-1] + x[:, :, :, 2:]
    box = box[:, :, :-2] + box[:, :, 1:-1] + box[:, :, 2:]
    smooth = (box + 4 * x[:, :, 1:-1, 1:-1]) / 13  # (M, C, H - 2, W - 2)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = smooth
    return out


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor x + (1 - factor) other, per image factor (M,), clamped; written as x + (1 - f)(other - x)
    so that factor 1 returns x exactly."""
    return (x + (1 - factor).view(-1, 1, 1, 1) * (other - x)).clamp_(0, 255)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top bits (M,) of each level (PIL.ImageOps.posterize on the rounded levels); 8 bits: x."""
    step = (2.0 ** (8 - bits)).to(x.dtype).view(-1, 1, 1, 1)
    return torch.where((bits == 8).view(-1, 1, 1, 1), x, torch.floor(x.round() / step) * step)


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert the levels at or above the threshold (M,) (PIL.ImageOps.solarize)."""
    return torch.where(x >= threshold.view(-1, 1, 1, 1), 255 - x, x)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel's levels to 0..255 (PIL.ImageOps.autocontrast, cutoff 0); a flat channel
    is kept."""
    low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)  # (M, C, 1, 1)
    flat = high <= low
    scale = torch.where(flat, torch.ones_like(high), 255 / (high - low).clamp_min(1e-6))
    return torch.where(flat, x, ((x - low) * scale).clamp_(0, 255))


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel of each image, PIL.ImageOps.equalize's algorithm (as
    torchvision's): per-channel histograms (M, C, 256) by scatter_add, integer arithmetic throughout."""
    m, c, h, w = x.shape
    levels = x.round().clamp(0, 255).long().view(m, c, h * w)
    hist = torch.zeros(m, c, 256, dtype=torch.long, device=x.device).scatter_add_(2, levels, torch.ones_like(levels))
    top = levels.amax(2, keepdim=True)  # (M, C, 1): the highest level present, left out of the step
    step = (h * w - hist.gather(2, top)) // 255  # (M, C, 1)
    lut = (hist.cumsum(2) + step // 2) // step.clamp_min(1)
    lut = F.pad(lut, (1, 0))[..., :-1].clamp_(0, 255)  # level l maps to the count below l
    out = lut.gather(2, levels).view(m, c, h, w).to(x.dtype)
    return torch.where((step == 0).view(m, c, 1, 1), x, out)
