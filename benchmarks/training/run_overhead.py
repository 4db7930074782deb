"""What a training run costs beyond its epochs: `cnnkit train --epochs 1 --no-report` as a whole
process (start-up, imports, data, set-up, testing, calibration, the model file), against the
epoch's own time from history.csv. Issue 9's bar: whole process <= epoch + 4 s.

    python -m benchmarks.training.run_overhead [--repeats 5] [--model seed-mnist-torch] [--report]

Each repeat is a fresh process; medians are printed. The decoded-data cache is warmed by one
untimed run first (a user's second run onwards), and the first, cold run is shown on its own.
First, in this process: loading MNIST with an empty decoded cache (checksums, gunzip, parse, write
the cache) and with a warm one, and fitting the normalisation statistics.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import SHARED_DATA, cnnkit_train, machine_header


def one_run(args, out: Path, cache: Path) -> tuple[float, float]:
    _, wall = cnnkit_train(["--data", args.data, "--data-dir", args.data_dir, "--model", args.model, "--epochs", "1"],
                           out, {**os.environ, "CNNKIT_DATA": str(cache)}, report=args.report)
    epoch = float(next(csv.DictReader((out / "history.csv").open()))["seconds"])
    return wall, epoch


def in_process(data_dir: str, cache: Path) -> None:
    os.environ["CNNKIT_DATA"] = str(cache)
    from cnnkit.data import load_dataset
    from cnnkit.preprocess import Preprocess
    times = []
    for _ in range(3):  # empty cache, then warm twice
        t0 = time.perf_counter()
        ds = load_dataset("mnist", data_dir=data_dir, quiet=True)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    Preprocess.fit(ds.train.images)
    fit = time.perf_counter() - t0
    print(f"in process: load_dataset('mnist') {times[0]:.3f} s with an empty decoded cache, "
          f"{min(times[1:]):.3f} s warm; Preprocess.fit on {len(ds.train):,} images {fit:.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--data-dir", default=str(SHARED_DATA / "mnist"))
    ap.add_argument("--model", default="seed-mnist-torch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--report", action="store_true", help="write the report too (the default run)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data == "mnist":
            in_process(args.data_dir, Path(tmp) / "cache-in-process")
        cache = Path(tmp) / "cache"
        wall, epoch = one_run(args, Path(tmp) / "cold", cache)
        print(f"cold cache: whole {wall:.2f} s, epoch {epoch:.2f} s, outside the epoch {wall - epoch:.2f} s")
        rows = [one_run(args, Path(tmp) / f"run{i}", cache) for i in range(args.repeats)]
    walls, epochs = [w for w, _ in rows], [e for _, e in rows]
    overheads = [w - e for w, e in rows]
    print(f"{args.model} on {args.data}, 1 epoch, {'with' if args.report else 'no'} report, {args.repeats} runs:")
    print(f"  whole process {statistics.median(walls):.2f} s, epoch {statistics.median(epochs):.2f} s, "
          f"outside the epoch {statistics.median(overheads):.2f} s (median; each run: "
          + ", ".join(f"{o:.2f}" for o in overheads) + ")")


if __name__ == "__main__":
    machine_header()
    main()
