"""Reading a label file: CIFAR-10's 60,000 JPEGs (../shared/data/cifar10-jpeg) listed as
path,label,split, parsed (labelfile.read_table) and read and checked, every file's existence included
(labelfile.read_label_file), medians of several repeats.

    python -m benchmarks.data.label_file_read [--repeats 3]
"""
from __future__ import annotations

import argparse
import csv
import os
import tempfile
from pathlib import Path

from benchmarks.common import SHARED_DATA, machine_header, median_seconds
from cnnkit.data.labelfile import read_label_file, read_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = SHARED_DATA / "cifar10-jpeg"
    rows = [(str(root / split / cls / name), cls, split) for split in ("train", "test")
            for cls in sorted(os.listdir(root / split)) for name in sorted(os.listdir(root / split / cls))]
    with tempfile.TemporaryDirectory() as tmp:
        labels = Path(tmp) / "cifar10.csv"
        with open(labels, "w", newline="") as f:
            csv.writer(f).writerows([("path", "label", "split"), *rows])
        parse = median_seconds(lambda: read_table(labels), args.repeats)
        check = median_seconds(lambda: read_label_file(labels), args.repeats)
    print(f"{len(rows):,} rows: parsed in {parse:.2f} s, read and checked in {check:.2f} s "
          f"(medians of {args.repeats})")


if __name__ == "__main__":
    machine_header()
    main()
