"""Two models on the same test images: the accuracy difference with a confidence interval, and
McNemar's exact test on the images where exactly one of them is right (numbers only).

Why paired statistics: both models see the same images, so what carries information is where they
disagree. With b images only A gets right and c only B gets right, under "equally accurate" each
disagreement is a fair coin: McNemar's exact test is the two-sided binomial test of b against
b + c at p = 1/2 (SciPy's binomtest). The difference of accuracies is (b - c) / n; its 95%
interval is the Wald interval for paired proportions, var = ((b + c) - (b - c)^2 / n) / n^2.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import CnnkitError

Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile
ALPHA = 0.05  # "significant" below this p-value


def paired_comparison(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """correct_a, correct_b: (N,) booleans, whether each model got each test image right."""
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise CnnkitError("the two models must be compared on the same, non-empty set of test images")
    n = len(a)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    both, neither = int((a & b).sum()), int((~a & ~b).sum())
    diff = (only_a - only_b) / n
    var = ((only_a + only_b) - (only_a - only_b) ** 2 / n) / n ** 2
    half = Z_95 * math.sqrt(max(var, 0.0))
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(binomtest(only_a, discordant, 0.5, alternative="two-sided").pvalue)
    return {"n": n, "accuracy_a": float(a.mean()), "accuracy_b": float(b.mean()), "difference": diff,
            "difference_ci95": [diff - half, diff + half], "only_a_right": only_a, "only_b_right": only_b,
            "both_right": both, "both_wrong": neither, "mcnemar_p_value": p, "significant": p < ALPHA,
            "test": "McNemar's exact test (two-sided binomial test of the discordant pairs at p = 1/2)"}


def verdict(result: dict, name_a: str = "A", name_b: str = "B", measure: str = "accuracy") -> str:
    """One sentence a person can act on. measure: what "right" is ("subset accuracy": exact label sets)."""
    lo, hi = result["difference_ci95"]
    diff = f"{100 * result['difference']:+.2f} points (95% CI {100 * lo:+.2f} to {100 * hi:+.2f})"
    p = f"McNemar p = {result['mcnemar_p_value']:.3g}"
    if not result["significant"]:
        what = "" if measure == "accuracy" else f" in {measure}"
        return f"{name_a} and {name_b} are not significantly different{what} ({p}): {name_a} minus {name_b} is {diff}."
    better = name_a if result["difference"] > 0 else name_b
    claim = "is significantly more accurate" if measure == "accuracy" else f"has significantly higher {measure}"
    return f"{better} {claim} ({p}): {name_a} minus {name_b} is {diff}."
