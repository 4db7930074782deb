"""`cnnkit explain`: one image's first-layer kernels, feature maps and Grad-CAM (explain.py), drawn, for
single-label, binary and multi-label models (each answered as `cnnkit predict` answers it)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import CnnkitError
from ..modelfile import ModelInfo
from ..multilabel import label_set
from ..preprocess import Preprocess
from ..utils import write_text_atomic


def explain(model_path: str | Path, image_path: str | Path, out: str | Path | None = None,
            class_name: str | None = None) -> dict:
    """Load the model file (or run folder) and explain one image into `out` (default explain-<image name>)."""
    from ..modelfile import load_model
    model, info = load_model(model_path)
    return explain_to_folder(model, info, image_path, Path(out) if out else Path(f"explain-{Path(image_path).stem}"),
                             class_name=class_name)


def read_image(info: ModelInfo, image_path: str | Path) -> torch.Tensor:
    """The image file as the model sees it: (C, H, W) uint8 at its input size and channels."""
    from ..decode import decode_image
    try:
        return torch.from_numpy(decode_image(str(image_path), info.square_side("explain"), info.input.channels).copy())
    except FileNotFoundError:
        raise CnnkitError(f"no such image file: {image_path}") from None
    except Exception as e:  # any decoder failure: the user's file, not our bug
        raise CnnkitError(f"cannot read {image_path} as an image "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def explain_to_folder(model: nn.Module, info: ModelInfo, image_path: str | Path, out: str | Path,
                      class_name: str | None = None, top_k: int = 5) -> dict:
    """`cnnkit explain`: kernels.png, one feature-map figure per conv layer (or stage), gradcam.png
    (one panel per class explained) and explain.json in `out`, for one image file. Returns
    explain.json's dict."""
    from ..explain import explain_image
    from ..report import plot_feature_maps, plot_gradcam, plot_kernels
    names = info.class_names
    class_index = None
    if class_name is not None:
        if class_name not in names:
            raise CnnkitError(f"--class {class_name!r} is not one of the model's classes: {', '.join(names[:20])}"
                              + (" ..." if len(names) > 20 else ""))
        class_index = names.index(class_name)
    image = read_image(info, image_path)
    result = explain_image(model.eval(), Preprocess.from_info(info), image, class_index, info.temperature,
                           task=info.task, thresholds=info.thresholds)
    out = Path(out)
    probs = result["probabilities"]
    files = {"kernels": plot_kernels(result["kernels"], out / "kernels.png")}
    layers = []
    for i, (site, maps) in enumerate(result["layers"], 1):
        title = f"layer {site.name}: {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]} (most active shown)"
        file = plot_feature_maps(maps, title, out / f"feature_maps_{i}_{re.sub(r'[^A-Za-z0-9]+', '_', site.name)}.png")
        layers.append({"name": site.name, "shape": list(site.shape), "file": str(file)})
    cut = thresholds_of(info)
    heat = {f"{names[c]} ({probs[c]:.2f}" + (f", threshold {cut[c]:.2f})" if info.task == "multi-label" else ")"): h
            for c, h in result["heatmaps"].items()}
    files["gradcam"] = plot_gradcam(image, heat, out / "gradcam.png")
    site = result["gradcam_site"]
    record = {"image": str(image_path), "task": info.task, **answer(info, probs.numpy().astype(np.float64),
                                                                      result["decided"], top_k),
              "gradcam_classes": [names[c] for c in result["heatmaps"]],
              "gradcam_layer": {"name": site.name, "shape": list(site.shape)},
              "kernels_shape": list(result["kernels"].shape), "feature_maps": layers,
              "files": {"kernels": str(files["kernels"]), "gradcam": str(files["gradcam"]),
                        "json": str(out / "explain.json")}}
    write_text_atomic(out / "explain.json", json.dumps(record, indent=2))
    return record


def thresholds_of(info: ModelInfo) -> list[float]:
    """A multi-label model's thresholds, one per label (0.5 where the model file has none); else []."""
    if info.task != "multi-label":
        return []
    return info.decision_thresholds


def answer(info: ModelInfo, probs: np.ndarray, decided: list[int], top_k: int) -> dict:
    """explain.json's answer for probabilities (K,), as `cnnkit predict` gives it. Multi-label: the label
    set (multilabel.label_set) and every label's threshold. Otherwise the decided class and its
    probability, and the top-k with the decided class first (a binary model's threshold may decide
    the less probable class), a binary model's threshold beside."""
    names = info.class_names
    if info.task == "multi-label":
        cut = thresholds_of(info)
        return {**label_set(probs, np.array(cut), names), "thresholds": dict(zip(names, map(float, cut)))}
    order = [decided[0]] + [int(i) for i in np.argsort(-probs, kind="stable") if i != decided[0]]
    record = {"predicted": names[decided[0]], "probability": float(probs[decided[0]]),
              "top": [{"label": names[i], "probability": float(probs[i])} for i in order[:min(top_k, len(names))]]}
    if info.task == "binary":
        record["threshold"] = info.decision_thresholds[0]
    return record
