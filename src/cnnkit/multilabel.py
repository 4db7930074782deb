"""Multi-label decisions and metrics, from probabilities (N, K) (one sigmoid per label) and the true
label sets as a 0/1 matrix (N, K). Numbers only (report.py draws).

    average_precision(scores, truth)     per label: the area under the precision-recall steps
    choose_thresholds(probs, truth)      per label, on validation: the threshold with the best F1,
                                         or the lowest reaching a target precision
    multilabel_metrics(probs, truth, thresholds, names)
                                         per-label precision / recall / F1 / AP / support, mAP,
                                         micro and macro F1, subset accuracy, Hamming loss, and each
                                         label's calibration (ECE of its probability)

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
    (the most recall at that precision; the F1-best where none does). DEFAULT_THRESHOLD for a label
    without positives."""
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
        chosen[k] = thresholds[best]
    return chosen


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
