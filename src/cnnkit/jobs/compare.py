"""`cnnkit compare`: two runs on the same test images (compare.py's paired statistics), drawn."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CnnkitError
from ..inference import probabilities
from ..utils import write_text_atomic


def compare_runs(run_a: str | Path, run_b: str | Path, out: str | Path | None = None, data: str | None = None,
                 data_dir: str | None = None) -> tuple[dict, dict[str, Path]]:
    """Both models on the same test images: paired statistics (compare.py), recall per class, the
    curves of both runs; writes compare.json, compare.html and curves.png into `out`."""
    from ..compare import paired_comparison, verdict
    from ..evaluate import load_split_for
    from ..modelfile import load_model
    from ..report import plot_compare_curves
    from ..report_html import write_compare_page

    (model_a, info_a), (model_b, info_b) = load_model(run_a), load_model(run_b)
    info_a.single_label_only("cnnkit compare")
    info_b.single_label_only("cnnkit compare")
    name_a, name_b = Path(run_a).name or "A", Path(run_b).name or "B"
    if name_a == name_b:
        name_a, name_b = f"A ({name_a})", f"B ({name_b})"
    if info_a.class_names != info_b.class_names:
        raise CnnkitError("the two models have different classes: compare models trained on the same data")
    data = data or info_a.data_name
    if not data:
        raise CnnkitError("the model files do not name their dataset: give it with --data")
    split_a, _ = load_split_for(info_a, data, "test", data_dir)
    split_b, _ = load_split_for(info_b, data, "test", data_dir)
    # Pairing needs the same images in the same order. Data without its own test split is carved
    # by each run's seed and fractions: two seeds hold out different images (and train on the other's).
    same = len(split_a) == len(split_b) and torch.equal(split_a.labels, split_b.labels)
    if same and split_a.paths and split_b.paths:  # folders: the same files
        same = split_a.paths == split_b.paths
    elif same and isinstance(split_a.images, torch.Tensor) and split_a.images.shape == split_b.images.shape:
        same = torch.equal(split_a.images, split_b.images)  # built-in data at one input size: the same pixels
    if not same:
        raise CnnkitError(f"the two runs hold out different test images of {data} (their --seed, --val-split or "
                          "--test-split differ and the data has no test split of its own): compare runs made with "
                          "the same split settings, or on data with a test split")
    labels = split_a.labels.numpy()
    pred_a = probabilities(model_a, info_a, split_a.images).argmax(1)
    pred_b = probabilities(model_b, info_b, split_b.images).argmax(1)
    result = paired_comparison(pred_a == labels, pred_b == labels)
    sentence = verdict(result, name_a, name_b)
    per_class = []
    for k, cls in enumerate(info_a.class_names):
        mask = labels == k
        if mask.any():
            ra, rb = float((pred_a[mask] == k).mean()), float((pred_b[mask] == k).mean())
            per_class.append([cls, f"{ra:.4f}", f"{rb:.4f}", f"{ra - rb:+.4f}"])
    out = Path(out or f"compare-{Path(run_a).name}-{Path(run_b).name}")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if info_a.history and info_b.history:
        files["curves"] = plot_compare_curves({name_a: info_a.history, name_b: info_b.history}, out / "curves.png")
    result.update({"a": str(run_a), "b": str(run_b), "data": data, "verdict": sentence, "out": str(out)})
    files["compare_json"] = out / "compare.json"
    write_text_atomic(files["compare_json"], json.dumps(result, indent=2))
    files["report"] = write_compare_page(out / "compare.html", names=(name_a, name_b), result=result, verdict=sentence,
                                         per_class=per_class, files=files, data=data)
    return result, files
