"""Seeing inside a trained network: first-layer kernels, feature maps, Grad-CAM. Numbers only
(the pictures are drawn in report.py).

Grad-CAM (Selvaraju et al. 2017): for class c and the last spatial feature maps A (N, K, h, w),
    alpha_k = mean over (h, w) of d logit_c / d A_k        (one weight per channel)
    cam     = ReLU(sum_k alpha_k * A_k)                      (N, h, w)
upsampled bilinearly to the input size and scaled to [0, 1] per image: where the evidence for c is.

Every architecture here is a plain nn.Module, so the layers are found by running the model once
with forward hooks, never by names: a spec network, ResNet and EfficientNet are treated alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CnnkitError
from .inference import class_logits
from .models.layers import Conv
from .multilabel import label_set
from .preprocess import Preprocess

MAX_FEATURE_LAYERS = 8  # feature-map figures per image: every conv layer when there are at most this many


@dataclass
class Site:
    """A module whose output is a feature map, in the order the forward pass reaches it."""
    name: str
    module: nn.Module
    shape: tuple[int, int, int]  # (C, H, W) of its output for one image
    is_conv: bool


def trace(model: nn.Module, input_shape: tuple[int, int, int], allow_failure: bool = False) -> list[Site]:
    """Every module that outputs an (N, C, H, W) map, in execution order (a module's hook fires after
    its children's, so a block comes after the layers inside it). With allow_failure, a forward pass
    that fails part-way (a dense layer fed a bigger input) returns the maps reached before it."""
    names = {m: n for n, m in model.named_modules() if n}
    sites: list[Site] = []
    hooks = []

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            sites.append(Site(names[module], module, tuple(output.shape[1:]), isinstance(module, nn.Conv2d)))
    for m in names:
        hooks.append(m.register_forward_hook(hook))
    try:
        p = next(model.parameters(), None)
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu"))
    except RuntimeError:
        if not allow_failure:
            raise
    finally:
        for h in hooks:
            h.remove()
    return sites


PROBE_PIXELS = 64  # a multiple of every total stride up to 64, so the probe's extra cells are exact


def grid_geometry(model: nn.Module, input_shape: tuple[int, int, int], site: Site) -> list[tuple[float, float]]:
    """[(start, stride) for rows, (start, stride) for columns]: cell i of the site's map is centred on
    input pixel start + stride * i. The stride comes from a second pass on an input PROBE_PIXELS
    larger (stride = PROBE_PIXELS / extra cells); the grid is centred on the image, which holds for
    valid, same and symmetric padding. Stretching the map over the whole image instead would be
    wrong for valid convolutions: a 24x24 map of a 28x28 digit covers only its central 24 pixels."""
    c, h, w = input_shape
    bigger = {id(s.module): s.shape for s in trace(model, (c, h + PROBE_PIXELS, w + PROBE_PIXELS), allow_failure=True)}
    geometry = []
    for axis, size in ((1, h), (2, w)):
        cells = site.shape[axis]
        extra = bigger.get(id(site.module), site.shape)[axis] - cells
        stride = PROBE_PIXELS / extra if extra > 0 else size / cells
        geometry.append(((size - 1 - stride * (cells - 1)) / 2, stride))
    return geometry


def to_input_grid(cam: torch.Tensor, geometry: list[tuple[float, float]], size: tuple[int, int]) -> torch.Tensor:
    """Resample maps (N, 1, h, w) to input pixels (N, H, W), bilinearly, at each pixel's place on
    the map's grid; pixels beyond the outermost cell centres take the edge value."""
    n, _, h, w = cam.shape
    (row0, row_step), (col0, col_step) = geometry
    rows = (torch.arange(size[0], dtype=torch.float32) - row0) / row_step  # in cell units
    cols = (torch.arange(size[1], dtype=torch.float32) - col0) / col_step
    # grid_sample with align_corners=True: -1 and 1 are the centres of the first and last cells
    gy = rows * 2 / max(h - 1, 1) - 1 if h > 1 else torch.zeros_like(rows)
    gx = cols * 2 / max(w - 1, 1) - 1 if w > 1 else torch.zeros_like(cols)
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)  # (H, W, 2) as (x, y)
    return F.grid_sample(cam, grid.expand(n, *grid.shape).to(cam), mode="bilinear", padding_mode="border",
                         align_corners=True)[:, 0]


