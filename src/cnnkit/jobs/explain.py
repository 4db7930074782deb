"""`cnnkit explain`: one image's first-layer kernels, feature maps and Grad-CAM (explain.py), drawn."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CnnkitError
from ..modelfile import ModelInfo
from ..preprocess import Preprocess
from ..utils import write_text_atomic


def explain(model_path: str | Path, image_path: str | Path, out: str | Path | None = None,
            class_name: str | None = None) -> dict:
    """Load the model file (or run folder) and explain one image into `out` (default explain-<image name>)."""
    from ..modelfile import load_model
    model, info = load_model(model_path)
    info.single_label_only("cnnkit explain")
    return explain_to_folder(model, info, image_path, Path(out) if out else Path(f"explain-{Path(image_path).stem}"),
                             class_name=class_name)


def explain_to_folder(model: nn.Module, info: ModelInfo, image_path: str | Path, out: str | Path,
                      class_name: str | None = None, top_k: int = 5) -> dict:
    """`cnnkit explain`: kernels.png, one feature-map figure per conv layer (or stage), gradcam.png
    and explain.json in `out`, for one image file. Returns explain.json's dict."""
    from ..decode import decode_image
    from ..explain import explain_image
    from ..report import plot_feature_maps, plot_gradcam, plot_kernels
    names = info.class_names
    side = info.square_side("explain")
    class_index = None
    if class_name is not None:
        if class_name not in names:
            raise CnnkitError(f"--class {class_name!r} is not one of the model's classes: {', '.join(names[:20])}"
                              + (" ..." if len(names) > 20 else ""))
        class_index = names.index(class_name)
    try:
        image = torch.from_numpy(decode_image(str(image_path), side, info.input.channels).copy())  # (C, H, W) uint8
    except FileNotFoundError:
        raise CnnkitError(f"no such image file: {image_path}") from None
    except Exception as e:  # any decoder failure: the user's file, not our bug
        raise CnnkitError(f"cannot read {image_path} as an image "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    result = explain_image(model.eval(), Preprocess.from_info(info), image, class_index, info.temperature)
    out = Path(out)
    probs = result["probabilities"]
    top = probs.topk(min(top_k, len(names)))
    predicted = names[result["predicted"]]
    files = {"kernels": plot_kernels(result["kernels"], out / "kernels.png")}
    layers = []
    for i, (site, maps) in enumerate(result["layers"], 1):
        title = f"layer {site.name}: {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]} (most active shown)"
        file = plot_feature_maps(maps, title, out / f"feature_maps_{i}_{re.sub(r'[^A-Za-z0-9]+', '_', site.name)}.png")
        layers.append({"name": site.name, "shape": list(site.shape), "file": str(file)})
    heat = {f"{names[c]} ({probs[c]:.2f})": h for c, h in result["heatmaps"].items()}
    files["gradcam"] = plot_gradcam(image, heat, out / "gradcam.png")
    site = result["gradcam_site"]
    record = {"image": str(image_path), "predicted": predicted, "probability": float(probs[result["predicted"]]),
            "top": [{"label": names[i], "probability": float(p)}
                    for p, i in zip(top.values.tolist(), top.indices.tolist())],
            "gradcam_classes": [names[c] for c in result["heatmaps"]],
            "gradcam_layer": {"name": site.name, "shape": list(site.shape)},
            "kernels_shape": list(result["kernels"].shape), "feature_maps": layers,
            "files": {"kernels": str(files["kernels"]), "gradcam": str(files["gradcam"]),
                      "json": str(out / "explain.json")}}
    write_text_atomic(out / "explain.json", json.dumps(record, indent=2))
    return record
