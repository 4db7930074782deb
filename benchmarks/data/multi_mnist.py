"""Multi-MNIST: a multi-label dataset of real pixels. Each 56x56 image holds 1 to 3 different MNIST
digits, each in its own quadrant (jittered by up to 4 px, overlaps combined by maximum), and its
label set is the digits present. Training images are drawn from MNIST's training set, test images
from its test set, so no digit image is in both. Written as PNG files plus labels.csv
(path,labels,split with labels like "3;7"), seeded: the same seed writes the same files.

    python -m benchmarks.data.multi_mnist --out DIR [--train 10000] [--test 2000] [--seed 0] [--baseline]
                                          [--train-recipe [--seeds N] [--pos-weight]] [--rare W]

--baseline also fits the reference a CNN must beat: one logistic regression per digit on the
normalized pixels (scikit-learn), and prints its test mAP and subset accuracy. --train-recipe runs
`cnnkit train --recipe multi-mnist` on the files as a whole command and prints its figures beside.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import SHARED_DATA, cnnkit_train, machine_header

SIDE = 56  # canvas side in pixels: a 2x2 grid of 28x28 MNIST digits
JITTER = 4  # largest shift of a digit inside its quadrant, in pixels (MNIST digits have a 4-px margin)
MAX_DIGITS = 3


def compose(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One (56, 56) uint8 canvas from (n, 28, 28) digits, each in a different random quadrant."""
    canvas = np.zeros((SIDE, SIDE), np.uint8)
    for digit, quadrant in zip(digits, rng.permutation(4)[:len(digits)]):
        top = (quadrant // 2) * 28 + int(rng.integers(-JITTER, JITTER + 1))
        left = (quadrant % 2) * 28 + int(rng.integers(-JITTER, JITTER + 1))
        top, left = min(max(top, 0), SIDE - 28), min(max(left, 0), SIDE - 28)
        np.maximum(canvas[top:top + 28, left:left + 28], digit, out=canvas[top:top + 28, left:left + 28])
    return canvas


def draw(images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator, rare: float = 1.0
         ) -> list[tuple[np.ndarray, list[int]]]:
    """`count` canvases, each of 1..3 digits of different classes, drawn from images (N, 28, 28).
    rare: how often digits 5-9 are drawn against 0-4 (1: every digit alike)."""
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    weight = np.r_[np.ones(5), np.full(5, rare)]
    chances = None if rare == 1.0 else weight / weight.sum()  # None: the draws of every earlier seed, unchanged
    out = []
    for _ in range(count):
        classes = sorted(rng.choice(10, int(rng.integers(1, MAX_DIGITS + 1)), replace=False,
                                    p=chances).tolist())
        digits = np.stack([images[rng.choice(by_class[c])] for c in classes])
        out.append((compose(digits, rng), classes))
    return out


def write_multi_mnist(out: Path, train: int = 10_000, test: int = 2_000, seed: int = 0,
                      data_dir: Path = SHARED_DATA, rare: float = 1.0) -> Path:
    """Write out/images/{train,test}/NNNNN.png and out/labels.csv; returns the CSV's path."""
    import cnnkit
    mnist = cnnkit.load_dataset("mnist", data_dir=data_dir, download=False, quiet=True)
    rng = np.random.default_rng(seed)
    sources = {"train": (mnist.train, train), "test": (mnist.test, test)}
    rows = []
    for split, (source, count) in sources.items():
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        images, labels = source.images[:, 0].numpy(), source.labels.numpy()
        for i, (canvas, classes) in enumerate(draw(images, labels, count, rng, rare)):
            name = f"images/{split}/{i:05d}.png"
            Image.fromarray(canvas, mode="L").save(out / name)
            rows.append((name, ";".join(map(str, classes)), split))
    labels_file = out / "labels.csv"
    tmp = labels_file.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "split"])
        writer.writerows(rows)
    os.replace(tmp, labels_file)
    return labels_file


