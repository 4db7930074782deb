"""Multi-label decisions and metrics, from probabilities (N, K) (one sigmoid per label) and the true
label sets as a 0/1 matrix (N, K). Numbers only (report.py draws).

    average_precision(scores, truth)     per label: the area under the precision-recall steps
    choose_thresholds(probs, truth)      per label, on validation: the threshold with the best F1,
                                         or the lowest reaching a target precision
    multilabel_metrics(probs, truth, thresholds, names)
                                         per-label precision / recall / F1 / AP / support, mAP,
                                         micro and macro F1, subset accuracy, Hamming loss, and each
                                         label's calibration (ECE of its probability)

A binary model (one logit: the probability p of the second class) is decided the same way, by one
threshold chosen on validation, and measured by

    roc_curve(scores, truth)             false and true positive rates at each distinct score
    binary_metrics(p, truth, threshold)  ROC AUC, average precision (the PR curve's area), the
                                         confusion matrix at the threshold, accuracy there and at 0.5

Written in NumPy as evaluate.py's single-label metrics are, one sort per label; the tests check
every figure against scikit-learn's (average_precision_score, f1_score, hamming_loss, ...).
"""
from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 0.5  # for a label whose validation images hold no positive: nothing to tune on


def precision_recall_steps(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, precision, recall) of predicting `score >= threshold` at each
    distinct score of one label. scores, truth: (N,). Ties move together, as in scikit-learn's
    precision_recall_curve. Recall is 0 everywhere when the label has no positive."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order].astype(np.float64)
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each distinct score
    tp = np.cumsum(t)[last_of_tie]
    predicted = last_of_tie + 1.0
    positives = t.sum()
    recall = tp / positives if positives else np.zeros_like(tp)
    return s[last_of_tie], tp / predicted, recall


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """AP = sum over thresholds of (recall gained) x precision, as scikit-learn's
    average_precision_score; None for a label with no positive (no recall to gain)."""
    if not truth.any():
        return None
    _, precision, recall = precision_recall_steps(scores, truth)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def choose_thresholds(probs: np.ndarray, truth: np.ndarray, target_precision: float | None = None) -> np.ndarray:
    """(K,) thresholds, each label's from validation: predicting `p >= threshold` at the F1-best
    threshold, or (target_precision) at the lowest threshold whose precision reaches the target
    (the most recall at that precision; the F1-best where none does), placed midway between that
    score and the next lower one. DEFAULT_THRESHOLD for a label without positives."""
    probs = np.asarray(probs, np.float64)  # the midpoint of two float32 scores is exact in float64 only
    chosen = np.full(probs.shape[1], DEFAULT_THRESHOLD)
    for k in range(probs.shape[1]):
        if not truth[:, k].any():
            continue
        thresholds, precision, recall = precision_recall_steps(probs[:, k], truth[:, k])
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(recall),
                       where=precision + recall > 0)
        best = int(np.argmax(f1))  # the first maximum: the highest threshold among equal F1s
        if target_precision is not None:
            reach = np.flatnonzero(precision >= target_precision)
            best = int(reach[-1]) if len(reach) else best
        # Midway to the next lower score: the same decisions on validation, but no validation image
        # sits on the threshold, where a 1e-7 difference (an ONNX export's) would flip it.
        lower = thresholds[best + 1] if best + 1 < len(thresholds) else 0.0
        chosen[k] = (thresholds[best] + lower) / 2
    return chosen


def label_set(probs: np.ndarray, thresholds: np.ndarray, names: list[str]) -> dict:
    """One image's answer from its probabilities (K,): the labels present (probability >= its
    threshold), most probable first, their probabilities, and every label's probability (what
    `cnnkit predict` writes and `cnnkit serve` answers)."""
    present = [i for i in np.argsort(-probs, kind="stable") if probs[i] >= thresholds[i]]
    return {"labels": [names[i] for i in present], "probabilities": [float(probs[i]) for i in present],
            "label_probabilities": {n: float(p) for n, p in zip(names, probs)}}


