"""An evaluation written to a folder: metrics (evaluate.py), pictures (report.py), report.html
(report_html.py). The end of `cnnkit train` and the whole of `cnnkit evaluate` write the same files.

matplotlib is imported only when a picture is drawn, so `--no-report` runs never load it."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .data import Split
from .errors import CnnkitError
from .evaluate import evaluate
from .modelfile import ModelInfo
from .models.summary import summary
from .preprocess import Preprocess
from .utils import write_csv, write_text_atomic

GALLERY_SIZE = 24  # mistakes drawn in misclassified.png (misclassified.csv lists up to 50)


def gallery_heatmaps(model: nn.Module, info: ModelInfo, images: torch.Tensor, rows: list[dict]) -> torch.Tensor | None:
    """Grad-CAM (N, H, W) for the predicted class of each gallery image, or None for a model without convolutions."""
    from .explain import gradcam
    if not rows:
        return None
    device = next(model.parameters()).device
    x = Preprocess.from_info(info).to(device)(images[torch.tensor([r["index"] for r in rows])].to(device))
    names = info.class_names
    try:
        heat, _ = gradcam(model.eval(), x, torch.tensor([names.index(r["predicted"]) for r in rows], device=device),
                          binary=info.task == "binary")
    except CnnkitError:  # linear, MLP and SVM models: nothing spatial to explain
        return None
    return heat.cpu()


def write_evaluation(out: Path, model: nn.Module, info: ModelInfo, split: Split, metrics: dict) -> dict[str, Path]:
    """The files of an evaluation: confusion matrix (PNG, row-normalized PNG, CSV), the misclassified
    gallery with Grad-CAM heatmaps (PNG) and list (CSV), the reliability diagram. {name: path}."""
    from . import report
    names = info.class_names
    cm = metrics["confusion_matrix"]
    files = {"confusion_matrix_csv": out / "confusion_matrix.csv", "misclassified_csv": out / "misclassified.csv"}
    write_csv(files["confusion_matrix_csv"], ["true \\ predicted", *names], [[n, *row] for n, row in zip(names, cm)])
    mis = metrics["misclassified"]
    write_csv(files["misclassified_csv"], ["path", "index", "true", "predicted", "probability", "loss"],
              [[m["path"], m["index"], m["true"], m["predicted"], f"{m['probability']:.6f}", f"{m['loss']:.6f}"]
               for m in mis])
    files["confusion_matrix"] = report.plot_confusion_matrix(cm, names, out / "confusion_matrix.png")
    files["confusion_matrix_normalized"] = report.plot_confusion_matrix(
        metrics["confusion_matrix_normalized"], names, out / "confusion_matrix_normalized.png", normalized=True)
    gallery = mis[:GALLERY_SIZE]
    files["misclassified"] = report.plot_misclassified(split.images, gallery, out / "misclassified.png", columns=6,
                                                       heatmaps=gallery_heatmaps(model, info, split.images, gallery))
    files["reliability"] = report.plot_reliability(metrics["reliability"], metrics["ece"], out / "reliability.png")
    if "binary" in metrics:
        files["roc_pr"] = report.plot_roc_pr(metrics["binary"], names[1], out / "roc_pr.png")
    return files


def evaluate_and_report(model: nn.Module, info: ModelInfo, split: Split, out: str | Path, *, data_name: str,
                        split_name: str = "test", tta: bool = False, device: torch.device | str | None = None,
                        title: str | None = None, logits: torch.Tensor | None = None,
                        tta_probs: np.ndarray | None = None) -> tuple[dict, dict[str, Path]]:
    """Evaluate `model` on `split` and write everything into `out`: the files of write_evaluation,
    curves.png (when the model file holds a training history), evaluation.json and report.html.
    logits: the split's fp32 logits if already computed. Returns (metrics, {name: path})."""
    from .report import plot_curves
    from .report_html import timing_and_environment, write_report
    device = torch.device(device or next(model.parameters()).device)
    out = Path(out)
    t0 = time.perf_counter()
    metrics, _ = evaluate(model, info, split, info.class_names, device=device, tta=tta, logits=logits,
                          tta_probs=tta_probs)
    evaluate_seconds = time.perf_counter() - t0
    files = write_evaluation(out, model, info, split, metrics)
    arch = info.name
    if info.history:
        files["curves"] = plot_curves(info.history, out / "curves.png", title=f"{arch} on {data_name}")
    metrics.update({"split": split_name, "data": data_name, "out": str(out), "evaluate_seconds": evaluate_seconds})
    files["evaluation_json"] = out / "evaluation.json"
    write_text_atomic(files["evaluation_json"], json.dumps(metrics, indent=2))
    files["report"] = write_report(
        out / "report.html", title=title or f"{arch} on {data_name}: {split_name} split",
        model_info=summary(model), info=info, evaluation=metrics, files=files,
        **timing_and_environment(info, device, evaluate_seconds))
    return metrics, files

