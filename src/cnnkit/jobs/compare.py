"""`cnnkit compare`: two runs on the same test images (compare.py's paired statistics), drawn.

What "right" means follows the task, as `cnnkit predict` decides: single-label, the most probable
class; binary, the class each model's own threshold decides (inference.decide); multi-label, the
exact label set at each model's thresholds (subset accuracy), with per-label F1 and mAP beside.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import CnnkitError
from ..inference import decide, probabilities
from ..modelfile import ModelInfo
from ..utils import write_text_atomic


def compare_runs(run_a: str | Path, run_b: str | Path, out: str | Path | None = None, data: str | None = None,
                 data_dir: str | None = None) -> tuple[dict, dict[str, Path]]:
    """Both models on the same test images: paired statistics (compare.py), recall per class (F1 per
    label for multi-label models), the curves of both runs; writes compare.json, compare.html and
    curves.png into `out`."""
    from ..compare import paired_comparison, verdict
    from ..modelfile import load_model
    from ..report import plot_compare_curves
    from ..report_html import write_compare_page

    (model_a, info_a), (model_b, info_b) = load_model(run_a), load_model(run_b)
    name_a, name_b = Path(run_a).name or "A", Path(run_b).name or "B"
    if name_a == name_b:
        name_a, name_b = f"A ({name_a})", f"B ({name_b})"
    if (info_a.task == "multi-label") != (info_b.task == "multi-label"):  # binary against softmax: both decide a class
        raise CnnkitError(f"{name_a} is a {info_a.task} model and {name_b} a {info_b.task} one: "
                          "compare two models of the same task (or a binary one with a two-class single-label one)")
    if info_a.class_names != info_b.class_names:
        raise CnnkitError("the two models have different classes: compare models trained on the same data")
    # The config's data is where it was read from (a label file's or folder's path); the record's name is for people.
    data = data or info_a.training.get("data") or info_a.data_name
    if not data:
        raise CnnkitError("the model files do not name their dataset: give it with --data")
    split_a, split_b = paired_splits(info_a, info_b, data, data_dir)
    probs = probabilities(model_a, info_a, split_a.images), probabilities(model_b, info_b, split_b.images)
    figures = multi_label_figures if info_a.task == "multi-label" else class_figures
    correct, per_class, extra = figures(probs, (info_a, info_b), split_a.labels.numpy())
    result = paired_comparison(*correct)
    measure = "subset accuracy" if info_a.task == "multi-label" else "accuracy"
    sentence = verdict(result, name_a, name_b, measure)
    out = Path(out or f"compare-{Path(run_a).name}-{Path(run_b).name}")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if info_a.history and info_b.history:
        files["curves"] = plot_compare_curves({name_a: info_a.history, name_b: info_b.history}, out / "curves.png")
    task = info_a.task if info_a.task == info_b.task else f"{info_a.task} / {info_b.task}"
    result.update({"task": task, "measure": measure, **extra, "per_class": per_class, "a": str(run_a),
                   "b": str(run_b), "data": data, "verdict": sentence, "out": str(out)})
    files["compare_json"] = out / "compare.json"
    write_text_atomic(files["compare_json"], json.dumps(result, indent=2))
    files["report"] = write_compare_page(out / "compare.html", names=(name_a, name_b), result=result, verdict=sentence,
                                         per_class=page_rows(per_class), files=files, data=data)
    return result, files


def paired_splits(info_a: ModelInfo, info_b: ModelInfo, data: str, data_dir: str | None) -> tuple:
    """Both runs' test splits of `data`, refused unless they hold the same images in the same order."""
    from ..evaluate import load_split_for
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
    return split_a, split_b


def class_figures(probs: tuple[np.ndarray, np.ndarray], infos: tuple[ModelInfo, ModelInfo],
                  labels: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], list[dict], dict]:
    """((right A, right B) (N,) each, recall per class, {}) of single-label or binary models on labels
    (N,): each model's decision its own (decide: a binary model's threshold)."""
    pred_a, pred_b = (decide(p, info) for p, info in zip(probs, infos))
    per_class = []
    for k, cls in enumerate(infos[0].class_names):
        mask = labels == k
        if mask.any():
            per_class.append({"class": cls, "recall_a": float((pred_a[mask] == k).mean()),
                              "recall_b": float((pred_b[mask] == k).mean()), "support": int(mask.sum())})
    return (pred_a == labels, pred_b == labels), per_class, {}


def multi_label_figures(probs: tuple[np.ndarray, np.ndarray], infos: tuple[ModelInfo, ModelInfo],
                        truth: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], list[dict], dict]:
    """((exact label set A, B) (N,) each, F1 per label, mAP of each) of multi-label models on truth
    (N, K) in {0, 1}, each deciding at its own thresholds (0.5 where its model file has none)."""
    from ..multilabel import multilabel_metrics
    names = infos[0].class_names
    truth = truth > 0.5
    right, metrics = [], []
    for p, info in zip(probs, infos):
        thresholds = np.array(info.decision_thresholds)
        right.append(((p >= thresholds[None, :]) == truth).all(1))  # the whole label set right
        metrics.append(multilabel_metrics(p, truth, thresholds, names))
    per_label = [{"label": a["label"], "f1_a": a["f1"], "f1_b": b["f1"], "support": a["support"]}
                 for a, b in zip(metrics[0]["per_label"], metrics[1]["per_label"])]
    extra = {"mean_average_precision_a": metrics[0]["mean_average_precision"],
             "mean_average_precision_b": metrics[1]["mean_average_precision"]}
    return (right[0], right[1]), per_label, extra


def page_rows(per_class: list[dict]) -> list[list]:
    """compare.html's table rows: [class, A, B, A - B] of recall, or of F1 for labels."""
    key = "f1" if per_class and "f1_a" in per_class[0] else "recall"
    return [[row.get("class", row.get("label")), f"{row[f'{key}_a']:.4f}", f"{row[f'{key}_b']:.4f}",
             f"{row[f'{key}_a'] - row[f'{key}_b']:+.4f}"] for row in per_class]
