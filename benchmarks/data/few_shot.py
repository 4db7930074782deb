"""Few-shot nearest-neighbour models (`cnnkit train --model knn:RUN --shots N`), the issue's two checks:

    python -m benchmarks.data.few_shot [--seeds 5] [--shots 1 5 10] [--digits-train 2000] [--out DIR]

- hymenoptera (ants and bees; its val folder is the test split) on EfficientNet-Lite0's ImageNet
  features (knn:efficientnet_lite0), N images per class drawn from train/;
- MNIST digits 5-9 on the features of a network trained on digits 0-4 only (fast-mnist, 2 epochs
  on --digits-train images a digit), against the same vote on raw pixels (cosine similarity of the
  pixel values / 255: the baseline), N images per class; test accuracy on the test images of 5-9.

Each (N, seed) is the kNN model `cnnkit train` builds (knn.load_knn_data: the same data, the same
seeded draw of N per class, the same vote), its test split embedded once per dataset. The vote's
k against other choices (k = 1, 5, 10, 20; a plain majority of the k nearest beside the similarity
weights) is printed below each table: what vote_k's rule rests on. Last, one whole `cnnkit train`
per dataset (N = 5, seed 0) must give the figure printed for it. Medians over the seeds.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import SHARED_DATA, cnnkit_train, machine_header

DIGITS_OLD, DIGITS_NEW = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
SWEEP_K = (1, 5, 10, 20)
CLI_SHOTS = 5  # the shots of the whole-command check


def write_digits(out: Path, digits: tuple[int, ...], train: int, test: int | None) -> Path:
    """MNIST images of `digits` as PNG files and labels.csv (path,label,split; labels digit0..):
    the first `train` training images of each digit, the first `test` test images of each (None: all)."""
    from PIL import Image

    import cnnkit
    mnist = cnnkit.load_dataset("mnist", data_dir=SHARED_DATA, download=False, quiet=True)
    rows = []
    for split, source, count in (("train", mnist.train, train), ("test", mnist.test, test)):
        (out / split).mkdir(parents=True)
        labels = source.labels.numpy()
        for d in digits:
            for i in np.flatnonzero(labels == d)[:count]:
                name = f"{split}/{i:05d}.png"
                Image.fromarray(source.images[i, 0].numpy(), mode="L").save(out / name)
                rows.append((name, f"digit{d}", split))
    with open(out / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    return out / "labels.csv"


def hymenoptera_listing(out: Path) -> Path:
    """labels.csv of hymenoptera's JPEGs (absolute paths, split train/val), without its placeholder
    GIF: train/ants/imageNotFound.gif decodes as an image, but it is no ant."""
    root = SHARED_DATA / "hymenoptera"
    rows, left_out = [], []
    for split in ("train", "val"):
        for path in sorted((root / split).glob("*/*")):
            if path.suffix.lower() not in (".jpg", ".jpeg"):
                left_out.append(path)
                continue
            rows.append((str(path), path.parent.name, split))
    for path in left_out:
        print(f"note: hymenoptera: left out {path.relative_to(root)} (not a photo: a placeholder)")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "hymenoptera.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    return out / "hymenoptera.csv"


def pixel_backbone(out: Path) -> Path:
    """A model file whose features are the raw pixels / 255 (the `linear` spec's embed is its
    flatten; mean 0, std 1): knn: of it is a nearest-neighbour vote on pixels."""
    from cnnkit.modelfile import InputShape, ModelInfo, Preprocessing, save_model
    from cnnkit.models.registry import architecture_record, build_model
    model = build_model("linear", 5, in_channels=1, image_size=(28, 28))
    info = ModelInfo(architecture=architecture_record(model), class_names=[f"digit{d}" for d in DIGITS_OLD],
                     input=InputShape(1, 28, 28), preprocessing=Preprocessing(mean=[0.0], std=[1.0]))
    return save_model(out / "pixels.safetensors", model, info)


def vote_accuracy(support: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                  k: int, weighted: bool) -> float:
    """Test accuracy of a vote of the k nearest support images: cnnkit's (KnnVote) or a plain majority."""
    from cnnkit.models.knn import KnnVote
    k = min(k, len(support) - 1)
    if weighted:
        vote = KnnVote(len(support), support.shape[1], int(labels.max()) + 1, k)
        vote.support.copy_(support)
        vote.labels.copy_(labels)
        with torch.no_grad():
            decided = vote(test).argmax(1)
    else:  # ties go to the lowest class index
        index = (test @ support.T).topk(k, dim=1).indices  # (N, k)
        counts = torch.nn.functional.one_hot(labels[index], int(labels.max()) + 1).sum(1)  # (N, K)
        decided = counts.argmax(1)
    return float((decided == test_labels).double().mean())


