"""Evaluation: numbers only (pictures are in report.py; prediction of files is jobs/predict.py).

Everything here reads a model file: its architecture, class names, input size and normalization, so
the preprocessing is the one training used.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from . import conformal
from .data import Columns, Split, load_dataset, with_task
from .errors import CnnkitError
from .inference import class_logits, decide, predict_logits, probabilities, top_k_accuracy
from .modelfile import ModelInfo
from .preprocess import Preprocess

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017


def load_split_for(info: ModelInfo, data: str, split: str, data_dir=None, download: bool | None = None
                   ) -> tuple[Split, list[str]]:
    """The dataset split a model is evaluated on, decoded and split exactly as in training.
    download: whether a built-in dataset may be downloaded (None: as the run's config says)."""
    cfg = info.train_config()
    ds = load_dataset(data, data_dir=data_dir or cfg.data_dir, image_size=info.input.height,
                      download=cfg.download if download is None else download,
                      channels=info.input.channels, val_split=cfg.val_split, test_split=cfg.test_split,
                      seed=cfg.seed, quiet=True, columns=Columns.of(cfg))
    ds = with_task(ds, info.task)  # a model trained with --task: its labels as it saw them
    if ds.class_names != info.class_names:
        raise CnnkitError(f"{data} has classes {ds.class_names[:5]}..., the model was trained on "
                          f"{info.class_names[:5]}...: evaluate on the data it was trained for")
    if split not in ("train", "val", "test"):
        raise CnnkitError("--split must be train, val or test")
    return getattr(ds, split), ds.class_names



def load_model_split(info: ModelInfo, split: str, why: str, download: bool | None = None) -> tuple[Split, str]:
    """(the split, the data's name) of the data a model was trained on, as the run was given it (a label
    file's or folder's path, else a built-in dataset's name); `why` completes the error where it cannot load."""
    data = info.training.get("data") or info.data_name
    if not data:
        raise CnnkitError(f"the model file does not name its dataset, needed to {why}")
    try:
        return load_split_for(info, data, split, download=download)[0], data
    except CnnkitError as e:
        raise CnnkitError(f"cannot load {data} to {why} ({e})") from None

def classification_metrics(probs: np.ndarray, labels: np.ndarray, class_names: list[str],
                           preds: np.ndarray | None = None) -> dict:
    """Top-1/top-5 accuracy, per-class precision/recall/F1/support with macro and weighted averages,
    the confusion matrix (rows: true class, columns: predicted), and calibration (ECE).
    preds: the decided classes (N,) where they are not the most probable (a binary model's threshold)."""
    k = len(class_names)
    preds = probs.argmax(1) if preds is None else preds
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    per_class = [{"class": c, "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                  "support": int(support[i])} for i, c in enumerate(class_names)]
    weights = support / max(support.sum(), 1)
    averages = {"macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
                "weighted": {"precision": float((precision * weights).sum()), "recall": float((recall * weights).sum()),
                             "f1": float((f1 * weights).sum())}}
    row_sums = cm.sum(1, keepdims=True)
    off = [(int(cm[i, j]), class_names[i], class_names[j]) for i in range(k) for j in range(k) if i != j and cm[i, j]]
    confused = [{"true": t, "predicted": p, "count": n} for n, t, p in sorted(off, key=lambda x: -x[0])[:10]]
    result = {"n": int(len(labels)), "accuracy": float((preds == labels).mean()) if len(labels) else 0.0,
              "per_class": per_class, "averages": averages, "confusion_matrix": cm.tolist(),
              "confusion_matrix_normalized": np.divide(cm, row_sums, out=np.zeros((k, k)), where=row_sums > 0).tolist(),
              "most_confused": confused, **calibration(probs, labels)}
    if k >= 5:
        result["top5_accuracy"] = top_k_accuracy(probs, labels, 5)
    return result


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error: the support-weighted gap between confidence and accuracy per bin."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    rows, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            acc, mean_conf = float(correct[inside].mean()), float(conf[inside].mean())
            ece += inside.mean() * abs(acc - mean_conf)
            rows.append({"low": float(lo), "high": float(hi), "count": int(inside.sum()), "accuracy": acc,
                         "confidence": mean_conf})
    return {"ece": float(ece), "reliability": rows}


def misclassified(probs: np.ndarray, labels: np.ndarray, class_names: list[str], paths: list[str] | None,
                  limit: int = 50, preds: np.ndarray | None = None) -> list[dict]:
    """The worst mistakes, by cross-entropy loss: highest first (preds: as classification_metrics)."""
    preds = probs.argmax(1) if preds is None else preds
    wrong = np.flatnonzero(preds != labels)
    loss = -np.log(np.clip(probs[wrong, labels[wrong]], 1e-12, 1))
    order = wrong[np.argsort(-loss)][:limit]
    return [{"index": int(i), "path": paths[i] if paths else "", "true": class_names[labels[i]],
             "predicted": class_names[preds[i]], "probability": float(probs[i, preds[i]]),
             "true_probability": float(probs[i, labels[i]]),
             "loss": float(-np.log(max(probs[i, labels[i]], 1e-12)))} for i in order]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimizing the NLL of softmax(logits / T) (Guo et al. 2017), fitted on the
    validation split: one number that makes the probabilities honest without changing any argmax."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss
    opt.step(closure)
    return float(log_t.exp().clamp(0.05, 20).item())


def evaluate(model: torch.nn.Module, info: ModelInfo, split: Split, class_names: list[str],
             device: torch.device = torch.device("cpu"), tta: bool = False,
             logits: torch.Tensor | None = None, tta_probs: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """(metrics, probabilities (N, K)) of `model` on `split`, in fp32, with the model file's
    temperature. Also reports ECE before temperature scaling, and with tta the TTA accuracy beside.
    logits / tta_probs: the split's fp32 logits and TTA probabilities when the caller has them already
    (train's test pass)."""
    labels = split.labels.numpy()
    temperature = info.temperature
    model = model.eval().to(memory_format=torch.channels_last)
    if logits is None:  # one pass serves both calibrations
        logits = predict_logits(model, split.images, Preprocess.from_info(info, channels_last=True).to(device), device)
    model_logits, logits = logits, class_logits(logits, info.task)  # a binary model's one logit as two classes'
    raw = F.softmax(logits, dim=1).numpy().astype(np.float64)
    probs = F.softmax(logits / temperature, dim=1).numpy().astype(np.float64)
    preds = decide(probs, info)
    metrics = classification_metrics(probs, labels, class_names, preds)
    metrics["temperature"] = temperature
    metrics["ece_uncalibrated"] = calibration(raw, labels)["ece"]
    metrics["loss"] = (float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1)).mean())
                       if len(labels) else 0.0)
    if tta:  # reported beside, not instead: TTA averages make probabilities less confident
        if tta_probs is None:
            tta_probs = probabilities(model, info, split.images, tta=True, device=device, logits=model_logits)
        metrics["tta_accuracy"] = float((decide(tta_probs, info) == labels).mean())
        if len(class_names) >= 5:
            metrics["tta_top5_accuracy"] = top_k_accuracy(tta_probs, labels, 5)
    metrics["misclassified"] = misclassified(probs, labels, class_names, split.paths, preds=preds)
    if info.task == "binary":  # ROC and PR curves, AUCs, the threshold's confusion matrix, accuracy at 0.5 beside
        from .multilabel import binary_metrics
        metrics["task"] = "binary"
        metrics["binary"] = binary_metrics(probs[:, 1], labels, info.decision_thresholds[0])
    if info.conformal is not None:  # prediction sets at 0.90 / 0.95 / 0.99: coverage and mean size on this split
        metrics["conformal"] = conformal.held_out_figures(info.conformal, probs, labels)
    return metrics, probs


def conformal_from_validation(info: ModelInfo, run) -> tuple[dict, str]:
    """(conformal record, a line saying where it came from) for a model file written before cnnkit stored
    one: its validation split's scores, through `run` (uint8 images (N, C, H, W) -> calibrated
    probabilities (N, K), any runtime); a one-line error where that data cannot be loaded."""
    split, data = load_model_split(info, "val", "compute prediction sets (this model file holds no conformal "
                                               "calibration: it was written before cnnkit stored one)")
    n = len(split)  # read in slices: a disk-backed split (data.DiskImages) is not one array
    probs = np.concatenate([run(split.images[i:i + 512].numpy()) for i in range(0, n, 512)]) if n else \
        np.zeros((0, info.num_classes))
    note = f"conformal calibration computed now from {n:,} validation images of {data} (the file holds none)"
    return conformal.fit(probs, split.labels.numpy()), note


def evaluate_multi_label(model: torch.nn.Module, info: ModelInfo, split: Split, class_names: list[str],
                         device: torch.device = torch.device("cpu"),
                         probs: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """(metrics, probabilities (N, K)) of a multi-label model on `split`, in fp32: every figure of
    multilabel.multilabel_metrics at the model file's thresholds, and macro F1 and subset accuracy
    at 0.5 beside (what the thresholds chose against). probs: the split's sigmoid outputs when the
    caller has them already (train's test pass)."""
    from .multilabel import multilabel_metrics
    if probs is None:
        model = model.eval().to(memory_format=torch.channels_last)
        preprocess = Preprocess.from_info(info, channels_last=True).to(device)
        probs = torch.sigmoid(predict_logits(model, split.images, preprocess, device, "fp32")).numpy()
    truth = split.labels.numpy()
    thresholds = np.array(info.decision_thresholds)
    metrics = {"task": "multi-label", **multilabel_metrics(probs, truth, thresholds, class_names)}
    at_half = multilabel_metrics(probs, truth, np.full(len(class_names), 0.5), class_names)
    metrics["at_half"] = {"macro_f1": at_half["macro"]["f1"], "subset_accuracy": at_half["subset_accuracy"]}
    return metrics, probs