def pixel_baseline(labels_file: Path, seed: int = 0) -> dict:
    """Test mAP and subset accuracy of one logistic regression per label on normalized pixels, its
    thresholds chosen for F1 on a validation tenth of the training rows."""
    from sklearn.linear_model import LogisticRegression

    import cnnkit
    from cnnkit.multilabel import choose_thresholds, multilabel_metrics
    ds = cnnkit.load_dataset(str(labels_file), image_size=SIDE, channels=1, val_split=0.1, seed=seed, quiet=True)
    flat = {s: getattr(ds, s).images.flatten(1).float().numpy() / 255 for s in ("train", "val", "test")}
    truth = {s: getattr(ds, s).labels.numpy() for s in ("train", "val", "test")}
    probs = {s: np.zeros_like(truth[s]) for s in ("val", "test")}
    for k in range(ds.num_classes):
        fit = LogisticRegression(C=0.1, max_iter=300).fit(flat["train"], truth["train"][:, k])
        for s in probs:
            probs[s][:, k] = fit.predict_proba(flat[s])[:, 1]
    thresholds = choose_thresholds(probs["val"], truth["val"])
    m = multilabel_metrics(probs["test"], truth["test"], thresholds, ds.class_names)
    return {"mAP": m["mean_average_precision"], "subset_accuracy": m["subset_accuracy"],
            "macro_f1": m["macro"]["f1"], "images": ds.sizes()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder to write images/ and labels.csv into")
    ap.add_argument("--train", type=int, default=10_000, help="training images")
    ap.add_argument("--test", type=int, default=2_000, help="test images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", action="store_true", help="also fit the per-label logistic regression")
    ap.add_argument("--train-recipe", action="store_true", help="also run cnnkit train --recipe multi-mnist")
    ap.add_argument("--seeds", type=int, default=1, help="with --train-recipe: train seeds 0..N-1")
    ap.add_argument("--pos-weight", action="store_true", help="with --train-recipe: train with --pos-weight")
    ap.add_argument("--rare", type=float, default=1.0,
                    help="how often digits 5-9 are drawn against 0-4, e.g. 0.1 (default 1: alike)")
    args = ap.parse_args()
    labels_file = write_multi_mnist(args.out, args.train, args.test, args.seed, rare=args.rare)
    print(f"wrote {labels_file} ({args.train} training and {args.test} test images)")
    if args.baseline:
        b = pixel_baseline(labels_file, args.seed)
        print(f"per-label logistic regression on pixels: test mAP {b['mAP']:.4f}, subset accuracy "
              f"{b['subset_accuracy']:.4f}, macro F1 {b['macro_f1']:.4f} ({b['images']})")
    if args.train_recipe:  # seeds 0..N-1 on the same files: tuned thresholds against 0.5, seed by seed
        tuned, half = [], []
        for seed in range(args.seeds):
            m, wall = cnnkit_train(["--recipe", "multi-mnist", "--data", str(labels_file), "--seed", str(seed),
                                    *(["--pos-weight"] if args.pos_weight else [])],
                                   args.out / f"run-{seed}{'-pos-weight' if args.pos_weight else ''}")
            tuned.append(m["test_macro_f1"])
            half.append(m["test_macro_f1_at_half"])
            print(f"cnnkit train --recipe multi-mnist --seed {seed}: test mAP {m['test_mean_average_precision']:.4f}, "
                  f"subset accuracy {m['test_subset_accuracy']:.4f} ({m['test_subset_accuracy_at_half']:.4f} at 0.5), "
                  f"macro F1 {m['test_macro_f1']:.4f} at the validation thresholds ({m['test_macro_f1_at_half']:.4f} "
                  f"at 0.5), {wall:.1f} s for the whole command ({m['train_seconds']:.1f} s training)", flush=True)
        if args.seeds > 1:
            wins = sum(t > h for t, h in zip(tuned, half))
            print(f"median of {args.seeds} seeds: macro F1 {statistics.median(tuned):.4f} at the validation "
                  f"thresholds, {statistics.median(half):.4f} at 0.5; the thresholds won on {wins} of "
                  f"{args.seeds} seeds")

if __name__ == "__main__":
    machine_header()
    main()
