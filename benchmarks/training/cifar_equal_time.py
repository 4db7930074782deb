"""CIFAR-10 at equal time: cnnkit's fast recipe against the notes' recipe given the same training time.

  fast : `cnnkit train --recipe fast-cifar10 --data D --no-report` as a whole command in a fresh
         process: test accuracy (plain, and with flip-and-shift TTA), training seconds (validation
         included) and the command's wall time.
  notes: `cnnkit train --recipe notes-cifar10 --data D` (seed-cifar10, Adam 1e-3 constant, batch 32)
         for one epoch to measure its epoch time, then for as many whole epochs as fit in the fast
         recipe's training seconds. The notes' schedule is constant and its augmentation starts at
         epoch 51, so its first N epochs are exactly a truncated notes run. Its full 100 epochs are
         extrapolated from the per-epoch time.

Both run through cnnkit (bf16, channels-last: benchmarks.training.train_throughput measures cnnkit's loop
2.2x faster than the notes' own on seed-cifar10), so the comparison is of recipes, not of loops.

    python -m benchmarks.training.cifar_equal_time [--data ../shared/data/cifar10-jpeg] [--seeds 0]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import SHARED_DATA, cnnkit_train, machine_header


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED_DATA / "cifar10-jpeg"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CNNKIT_DATA": os.environ.get("CNNKIT_DATA", str(Path(tmp) / "cache"))}
        for seed in args.seeds:
            common = ["--data", args.data, "--seed", str(seed)]
            fast, fast_wall = cnnkit_train(["--recipe", "fast-cifar10", *common], Path(tmp) / f"fast-{seed}", env)
            print(f"  fast  seed {seed}: test {fast['test_accuracy']:.4f} "
                  f"(TTA {fast.get('test_tta_accuracy', float('nan')):.4f}) "
                  f"after {fast['train_seconds']:.1f} s of training, {fast_wall:.1f} s whole command", flush=True)
            one, _ = cnnkit_train(["--recipe", "notes-cifar10", *common, "--epochs", "1"], Path(tmp) / f"notes1-{seed}",
                                  env)
            epoch_seconds = one["train_seconds"]
            epochs = max(1, int(fast["train_seconds"] // epoch_seconds))
            notes, notes_wall = cnnkit_train(["--recipe", "notes-cifar10", *common, "--epochs", str(epochs)],
                                      Path(tmp) / f"notes-{seed}", env)
            print(f"  notes seed {seed}: {epoch_seconds:.1f} s an epoch; "
                  f"{epochs} epochs in {notes['train_seconds']:.1f} s: test {notes['test_accuracy']:.4f}", flush=True)
            rows.append((fast, fast_wall, notes, epochs, epoch_seconds))
    med = lambda values: statistics.median(values)  # noqa: E731
    fast_acc, notes_acc = med(r[0]["test_accuracy"] for r in rows), med(r[2]["test_accuracy"] for r in rows)
    fast_s, notes_s = med(r[0]["train_seconds"] for r in rows), med(r[2]["train_seconds"] for r in rows)
    epoch_s = med(r[4] for r in rows)
    print(f"fast-cifar10: test {fast_acc:.4f} "
          f"(TTA {med(r[0].get('test_tta_accuracy', float('nan')) for r in rows):.4f}) "
          f"in {fast_s:.0f} s of training, {med(r[1] for r in rows):.0f} s whole command "
          f"(medians over {len(rows)} seed(s))")
    print(f"notes-cifar10 at equal time: {rows[0][3]} epochs, {notes_s:.0f} s of training: test {notes_acc:.4f}; "
          f"{fast_acc - notes_acc:+.4f} for the fast recipe")
    print(f"notes-cifar10 as written (100 epochs at {epoch_s:.1f} s): about {100 * epoch_s / 60:.0f} min of training, "
          f"{100 * epoch_s / fast_s:.0f}x the fast recipe's")


if __name__ == "__main__":
    machine_header()
    main()
