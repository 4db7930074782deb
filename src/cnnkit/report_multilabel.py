"""report.html of a multi-label model (one sigmoid per label; label k present when p_k reaches the
model file's thresholds[k]): the figures of evaluate.evaluate_multi_label, the per-label table,
precision-recall curves, co-occurrence of true and predicted labels, each label's worst-scored
images with Grad-CAM for that label, and the training, model and data sections single-label
reports have. The end of a multi-label `cnnkit train` and `cnnkit evaluate` write the same files.

matplotlib is imported only when a picture is drawn (report.py)."""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .data import Split, is_label_file
from .errors import CnnkitError
from .evaluate import evaluate_multi_label
from .modelfile import ModelInfo
from .models.summary import summary
from .multilabel import precision_recall_steps
from .preprocess import Preprocess
from .report_html import (card_row, closing_sections, esc, image_tag, pct, relative, table, timing_and_environment,
                          training_section, write_page)
from .utils import write_csv
from .version import __version__

PER_LABEL = 4  # worst images per label, when the labels are few
GALLERY_CAP = 40  # images in the worst-images gallery, all labels together (each with its Grad-CAM)
PR_PANELS = 20  # labels drawn in the precision-recall figure; beyond, the lowest-AP ones


# ----------------------------------------------------------------------------- numbers
def cooccurrence(truth: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true x predicted, true x true), both (K, K) int64 from 0/1 matrices (N, K): cell [i, j] of
    the first counts the images holding label i that were given label j (the diagonal: each label's
    true positives); of the second, the images holding both i and j (the diagonal: each support)."""
    t, p = truth.astype(np.int64), predicted.astype(np.int64)
    return t.T @ p, t.T @ t


def label_set(row: np.ndarray, names: list[str]) -> list[str]:
    return [n for n, present in zip(names, row) if present]


def worst_per_label(probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray, names: list[str],
                    paths: list[str] | None, per_label: int) -> list[dict]:
    """Per label, its `per_label` worst mistakes at its threshold, the largest error first: missed
    positives by 1 - p (the lowest probabilities), false positives by p (the highest). probs,
    truth: (N, K); rows in label order."""
    truth = truth.astype(bool)
    predicted = probs >= thresholds[None, :]
    rows = []
    for k, name in enumerate(names):
        wrong = np.flatnonzero(predicted[:, k] != truth[:, k])
        error = np.where(truth[wrong, k], 1 - probs[wrong, k], probs[wrong, k])
        for i in wrong[np.argsort(-error, kind="stable")][:per_label]:
            rows.append({"label": name, "index": int(i), "path": paths[i] if paths else "",
                         "kind": "missed" if truth[i, k] else "false positive", "probability": float(probs[i, k]),
                         "threshold": float(thresholds[k]), "true": label_set(truth[i], names),
                         "predicted": label_set(predicted[i], names)})
    return rows


def label_heatmaps(model: nn.Module, info: ModelInfo, images: torch.Tensor, rows: list[dict]) -> torch.Tensor | None:
    """Grad-CAM (N, H, W) of each row's image for the row's label (its logit), or None for a model
    without convolutions."""
    from .explain import gradcam
    if not rows:
        return None
    device = next(model.parameters()).device
    x = Preprocess.from_info(info).to(device)(images[torch.tensor([r["index"] for r in rows])].to(device))
    labels = torch.tensor([info.class_names.index(r["label"]) for r in rows], device=device)
    try:
        heat, _ = gradcam(model.eval(), x, labels)
    except CnnkitError:  # linear and MLP models: nothing spatial to explain
        return None
    return heat.cpu()


# ----------------------------------------------------------------------------- files
def pr_curves(probs: np.ndarray, truth: np.ndarray, metrics: dict) -> list[dict]:
    """What report.plot_pr_curves draws, for up to PR_PANELS labels (the lowest AP when there are more)."""
    rows = metrics["per_label"]
    keep = range(len(rows))
    if len(rows) > PR_PANELS:
        keep = sorted(sorted(keep, key=lambda k: -1 if rows[k]["average_precision"] is None
                             else rows[k]["average_precision"])[:PR_PANELS])
    curves = []
    for k in keep:
        _, precision, recall = precision_recall_steps(probs[:, k], truth[:, k])
        row = rows[k]
        curves.append({"label": row["label"], "recall": recall, "precision": precision,
                       "ap": row["average_precision"], "threshold": row["threshold"],
                       "point": (row["recall"], row["precision"])})
    return curves


def gallery_rows(worst: list[dict], names: list[str]) -> tuple[list[tuple[str, list[dict]]], list[dict]]:
    """([(label, items)] for report.plot_label_gallery, the items in order), labels in class order
    until GALLERY_CAP images."""
    rows, drawn = [], []
    for name in names:
        items = [{**w, "caption": f'{"missed" if w["kind"] == "missed" else "false +"} p={w["probability"]:.2f}\n'
                                  f'{short(w["true"])} → {short(w["predicted"])}'}
                 for w in worst if w["label"] == name]
        if len(drawn) + max(1, len(items)) > GALLERY_CAP:
            break
        rows.append((name, items))
        drawn += items
    return rows, drawn


def short(labels: list[str], width: int = 18) -> str:
    text = " ".join(labels) or "none"
    return text if len(text) <= width else text[:width - 1] + "…"


def write_multi_label_files(out: Path, model: nn.Module, info: ModelInfo, split: Split, probs: np.ndarray,
                            metrics: dict) -> dict[str, Path]:
    """The pictures and tables of a multi-label evaluation: PR curves, the two co-occurrence matrices
    (PNG and CSV), the worst images per label (PNG with Grad-CAM, CSV). {name: path}."""
    from . import report
    names = info.class_names
    truth = split.labels.numpy()
    files = {"pr_curves": report.plot_pr_curves(pr_curves(probs, truth, metrics), out / "pr_curves.png")}
    true_pred, true_true = (np.asarray(m) for m in (metrics["cooccurrence"]["true_predicted"],
                                                   metrics["cooccurrence"]["true_true"]))
    for key, m, what, axes in (("cooccurrence", true_pred, "true label (row) and predicted label (column)",
                                ("predicted", "true")),
                               ("cooccurrence_true", true_true, "true labels", ("true", "true"))):
        files[f"{key}_csv"] = out / f"{key}.csv"
        corner = "true \\ predicted" if key == "cooccurrence" else "true \\ true"
        write_csv(files[f"{key}_csv"], [corner, *names], [[n, *row] for n, row in zip(names, m.tolist())])
        files[key] = report.plot_confusion_matrix(m, names, out / f"{key}.png", title=f"images with {what}",
                                                  axes=axes)
    worst = metrics["worst_per_label"]
    files["worst_csv"] = out / "worst_per_label.csv"
    write_csv(files["worst_csv"], ["label", "kind", "index", "path", "probability", "threshold", "true", "predicted"],
              [[w["label"], w["kind"], w["index"], w["path"], f'{w["probability"]:.6f}', f'{w["threshold"]:.6f}',
                " ".join(w["true"]), " ".join(w["predicted"])] for w in worst])
    rows, drawn = gallery_rows(worst, names)
    per_row = max([len(items) for _, items in rows] + [1])
    files["worst"] = report.plot_label_gallery(split.images, rows, out / "worst_per_label.png", per_row,
                                               heatmaps=label_heatmaps(model, info, split.images, drawn))
    return files


def evaluate_and_report_multi_label(model: nn.Module, info: ModelInfo, split: Split, out: str | Path, *,
                                    data_name: str, split_name: str = "test", device: torch.device | str | None = None,
                                    title: str | None = None, probs: np.ndarray | None = None
                                    ) -> tuple[dict, dict[str, Path]]:
    """Evaluate a multi-label `model` on `split` at its thresholds and write into `out` the files of
    write_multi_label_files, curves.png (with a training history) and report.html. Returns (metrics:
    evaluate_multi_label's plus cooccurrence, worst_per_label, split, data, out, evaluate_seconds;
    {name: path}). probs: the split's sigmoid outputs (N, K) when the caller has them already."""
    from .report import plot_curves
    device = torch.device(device or next(model.parameters()).device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = info.class_names
    t0 = time.perf_counter()
    metrics, probs = evaluate_multi_label(model, info, split, names, device=device, probs=probs)
    truth = split.labels.numpy()
    thresholds = np.array([row["threshold"] for row in metrics["per_label"]])
    true_pred, true_true = cooccurrence(truth, probs >= thresholds[None, :])
    metrics["cooccurrence"] = {"true_predicted": true_pred.tolist(), "true_true": true_true.tolist()}
    per_label = min(PER_LABEL, max(1, GALLERY_CAP // len(names)))
    metrics["worst_per_label"] = worst_per_label(probs, truth, thresholds, names, split.paths, per_label)
    evaluate_seconds = time.perf_counter() - t0
    files = write_multi_label_files(out, model, info, split, probs, metrics)
    if info.history:
        files["curves"] = plot_curves(info.history, out / "curves.png", title=f"{info.name} on {data_name}")
    metrics.update({"split": split_name, "data": data_name, "out": str(out), "evaluate_seconds": evaluate_seconds})
    files["report"] = write_multi_label_report(
        out / "report.html", title=title or f"{info.name} on {data_name}: {split_name} split",
        model_info=summary(model), info=info, evaluation=metrics, files=files,
        **timing_and_environment(info, device, evaluate_seconds))
    return metrics, files


# ----------------------------------------------------------------------------- the page
def write_multi_label_report(path: str | Path, *, title: str, model_info: dict, info: ModelInfo, evaluation: dict,
                             files: dict[str, Path], timing: dict, env: dict) -> Path:
    """report.html of a multi-label evaluation (evaluate_and_report_multi_label's metrics and files)."""
    ev = evaluation
    parts = [f"<h1>{esc(title)}</h1>",
             f'<p class="muted">{esc(info.name)} · multi-label, {len(info.class_names)} labels · input '
             f'{esc(str(info.input))} · {esc(ev.get("split", "test"))} split of {esc(ev.get("data", info.data.name))}'
             f' ({ev["n"]:,} images) · written {datetime.now().strftime("%Y-%m-%d %H:%M")} by cnnkit '
             f'{esc(__version__)}</p>',
             card_row(multi_label_cards(ev, model_info, timing))]
    parts += per_label_section(ev)
    parts += pr_section(files)
    parts += cooccurrence_section(files)
    parts += worst_section(ev, files, info.data.source)
    training = training_section(info, files)  # its heading first, then what its accuracy means here
    parts += training[:1] + ['<p class="muted">Accuracy in training is subset accuracy at probability 0.5 (an image '
                             "counts when every label is right).</p>"] + training[1:]
    parts += closing_sections(model_info, info, ev, timing, env)
    return write_page(path, title, parts)


def multi_label_cards(ev: dict, model_info: dict, timing: dict) -> list[tuple[str, str]]:
    m_ap = ev["mean_average_precision"]
    cards = [("mAP", "–" if m_ap is None else f"{m_ap:.4f}"), ("subset accuracy", pct(ev["subset_accuracy"])),
             ("micro F1", f'{ev["micro"]["f1"]:.4f}'), ("macro F1", f'{ev["macro"]["f1"]:.4f}'),
             ("macro F1 at 0.5", f'{ev["at_half"]["macro_f1"]:.4f}'), ("Hamming loss", f'{ev["hamming_loss"]:.4f}'),
             ("images", f'{ev["n"]:,}'), ("parameters", f'{model_info["parameters"]:,}')]
    if timing.get("train_seconds") is not None:
        cards.append(("training time", f'{timing["train_seconds"]:.1f} s'))
    return cards


def per_label_section(ev: dict) -> list[str]:
    def ap(v):
        return "–" if v is None else f"{v:.4f}"
    rows = [[r["label"], f'{r["threshold"]:.3f}', f'{r["precision"]:.4f}', f'{r["recall"]:.4f}', f'{r["f1"]:.4f}',
             ap(r["average_precision"]), r["support"], f'{r["ece"]:.4f}'] for r in ev["per_label"]]
    rows += [[f"{k} avg", "", f'{ev[k]["precision"]:.4f}', f'{ev[k]["recall"]:.4f}', f'{ev[k]["f1"]:.4f}',
              ap(ev["mean_average_precision"]) if k == "macro" else "", "", ""] for k in ("micro", "macro")]
    return ["<h2>Per-label metrics</h2>",
            '<p class="muted">A label is predicted present when its probability reaches its threshold (chosen on '
            "the validation split at the end of training: each label's best F1, or with --target-precision the most "
            "recall at that precision). AP: average precision over every "
            "threshold (the macro row's is the mAP, over labels with a positive). ECE: the label's expected "
            "calibration error, the support-weighted gap between its mean probability and its share of positives "
            f'in 15 bins (no temperature: each probability is its own sigmoid). At 0.5 instead: macro F1 '
            f'{ev["at_half"]["macro_f1"]:.4f}, subset accuracy {pct(ev["at_half"]["subset_accuracy"])}.</p>',
            table(["label", "threshold", "precision", "recall", "F1", "AP", "support", "ECE"], rows)]


def pr_section(files: dict[str, Path]) -> list[str]:
    parts = ["<h2>Precision-recall curves</h2>",
             f'<p class="muted">Precision against recall as each label\'s threshold falls (up to {PR_PANELS} labels, '
             "the lowest AP when there are more); the red dot is the label's chosen threshold.</p>"]
    if "pr_curves" in files:
        parts.append(image_tag(files["pr_curves"], "precision-recall curves per label"))
    return parts


def cooccurrence_section(files: dict[str, Path]) -> list[str]:
    parts = ["<h2>Co-occurrence</h2>",
             '<p class="muted">Rows: true label; columns: predicted label. Each cell counts the images that hold '
             "the row's label and were given the column's: the diagonal is each label's true positives, a cell off "
             "it a label predicted beside one truly there (cooccurrence.csv).</p>"]
    if "cooccurrence" in files:
        parts.append(image_tag(files["cooccurrence"], "co-occurrence of true and predicted labels"))
    parts.append('<p class="muted">Rows and columns: true labels. Each cell counts the images holding both (the '
                 "diagonal is each label's support): which labels the data puts together (cooccurrence_true.csv).</p>")
    if "cooccurrence_true" in files:
        parts.append(image_tag(files["cooccurrence_true"], "co-occurrence of true labels"))
    return parts


def worst_section(ev: dict, files: dict[str, Path], source: str) -> list[str]:
    parts = ["<h2>Worst-scored images per label</h2>"]
    if is_label_file(source):  # a label file's paths are read from its folder: name them from there
        source = str(Path(source).parent)
    worst = ev["worst_per_label"]
    if not worst:
        return parts + ["<p>No mistakes on this split.</p>"]
    parts.append('<p class="muted">Per label, its worst mistakes at its threshold: missed positives with the lowest '
                 "probability and false positives with the highest, each captioned true set → predicted set and "
                 f"beside its Grad-CAM heatmap for that label (the picture shows up to {GALLERY_CAP} images).</p>")
    if "worst" in files:
        parts.append(image_tag(files["worst"], "worst-scored images per label"))
    parts.append(table(["label", "#", "mistake", "p", "threshold", "true", "predicted", f"file (in {source})"],
                       [[w["label"], w["index"], w["kind"], f'{w["probability"]:.3f}', f'{w["threshold"]:.3f}',
                         " ".join(w["true"]) or "none", " ".join(w["predicted"]) or "none",
                         relative(w["path"], source) or "–"] for w in worst],
                       text_columns=(0, 2, 5, 6), wrap_columns=(7,)))
    return parts
