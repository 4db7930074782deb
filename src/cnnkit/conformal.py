"""Conformal prediction sets (split conformal): per image, a set of classes that holds the true class
with probability at least the coverage asked, whatever the model, from the calibrated probabilities
(N, K) of a single-label or binary model and the validation split's conformity scores.

Split conformal, in three steps (Angelopoulos and Bates, "A gentle introduction to conformal
prediction", 2021):
1. a score s(x, k) per image and class, large when k looks wrong for x (class_scores);
2. on n validation images, the scores of their true classes, sorted (fit: what the model file
   stores, so predict answers any coverage without the data);
3. for coverage 1 - a, the threshold q = the ceil((n + 1)(1 - a))-th smallest of them (quantile), and
   the set of x = every k with s(x, k) <= q (prediction_masks). If the images to classify are
   exchangeable with the validation images, P(true class in set) >= 1 - a, and below
   1 - a + 1 / (n + 1) when the scores have no ties.
When ceil((n + 1)(1 - a)) > n (a < 1 / (n + 1): too few validation images for the coverage asked),
the threshold would be infinite and every set the whole label list: that is refused in one line
naming the largest coverage this model can give, rather than answered with sets that say nothing.

NumPy only, no torch: `cnnkit predict` on the ONNX runtime never imports PyTorch.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import CnnkitError

REPORT_LEVELS = (0.90, 0.95, 0.99)  # the coverages the report and metrics.json measure on test
MAX_SCORES = 10_000  # validation scores a model file keeps at most (why: fit)
DIGITS = 6  # significant digits a stored score keeps, rounded up (why: fit)

# The scores. Each puts the most probable class at 0, so every set holds the top-1 class: a model
# file's sets never come back empty (plain LAC, 1 - p_k for every class, gives empty sets to the
# images the model is least sure of once its accuracy passes the coverage asked, the opposite of
# what a set is for). Where the model's accuracy already reaches the coverage, the threshold is 0
# and each set is the top-1 class alone: its coverage is then the accuracy, above the target.
#   lac:  1 - p_k for the other classes (the threshold on probability; Sadinle et al. 2019)
#   aps:  the probability mass of the classes more probable than k (Romano et al. 2020, u = 0:
#         deterministic)
#   raps: aps + RAPS_LAMBDA per rank beyond RAPS_KREG (Angelopoulos et al. 2021, u = 0)
# Sets of the three are prefixes of the classes by probability: most probable first.
SCORES = ("lac", "aps", "raps")
RAPS_LAMBDA, RAPS_KREG = 0.01, 1
# The default: lac, the smallest sets at the coverage held on every model measured (mean set size on
# held-out images, 100 random calibration / held-out splits of validation + test, coverage within 0.001 of
# each other; benchmarks/inference/conformal_scores.py, 2-core AMD EPYC):
#                                   0.90                 0.95                 0.99
#   seed-cifar10, CIFAR-10 (58%)    lac 3.00 aps 3.03    lac 4.12 aps 4.16    lac 6.33 aps 6.47 raps 7.20
#   linear, MNIST (92%)             all 1.00             lac 1.12 aps 1.12    lac 2.13 aps 2.20 raps 2.64
#   fast-mnist, MNIST (99.2%)       all 1.00             all 1.00             all 1.00; at 0.999 lac 1.084 aps 1.087
# (raps within 0.01 of aps at 0.90 / 0.95; randomized APS, for reference, 3.26 / 4.24 / 6.64 on CIFAR-10.)
# APS's case is adaptivity, coverage more even across images: the lowest coverage of any one class was
# within 0.004 of lac's on all three, not worth its larger sets. A binary model's two classes make the
# three scores the same sets (the other class's score is p_top under each, plus raps's constant).
DEFAULT_SCORE = "lac"


def check_coverage(coverage: float, what: str = "--coverage") -> float:
    """coverage as a float in (0, 1), else a one-line error (nan fails both comparisons)."""
    try:
        c = float(coverage)
    except (TypeError, ValueError):
        raise CnnkitError(f"{what} must be a number between 0 and 1 (e.g. 0.95), not {coverage!r}") from None
    if not 0 < c < 1:
        raise CnnkitError(f"{what} must be between 0 and 1, exclusive (e.g. 0.95), not {coverage}")
    return c


def class_scores(probs: np.ndarray, score: str = DEFAULT_SCORE) -> np.ndarray:
    """s(x, k) (N, K) for probabilities (N, K): 0 for each row's most probable class, larger for the
    classes that look less right (the scores above)."""
    if score not in SCORES:
        raise CnnkitError(f"unknown conformal score {score!r} (one of {', '.join(SCORES)}; written by a newer "
                          "cnnkit? upgrade cnnkit)")
    probs = np.asarray(probs, dtype=np.float64)
    n, k = probs.shape
    order = np.argsort(-probs, axis=1, kind="stable")  # (N, K): classes by probability, most probable first
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(k)[None].repeat(n, 0), axis=1)  # (N, K): 0 for the top class
    if score == "lac":
        s = 1 - probs
    else:
        above = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1) - np.take_along_axis(probs, order, 1)
        s = np.take_along_axis(above, rank, axis=1)  # the mass of the classes ranked above k
        if score == "raps":
            s = s + RAPS_LAMBDA * np.maximum(rank + 1 - RAPS_KREG, 0)
    return np.where(rank == 0, 0.0, np.maximum(s, 0.0))  # max: 1 - p rounds below 0 for p = 1 + 1 ulp


def conformity_scores(probs: np.ndarray, labels: np.ndarray, score: str = DEFAULT_SCORE) -> np.ndarray:
    """(N,) the score of each image's true class."""
    labels = np.asarray(labels, dtype=np.int64)
    return class_scores(probs, score)[np.arange(len(labels)), labels]