def conv_layers(sites: list[Site]) -> list[Site]:
    """The convolution outputs to draw: each conv layer's, or, for deep networks, the last conv layer
    of each resolution stage (so ResNet-50 shows 5 stages, not 53 layers). A conv inside a cnnkit
    Conv block is replaced by the block, whose output is after the activation."""
    convs = [s for s in sites if s.is_conv]
    blocks = {id(s.module.conv): s for s in sites if isinstance(s.module, Conv)}
    convs = [blocks.get(id(s.module), s) for s in convs]
    if len(convs) <= MAX_FEATURE_LAYERS:
        return convs
    stages = [s for i, s in enumerate(convs) if i + 1 == len(convs) or convs[i + 1].shape[1:] != s.shape[1:]]
    return stages[-MAX_FEATURE_LAYERS:]


def gradcam_site(sites: list[Site]) -> Site:
    """Grad-CAM's layer: the output of the last convolution with more than one pixel, taken after
    what follows it at the same shape (its activation, a residual block's sum), as Grad-CAM uses the
    last conv layer's rectified maps. Pooling after it would only blur where the evidence lies."""
    convs = [i for i, s in enumerate(sites) if s.is_conv and s.shape[1] * s.shape[2] > 1]
    if not convs:
        raise CnnkitError("the model has no convolution layers with a spatial output, so there are no feature maps "
                          "or Grad-CAM to show (linear, MLP and SVM models see pixels directly)")
    last = convs[-1]
    while last + 1 < len(sites) and sites[last + 1].shape == sites[convs[-1]].shape:
        last += 1
    return sites[last]


def first_conv(model: nn.Module) -> nn.Conv2d:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise CnnkitError("the model has no convolution layers, so it has no kernels to show")


def capture(model: nn.Module, sites: list[Site], x: torch.Tensor,
            grad: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, [output of each site]) for a normalized batch x. The hook hands a copy downstream, so an
    in-place ReLU after a layer (AlexNet, VGG) cannot overwrite the map we keep."""
    outputs: dict[int, torch.Tensor] = {}

    def hook(module, inputs, output):
        outputs[id(module)] = output
        return output.clone()
    hooks = [s.module.register_forward_hook(hook) for s in sites]
    try:
        with torch.set_grad_enabled(grad):
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, [outputs[id(s.module)] for s in sites]


def gradcam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None,
            site: Site | None = None,
            geometry: list[tuple[float, float]] | None = None, binary: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(heatmaps (N, H, W) in [0, 1], logits (N, K)) for a normalized batch x (N, C, H, W), for
    `classes` (N,) or, by default, each image's predicted class (binary: a binary model, its logits
    taken as the two classes', (N, 2)). The model must be in eval mode:
    then images do not interact (BatchNorm uses running statistics), so one backward pass over the
    summed scores gives every image its own gradient."""
    if site is None:
        site = gradcam_site(trace(model, tuple(x.shape[1:])))
    if geometry is None:
        geometry = grid_geometry(model, tuple(x.shape[1:]), site)
    x = x.detach().requires_grad_(True)  # a graph to differentiate even when every weight is frozen
    logits, (maps,) = capture(model, [site], x, grad=True)
    if binary:  # the one logit z as the two classes' (-z/2, z/2), as inference.class_logits
        logits = torch.cat([-logits / 2, logits / 2], dim=1)
    if classes is None:
        classes = logits.argmax(1)
    score = logits.float().gather(1, classes.view(-1, 1)).sum()
    (grads,) = torch.autograd.grad(score, maps)  # (N, K, h, w)
    weights = grads.float().mean((2, 3), keepdim=True)  # alpha_k: (N, K, 1, 1)
    cam = F.relu((weights * maps.detach().float()).sum(1, keepdim=True))  # (N, 1, h, w)
    cam = to_input_grid(cam, geometry, tuple(x.shape[2:]))  # (N, H, W)
    # Scaled to [0, 1] between each map's own minimum and maximum, as pytorch-grad-cam does: a
    # uniform floor says nothing about where the evidence is.
    low, high = cam.flatten(1).aminmax(dim=1)
    cam = (cam - low.view(-1, 1, 1)) / (high - low).clamp_min(1e-12).view(-1, 1, 1)
    return cam.clamp(0, 1), logits.detach().float()


