"""A binary model (one logit, a threshold chosen on validation) against the two-class softmax model,
on the same data, recipe and seeds: the issue's check that the binary task costs no accuracy.

    python -m benchmarks.data.binary_vs_softmax [--data ../shared/data/hymenoptera] [--seeds 3]
                                                [--recipe fast] [--out DIR]

Prints, per seed and as medians over the seeds, the softmax model's test accuracy and the binary
model's at its threshold and at 0.5, with its threshold, ROC AUC and average precision. Every run is a
whole `cnnkit train` command; both kinds of a seed run one after the other, so a drift in the machine's
speed touches both alike (only accuracy is compared here, not time).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import SHARED_DATA, cnnkit_train, machine_header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_DATA / "hymenoptera"))
    parser.add_argument("--recipe", default="fast")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=None, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out or tmp)
        rows = []
        for seed in range(args.seeds):
            common = ["--data", args.data, "--recipe", args.recipe, "--seed", str(seed)]
            softmax, _ = cnnkit_train(common, base / f"softmax-{seed}")
            binary, _ = cnnkit_train([*common, "--task", "binary"], base / f"binary-{seed}")
            rows.append((softmax["test_accuracy"], binary["test_accuracy"], binary["test_accuracy_at_half"],
                         binary["test_threshold"], binary["test_roc_auc"], binary["test_average_precision"]))
            print(f"seed {seed}: softmax {rows[-1][0]:.4f} | binary {rows[-1][1]:.4f} at threshold {rows[-1][3]:.3f}, "
                  f"{rows[-1][2]:.4f} at 0.5, ROC AUC {rows[-1][4]:.4f}, AP {rows[-1][5]:.4f} "
                  f"({binary['test_n']} {binary['test_split']} images)", flush=True)
    med = [statistics.median(col) for col in zip(*rows)]
    print(f"median of {args.seeds} seeds, {args.recipe} recipe on {Path(args.data).name}: "
          f"softmax accuracy {med[0]:.4f}; "
          f"binary {med[1]:.4f} at its threshold ({med[1] - med[0]:+.4f}), {med[2]:.4f} at 0.5 "
          f"({med[2] - med[0]:+.4f}); ROC AUC {med[4]:.4f}, average precision {med[5]:.4f}")


if __name__ == "__main__":
    machine_header()
    main()