def rank_for(n: int, coverage: float) -> int:
    """ceil((n + 1) * coverage): the 1-based rank of the threshold among n sorted scores (may exceed n)."""
    # the product rounded to 9 digits first: (n + 1) * 0.95 lands at 951.0000000000001 for n = 1000
    return math.ceil(round((n + 1) * coverage, 9))


def max_coverage(n: int) -> float:
    """The largest coverage n validation scores can give a finite threshold for: n / (n + 1)."""
    return n / (n + 1)


def quantile(scores: np.ndarray, coverage: float) -> float:
    """The threshold for coverage 1 - a: the ceil((n + 1)(1 - a))-th smallest of the scores (any
    order); a one-line error when that rank passes n (too few scores for the coverage asked)."""
    coverage = check_coverage(coverage)
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n, r = len(s), rank_for(len(s), coverage)
    if r > n:
        need = max(1, math.floor(coverage / (1 - coverage)) - 1)
        while rank_for(need, coverage) > need:  # the smallest n for which ceil((n + 1) c) <= n
            need += 1
        raise CnnkitError(f"coverage {coverage:g} needs at least {need:,} calibration images; this model was "
                          f"calibrated on {n:,}, enough for at most {math.floor(max_coverage(n) * 1e4) / 1e4:g}")
    return float(s[r - 1])


def prediction_masks(probs: np.ndarray, threshold: float, score: str = DEFAULT_SCORE) -> np.ndarray:
    """(N, K) bool: class k is in image i's set when s(x_i, k) <= threshold."""
    return class_scores(probs, score) <= threshold


def prediction_sets(probs: np.ndarray, threshold: float, score: str = DEFAULT_SCORE) -> list[list[int]]:
    """Each image's set as class indices, most probable first (ties: the lower index first)."""
    masks = prediction_masks(probs, threshold, score)
    order = np.argsort(-np.asarray(probs), axis=1, kind="stable")
    return [[int(k) for k in row if keep[k]] for row, keep in zip(order, masks)]


# ----------------------------------------------------------------------------- the model file's record
def fit(probs: np.ndarray, labels: np.ndarray, score: str = DEFAULT_SCORE, seed: int = 0) -> dict:
    """The record a model file keeps, {score, scores}: the validation images' conformity scores,
    sorted, so predict finds the threshold for any coverage (quantile). Each score is rounded UP
    to DIGITS significant digits: the threshold can only grow by that rounding, so coverage stays
    guaranteed, at half the JSON of a float's 17 digits. More than MAX_SCORES images: a random
    MAX_SCORES of them (a random subset is as exchangeable with new images as the whole split, so the
    guarantee holds with n = MAX_SCORES; beyond 10,000 the threshold's sampling error at 0.99,
    sqrt(0.99 * 0.01 / n) = 0.001, is already below what the coverage figures show), recorded as
    `sampled_from`. The header then grows by 140 KB at most (10,000 scores of up to 13 characters;
    MNIST's 5,999 validation images: 30 KB)."""
    s = conformity_scores(probs, labels, score)
    record: dict = {"score": score}
    if len(s) > MAX_SCORES:
        record["sampled_from"] = len(s)
        s = np.random.default_rng(seed).choice(s, MAX_SCORES, replace=False)
    record["scores"] = [round_up(v) for v in np.sort(s)]
    return record


def round_up(value: float) -> float:
    """The smallest float of DIGITS significant digits >= value (0 stays 0)."""
    v = float(value)
    for step in (0, 1, 2):  # the nearest 6-digit number, else the next one up
        up = float(f"{v * (1 + step * 10.0 ** -DIGITS):.{DIGITS}g}")
        if up >= v:
            return up
    return v


def check_record(record, where: str) -> dict | None:
    """A model file's conformal record, checked for shape (None stays None); a one-line error naming
    `where` otherwise. The score name is checked where it is used (class_scores), so an unknown one
    says to upgrade."""
    if record is None:
        return None
    scores = record.get("scores") if isinstance(record, dict) else None
    if not (isinstance(record, dict) and isinstance(record.get("score"), str) and isinstance(scores, list)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scores)):
        raise CnnkitError(f"{where} has broken metadata: calibration.conformal must give a score name and a list of "
                          "finite scores")
    return record


def record_threshold(record: dict, coverage: float) -> float:
    """The threshold a model file's record gives for `coverage`."""
    return quantile(np.asarray(record["scores"]), coverage)


def record_sets(record: dict, probs: np.ndarray, coverage: float) -> list[list[int]]:
    """Each image's set (class indices, most probable first) at `coverage`, from a model file's record."""
    return prediction_sets(probs, record_threshold(record, coverage), record["score"])


def held_out_figures(record: dict, probs: np.ndarray, labels: np.ndarray, levels=REPORT_LEVELS) -> dict:
    """{score, calibration_images, levels: [{coverage, empirical_coverage, mean_set_size,
    threshold}]} on a held-out split; a level the calibration is too small for gets a `note`
    instead of figures (quantile's reason)."""
    labels = np.asarray(labels, dtype=np.int64)
    rows = []
    for c in levels:
        try:
            q = record_threshold(record, c)
            if not len(labels):
                raise CnnkitError("no images to measure on")
        except CnnkitError as e:
            rows.append({"coverage": c, "note": str(e)})
            continue
        masks = prediction_masks(probs, q, record["score"])  # (N, K)
        rows.append({"coverage": c, "empirical_coverage": float(masks[np.arange(len(labels)), labels].mean()),
                     "mean_set_size": float(masks.sum(1).mean()), "threshold": q})
    return {"score": record["score"], "calibration_images": len(record["scores"]), "n": int(len(labels)),
            "levels": rows}