def few_shot_table(title: str, data: Path, model: str, shots: list[int], seeds: int) -> dict[int, float]:
    """Print the test accuracy of knn:MODEL on DATA per shots, median over seeds, and the k sweep;
    return {shots: median accuracy} and seed 0's figures."""
    from cnnkit.config import TrainConfig
    from cnnkit.knn import embed_images, load_knn_data, vote_k
    test_features = None
    ours, sweep, seed0 = {}, {}, {}
    for n in shots:
        for seed in range(seeds):
            cfg = TrainConfig(data=str(data), model=f"knn:{model}", shots=n, seed=seed)
            backbone, ds, _ = load_knn_data(cfg, quiet=True)
            if test_features is None:  # the test split is the same for every seed: embedded once
                test_features, test_labels = embed_images(backbone, ds.test.images), ds.test.labels
            support = embed_images(backbone, ds.train.images)
            ours.setdefault(n, []).append(vote_accuracy(support, ds.train.labels, test_features, test_labels,
                                                        vote_k(len(support)), True))
            for k in SWEEP_K:
                for weighted in (True, False):
                    sweep.setdefault((n, k, weighted), []).append(
                        vote_accuracy(support, ds.train.labels, test_features, test_labels, k, weighted))
        seed0[n] = ours[n][0]
    print(f"\n{title}: test accuracy on {len(test_labels)} {ds.test_source} images, median of {seeds} seeds "
          f"(min-max)")
    for n in shots:
        print(f"  {n:3d} per class (k = {vote_k(n * len(ds.class_names)):2d}): {statistics.median(ours[n]):.4f} "
              f"({min(ours[n]):.4f}-{max(ours[n]):.4f})")
    print("  vote sweep, medians (weighted: cnnkit's similarity weights; majority: one vote each):")
    for n in shots:
        cells = [f"k={k} {statistics.median(sweep[(n, k, True)]):.4f} / {statistics.median(sweep[(n, k, False)]):.4f}"
                 for k in SWEEP_K]
        print(f"    {n:3d} per class, weighted / majority: " + ", ".join(cells))
    return {n: statistics.median(v) for n, v in ours.items()} | {("seed0", n): v for n, v in seed0.items()}


def cli_check(data: Path, model: str, expected: float, out: Path) -> None:
    """One whole `cnnkit train --model knn:MODEL --shots CLI_SHOTS --seed 0`: its test accuracy must be the table's."""
    metrics, wall = cnnkit_train(["--data", str(data), "--model", f"knn:{model}", "--shots", str(CLI_SHOTS),
                                  "--seed", "0"], out)
    # within one image: the command runs its test split in batches, the table in one matrix product,
    # and a similarity rounded another way may move a decision that sits on a tie
    same = abs(metrics["test_accuracy"] - expected) <= 1 / metrics["test_n"] + 1e-9
    print(f"  cnnkit train --data {data.name} --model knn:{Path(model).name} --shots {CLI_SHOTS} --seed 0: test "
          f"accuracy {metrics['test_accuracy']:.4f} in {wall:.1f} s ({'the same, to one image,' if same else 'NOT'} "
          f"as the table's {expected:.4f})")
    if not same:
        raise SystemExit("the command and the table disagree")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--digits-train", type=int, default=2000, help="MNIST training images a digit")
    parser.add_argument("--digits-test", type=int, default=None, help="MNIST test images a digit (default: all)")
    parser.add_argument("--skip-hymenoptera", action="store_true", help="MNIST only (EfficientNet is the slow part)")
    parser.add_argument("--out", default=None, help="keep the data and run folders here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out or tmp)
        if not args.skip_hymenoptera:
            ants = hymenoptera_listing(base / "hymenoptera")
            table = few_shot_table("hymenoptera, knn:efficientnet_lite0 (ImageNet features)", ants,
                                   "efficientnet_lite0", args.shots, args.seeds)
            if CLI_SHOTS in args.shots:
                cli_check(ants, "efficientnet_lite0", table[("seed0", CLI_SHOTS)], base / "run-hymenoptera")
        old = write_digits(base / "digits-0-4", DIGITS_OLD, args.digits_train, args.digits_test)
        new = write_digits(base / "digits-5-9", DIGITS_NEW, args.digits_train, args.digits_test)
        net, wall = cnnkit_train(["--data", str(old), "--model", "fast-mnist", "--image-size", "28", "--channels", "1",
                                  "--epochs", "2", "--batch-size", "64", "--lr", "0.01", "--schedule", "onecycle"],
                                 base / "run-0-4")
        print(f"\nMNIST digits 0-4: fast-mnist, 2 epochs on {args.digits_train} images a digit: test accuracy "
              f"{net['test_accuracy']:.4f} in {wall:.1f} s")
        table = few_shot_table("MNIST digits 5-9, knn: of the 0-4 network", new, str(base / "run-0-4"),
                               args.shots, args.seeds)
        pixels = few_shot_table("MNIST digits 5-9, the same vote on raw pixels (baseline)", new,
                                str(pixel_backbone(base)), args.shots, args.seeds)
        print("  features against pixels: " + ", ".join(f"{n} per class {table[n] - pixels[n]:+.4f}"
                                                        for n in args.shots))
        if CLI_SHOTS in args.shots:
            cli_check(new, str(base / "run-0-4"), table[("seed0", CLI_SHOTS)], base / "run-5-9")


if __name__ == "__main__":
    machine_header()
    main()