def label_calibration(probs: np.ndarray, truth: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of one label's probability: the support-weighted gap between the
    mean probability and the fraction of positives in each of `bins` equal-width bins."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(probs[inside].mean() - truth[inside].mean())
    return float(ece)


def multilabel_metrics(probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray,
                       names: list[str]) -> dict:
    """Every multi-label figure of probs (N, K) against truth (N, K) in {0, 1}, deciding a label
    present when its probability reaches its threshold (K,)."""
    truth = truth.astype(bool)
    predicted = probs >= thresholds[None, :]
    tp = (predicted & truth).sum(0).astype(np.float64)
    n_predicted, support = predicted.sum(0), truth.sum(0)
    precision = np.divide(tp, n_predicted, out=np.zeros_like(tp), where=n_predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    ap = [average_precision(probs[:, k], truth[:, k]) for k in range(len(names))]
    scored = [a for a in ap if a is not None]
    micro_p = tp.sum() / max(n_predicted.sum(), 1)
    micro_r = tp.sum() / max(support.sum(), 1)
    per_label = [{"label": name, "threshold": float(thresholds[k]), "precision": float(precision[k]),
                  "recall": float(recall[k]), "f1": float(f1[k]), "average_precision": ap[k],
                  "support": int(support[k]), "ece": label_calibration(probs[:, k], truth[:, k])}
                 for k, name in enumerate(names)]
    return {
        "n": int(len(truth)),
        "mean_average_precision": float(np.mean(scored)) if scored else None,  # over labels with a positive
        "subset_accuracy": float((predicted == truth).all(1).mean()) if len(truth) else 0.0,
        "hamming_loss": float((predicted != truth).mean()) if truth.size else 0.0,
        "micro": {"precision": float(micro_p), "recall": float(micro_r),
                  "f1": float(2 * micro_p * micro_r / (micro_p + micro_r)) if micro_p + micro_r else 0.0},
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "per_label": per_label,
    }


def roc_curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds) of predicting `score >= threshold` at
    each distinct score, highest first, starting from (0, 0) at threshold inf, as scikit-learn's
    roc_curve(drop_intermediate=False). scores, truth: (N,)."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order].astype(np.float64)
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # as in precision_recall_steps
    tp, fp = np.cumsum(t)[last_of_tie], np.cumsum(1 - t)[last_of_tie]
    positives, negatives = max(t.sum(), 1), max(len(t) - t.sum(), 1)
    return np.r_[0.0, fp / negatives], np.r_[0.0, tp / positives], np.r_[np.inf, s[last_of_tie]]


def binary_metrics(p: np.ndarray, truth: np.ndarray, threshold: float) -> dict:
    """A binary model's figures: p (N,) the second class's probability, truth (N,) in {0, 1}.
    roc_auc and average_precision are None when the split lacks one of the classes."""
    truth = truth.astype(bool)
    predicted = p >= threshold
    cm = np.array([[(~truth & ~predicted).sum(), (~truth & predicted).sum()],
                   [(truth & ~predicted).sum(), (truth & predicted).sum()]])  # rows: true 0/1, columns: predicted
    both = truth.any() and not truth.all()
    fpr, tpr, roc_thresholds = roc_curve(p, truth)
    pr_thresholds, precision, recall = precision_recall_steps(p, truth)
    tp, predicted_pos, positives = cm[1, 1], cm[:, 1].sum(), cm[1].sum()
    prec = tp / predicted_pos if predicted_pos else 0.0
    rec = tp / positives if positives else 0.0
    return {"n": int(len(truth)), "threshold": float(threshold),
            "accuracy": float((predicted == truth).mean()) if len(truth) else 0.0,
            "accuracy_at_half": float(((p >= 0.5) == truth).mean()) if len(truth) else 0.0,
            "precision": float(prec), "recall": float(rec),
            "f1": float(2 * prec * rec / (prec + rec)) if prec + rec else 0.0,
            "roc_auc": float(np.trapezoid(tpr, fpr)) if both else None,
            "average_precision": average_precision(p, truth) if both else None,
            "confusion_matrix": cm.tolist(),
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": roc_thresholds[1:].tolist()},
            "pr": {"precision": precision.tolist(), "recall": recall.tolist(), "thresholds": pr_thresholds.tolist()}}
