"""Conformal scores compared on real models: mean set size at 0.90 / 0.95 / 0.99 with coverage held
(cnnkit.conformal's choice of its default score).

    python -m benchmarks.inference.conformal_scores RUN [RUN ...] [--splits 100] [--levels 0.9,0.95,0.99]

For each run folder (a single-label or binary model whose data loads as in training), the calibrated
probabilities of its validation and test splits; then, for each score, calibration on the validation
split and sets on the test split (what a model file does), and the mean over --splits random
re-splits of the validation + test pool into a calibration part of the validation split's size and a
held-out rest (steadier figures; every score sees the same re-splits, so their sizes compare paired).
Printed per score and coverage: the held-out coverage, mean set size, share of empty sets and the
lowest coverage of any one class (a sign of how even the coverage is).

The scores: cnnkit's three (lac, aps, raps: the top class at 0, so no set is empty), and two references
cnnkit does not use: plain LAC (1 - p for every class: empty sets) and randomized APS (Romano et al.
2020, u ~ U(0, 1) per image: exact coverage, but a set that changes from one call to the next).

Last, the temperature's share: the same coverage with the temperature fitted on the calibration images
themselves (as cnnkit does, on the validation split) against one fitted on disjoint images, both
calibrated on half the validation split, over the same number of random halvings.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from benchmarks.common import machine_header
from cnnkit import conformal
from cnnkit.evaluate import fit_temperature, load_split_for
from cnnkit.inference import class_logits, predict_logits
from cnnkit.modelfile import load_model
from cnnkit.preprocess import Preprocess

def logits_of(run: str):
    """(info, val logits (N, K), val labels, test logits, test labels) of a run, in fp32."""
    model, info = load_model(run)
    data = info.training.get("data") or info.data_name
    out = [info]
    for name in ("val", "test"):
        split, _ = load_split_for(info, data, name)
        z = class_logits(predict_logits(model, split.images, Preprocess.from_info(info)), info.task)
        out += [z, split.labels.numpy()]
    return out


def softmax(z: torch.Tensor, t: float) -> np.ndarray:
    return torch.softmax(z / t, dim=1).numpy().astype(np.float64)  # as inference.probabilities: fp32, then float64


def masks(name: str, cal_p, cal_y, p, c: float, rng) -> np.ndarray | None:
    """(N, K) sets at coverage c of `name`, calibrated on (cal_p, cal_y); None when n is too small."""
    n = len(cal_y)
    r = conformal.rank_for(n, c)
    if r > n:
        return None
    if name in conformal.SCORES:
        return conformal.prediction_masks(p, conformal.quantile(conformal.conformity_scores(cal_p, cal_y, name), c),
                                          name)
    if name == "lac-plain":
        q = np.sort(1 - cal_p[np.arange(n), cal_y])[r - 1]
        return 1 - p <= q
    # randomized APS: s = mass above + u * p_k
    def scores(probs, u):
        order = np.argsort(-probs, axis=1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, 1)
        above = np.cumsum(sorted_p, 1) - sorted_p
        rank = np.argsort(order, axis=1)
        return np.take_along_axis(above, rank, 1) + u[:, None] * probs
    q = np.sort(scores(cal_p, rng.random(n))[np.arange(n), cal_y])[r - 1]
    return scores(p, rng.random(len(p))) <= q


def figures(m: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    hit = m[np.arange(len(y)), y]
    per_class = [hit[y == k].mean() for k in np.unique(y)]
    return hit.mean(), m.sum(1).mean(), (m.sum(1) == 0).mean(), min(per_class)


def compare(run: str, splits: int, levels: list[float]) -> None:
    info, vz, vy, tz, ty = logits_of(run)
    vp, tp = softmax(vz, info.temperature), softmax(tz, info.temperature)
    acc = (tp.argmax(1) == ty).mean()
    print(f"\n{run}: {info.name} on {info.data_name}, {info.task}, {info.num_classes} classes, "
          f"T {info.temperature:.3f}, test top-1 {acc:.4f}; {len(vy)} validation (calibration), {len(ty)} test images")
    pool_p, pool_y = np.concatenate([vp, tp]), np.concatenate([vy, ty])
    rng = np.random.default_rng(0)
    resplits = [rng.permutation(len(pool_y)) for _ in range(splits)]  # the same for every score
    print(f"{'score':<11}{'coverage':>9} | val->test: {'covered':>8}{'size':>7}{'empty':>7}{'worst class':>12} | "
          f"{splits} re-splits: {'covered':>8} {'+-sd':>6}{'size':>7}{'worst class':>12}")
    for name in (*conformal.SCORES, "lac-plain", "aps-random"):
        for c in levels:
            m = masks(name, vp, vy, tp, c, rng)
            if m is None:
                print(f"{name:<11}{c:>9g} | too few calibration images")
                continue
            cov, size, empty, worst = figures(m, ty)
            again = []
            for idx in resplits:
                cal, held = idx[:len(vy)], idx[len(vy):]
                again.append(figures(masks(name, pool_p[cal], pool_y[cal], pool_p[held], c, rng), pool_y[held]))
            a = np.array(again)
            print(f"{name:<11}{c:>9g} | {'':>11}{cov:>8.4f}{size:>7.3f}{empty:>7.3f}{worst:>12.4f} | "
                  f"{'':>12}{a[:, 0].mean():>8.4f} {a[:, 0].std():>6.4f}{a[:, 1].mean():>7.3f}{a[:, 3].mean():>12.4f}")
    temperature_share(vz, vy, tz, ty, splits, levels)


def temperature_share(vz, vy, tz, ty, splits: int, levels: list[float]) -> None:
    """Test coverage of the default score calibrated on half B of the validation split, with T fitted on
    B itself against T fitted on the other half A."""
    rng = np.random.default_rng(1)
    rows = {"same": [], "disjoint": []}
    for _ in range(splits):
        idx = rng.permutation(len(vy))
        a, b = idx[:len(vy) // 2], idx[len(vy) // 2:]
        vyt = torch.as_tensor(vy)
        for kind, fit_on in (("same", b), ("disjoint", a)):
            t = fit_temperature(vz[fit_on], vyt[fit_on])
            cal_p, p = softmax(vz[b], t), softmax(tz, t)
            rows[kind].append([figures(masks(conformal.DEFAULT_SCORE, cal_p, vy[b], p, c, rng), ty)[:2]
                               if conformal.rank_for(len(b), c) <= len(b) else (np.nan, np.nan) for c in levels])
    print(f"temperature fitted on the calibration half itself against a disjoint half ({conformal.DEFAULT_SCORE}, "
          f"{len(vy) - len(vy) // 2} calibration images, {splits} halvings; test coverage / mean size):")
    for j, c in enumerate(levels):
        same, other = np.array(rows["same"])[:, j], np.array(rows["disjoint"])[:, j]
        print(f"  {c:g}: same {same[:, 0].mean():.4f} / {same[:, 1].mean():.3f}   "
              f"disjoint {other[:, 0].mean():.4f} / {other[:, 1].mean():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders of single-label or binary models")
    parser.add_argument("--splits", type=int, default=100, help="random re-splits of validation + test")
    parser.add_argument("--levels", default=",".join(map(str, conformal.REPORT_LEVELS)), help="coverages, commas")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    for run in args.runs:
        compare(run, args.splits, [float(c) for c in args.levels.split(",")])
    sys.stdout.flush()


if __name__ == "__main__":
    machine_header()
    main()