def mass_inside_box(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The share of each heatmap's total inside the bounding box of its mask's nonzero pixels: (N,)."""
    boxes = torch.zeros_like(heatmaps, dtype=torch.bool)
    for i, m in enumerate(masks):
        rows, cols = m.any(1).nonzero()[:, 0], m.any(0).nonzero()[:, 0]
        if len(rows):
            boxes[i, rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    total = heatmaps.flatten(1).sum(1).clamp_min(1e-12)
    return (heatmaps * boxes).flatten(1).sum(1) / total


@torch.no_grad()
def feature_maps(model: nn.Module, x: torch.Tensor, sites: list[Site]) -> list[torch.Tensor]:
    """Each site's output for one normalized image x (1, C, H, W): a list of (C_i, H_i, W_i)."""
    _, maps = capture(model, sites, x)
    return [m[0].float() for m in maps]


def decision(logits: torch.Tensor, task: str, temperature: float = 1.0,
             thresholds: list[float] | None = None) -> tuple[torch.Tensor, list[int]]:
    """(probabilities (K,), the classes decided) from one image's class logits (K,) (a binary model's
    already as two, inference.class_logits), as inference.probabilities and decide read them:
    single-label softmax(logits / T) and its most probable class; binary (1 - p, p) with
    p = sigmoid(z / T) and the second class where p reaches thresholds[0]; multi-label sigmoid(logits)
    and the labels present (p_k >= thresholds[k]), most probable first as multilabel.label_set orders them."""
    if task == "multi-label":
        probs = torch.sigmoid(logits)
        cut = np.array(thresholds if thresholds is not None else [0.5] * len(probs))
        return probs, label_set(probs.numpy(), cut, list(range(len(probs))))["labels"]  # names = indices
    probs = F.softmax(logits / temperature, dim=0)
    if task == "binary":
        return probs, [int(probs[1] >= (thresholds[0] if thresholds else 0.5))]
    return probs, [int(probs.argmax())]


def explain_image(model: nn.Module, preprocess: Preprocess, image: torch.Tensor, class_index: int | None = None,
                  temperature: float = 1.0, task: str = "single-label", thresholds: list[float] | None = None) -> dict:
    """Everything `cnnkit explain` draws, for one uint8 image (C, H, W) preprocessed as in training
    (Preprocess.from_info), probabilities at the model file's temperature and decisions at its
    thresholds (decision):
    {'probabilities' (K,), 'decided' [class index], 'kernels' (F, C, kh, kw), 'layers' [(Site, map (C, H, W))],
    'gradcam_site', 'heatmaps' {class index: (H, W)}}, and 'predicted' (the decided class) but for
    multi-label. Heatmaps: single-label and binary, the decided class and `class_index`; multi-label,
    `class_index` alone if given, else each label present, or the most probable when none is."""
    model.eval()
    x = preprocess(image[None])  # (1, C, H, W) float
    sites = trace(model, tuple(x.shape[1:]))
    target = gradcam_site(sites)
    geometry = grid_geometry(model, tuple(x.shape[1:]), target)  # measured once for every heatmap
    with torch.no_grad():
        logits = class_logits(model(x).float(), task)[0]  # (K,)
    probs, decided = decision(logits, task, temperature, thresholds)
    if task == "multi-label":
        classes = [class_index] if class_index is not None else decided or [int(probs.argmax())]
    else:
        classes = decided + ([class_index] if class_index not in (None, *decided) else [])
    # One backward pass for all: the image once per class (eval mode, so the copies do not interact).
    heat, _ = gradcam(model, x.repeat(len(classes), 1, 1, 1), torch.tensor(classes), site=target, geometry=geometry,
                      binary=task == "binary")
    layers = conv_layers(sites)
    result = {"probabilities": probs, "decided": decided, "kernels": first_conv(model).weight.detach().float().cpu(),
              "layers": list(zip(layers, feature_maps(model, x, layers))), "gradcam_site": target,
              "heatmaps": dict(zip(classes, heat))}
    if task != "multi-label":
        result["predicted"] = decided[0]
    return result
