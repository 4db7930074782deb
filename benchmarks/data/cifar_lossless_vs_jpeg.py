"""The CIFAR-10 fast recipe on the lossless subset and on the JPEG copies of the same images.

`../shared/data/cifar10-subset-bin` holds the first 4,000 training and 1,000 test images of the
official batches, bit-exact; `cifar10-jpeg` holds all 60,000 as JPEG (quality 75), named by their
order within their class in the official batches. So the k-th image of class c in the subset is
`cifar10-jpeg/<split>/<c>/<k>.jpg`: this script links those 5,000 files into a folder (checking the
pairing on the first 200 of each split: mean absolute difference ~5.8 per pixel value, as the data
README says for JPEG; a wrong pairing gives ~60) and trains `--recipe fast-cifar10` on both, same
seeds, so the difference is what the JPEG compression costs at this size.

    python -m benchmarks.data.cifar_lossless_vs_jpeg [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import SHARED_DATA, cnnkit_train, machine_header

RECORD_BYTES = 3073  # 1 label byte, then 1024 red, 1024 green, 1024 blue


def link_jpeg_twins(subset: Path, jpeg: Path, out: Path) -> float:
    """Link the JPEG copy of every subset image into out/{train,test}/<class>/; the pairing's
    mean absolute difference per pixel value over the first 200 images of each split."""
    names = (subset / "batches.meta.txt").read_text().split()
    diffs = []
    for split, file in (("train", "data_batch_1.bin"), ("test", "test_batch.bin")):
        records = np.fromfile(subset / file, dtype=np.uint8).reshape(-1, RECORD_BYTES)
        seen: dict[str, int] = {}
        for i, record in enumerate(records):
            name = names[record[0]]
            k = seen.get(name, 0)
            seen[name] = k + 1
            src = jpeg / split / name / f"{k:04d}.jpg"
            dst = out / split / name / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src.resolve())
            if i < 200:
                pixels = record[1:].reshape(3, 32, 32).transpose(1, 2, 0).astype(np.float64)
                diffs.append(np.abs(np.asarray(Image.open(src).convert("RGB"), np.float64) - pixels).mean())
    return float(np.mean(diffs))


def train(data_args: list[str], seed: int, out: Path) -> dict:
    return cnnkit_train(["--recipe", "fast-cifar10", *data_args, "--seed", str(seed)], out)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpeg-twins"
        mad = link_jpeg_twins(SHARED_DATA / "cifar10-subset-bin", SHARED_DATA / "cifar10-jpeg", folder)
        print(f"pairing checked: mean absolute difference {mad:.2f} per pixel value (JPEG q75)")
        if mad > 15:
            raise SystemExit("the JPEG files do not pair with the subset's images")
        sources = {"lossless": ["--data", "cifar10", "--data-dir", str(SHARED_DATA / "cifar10-subset-bin")],
                   "jpeg": ["--data", str(folder)]}
        results: dict[str, list[dict]] = {k: [] for k in sources}
        for seed in args.seeds:
            for name, data_args in sources.items():
                m = train(data_args, seed, Path(tmp) / f"{name}-{seed}")
                results[name].append(m)
                print(f"  {name:8s} seed {seed}: test {m['test_accuracy']:.4f} (TTA {m['test_tta_accuracy']:.4f}) "
                      f"on {m['test_n']} images, {m['train_seconds']:.1f} s of training", flush=True)
    med = {k: (statistics.median(m["test_accuracy"] for m in v), statistics.median(m["test_tta_accuracy"] for m in v))
           for k, v in results.items()}
    for k, (plain, tta) in med.items():
        print(f"{k:8s}: test {plain:.4f}, TTA {tta:.4f} (medians over seeds {args.seeds})")
    print(f"lossless - jpeg: {med['lossless'][0] - med['jpeg'][0]:+.4f} plain, "
          f"{med['lossless'][1] - med['jpeg'][1]:+.4f} TTA")


if __name__ == "__main__":
    machine_header()
    main()
