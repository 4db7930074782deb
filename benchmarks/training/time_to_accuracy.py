"""Time to the notes' MNIST accuracy (99.14% on the test set): cnnkit's `--recipe fast` against the
notes' recipe as written, interleaved seed by seed in one run, medians over the seeds.

  notes : seed-mnist-torch written as the notes write it, a DataLoader over normalized float
          tensors (shuffled, batch 64), fp32, Adam 1e-3, on all 60,000 training images; after each
          epoch the test accuracy is measured (outside the timing) and the run stops at the first
          epoch with at least 99.14%. Its time is training seconds only.
  cnnkit: `cnnkit train --recipe fast --data mnist --no-report` as a whole command in a fresh
          process; its training seconds (validation included) from metrics.json, and its wall time.

    python -m benchmarks.training.time_to_accuracy [--seeds 0 1 2] [--max-notes-epochs 8]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import (SHARED_DATA, NotesNet, cnnkit_train, machine_header, notes_loader, notes_normalize,
                               notes_steps, seconds)
from cnnkit.data import builtin

TARGET = 0.9914


def notes_recipe(train_x, train_y, test_x, test_y, seed: int, max_epochs: int) -> tuple[float, int, float]:
    """(training seconds to the first epoch at TARGET or better, that epoch, its test accuracy)."""
    torch.manual_seed(seed)
    loader = notes_loader(train_x, train_y, 64)
    model = NotesNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    trained, acc = 0.0, 0.0
    for epoch in range(1, max_epochs + 1):
        trained += seconds(lambda: list(notes_steps(model, opt, loader)))
        model.eval()
        with torch.no_grad():
            acc = sum((model(test_x[i:i + 1000]).argmax(1) == test_y[i:i + 1000]).sum().item()
                      for i in range(0, len(test_y), 1000)) / len(test_y)
        print(f"  notes seed {seed}: epoch {epoch} test {acc:.4f} after {trained:.1f} s of training", flush=True)
        if acc >= TARGET:
            return trained, epoch, acc
    return trained, -1, acc


def fast_recipe(data_dir: str, tmp: Path, out: str, *args: str) -> tuple[dict, float]:
    """`cnnkit train --recipe fast --data mnist` on data_dir with ARGS, its data cached in tmp: (metrics, wall s)."""
    return cnnkit_train(["--recipe", "fast", "--data", "mnist", "--data-dir", data_dir, *args], tmp / out,
                        {**os.environ, "CNNKIT_DATA": str(tmp / "cache")})


def cnnkit_recipe(data_dir: str, seed: int, tmp: Path) -> tuple[float, float, float]:
    """(training seconds, test accuracy, whole-command wall seconds)."""
    m, wall = fast_recipe(data_dir, tmp, f"fast-{seed}", "--seed", str(seed))
    print(f"  cnnkit seed {seed}: test {m['test_accuracy']:.4f} after {m['train_seconds']:.1f} s of training, "
          f"{wall:.1f} s whole command", flush=True)
    return m["train_seconds"], m["test_accuracy"], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(SHARED_DATA / "mnist"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-notes-epochs", type=int, default=8)
    args = ap.parse_args()
    ds = builtin.load("mnist", data_dir=args.data_dir, download=False, quiet=True, test_split=0, seed=0)  # all 60,000
    train_x, test_x = notes_normalize(ds.train.images), notes_normalize(ds.test.images)
    notes, fast = [], []
    with tempfile.TemporaryDirectory() as tmp:
        fast_recipe(args.data_dir, Path(tmp), "warm", "--epochs", "1")  # warm the data cache
        for seed in args.seeds:
            notes.append(notes_recipe(train_x, ds.train.labels, test_x, ds.test.labels, seed, args.max_notes_epochs))
            fast.append(cnnkit_recipe(args.data_dir, seed, Path(tmp)))
    crossed = [n for n in notes if n[1] > 0]
    notes_s = statistics.median(n[0] for n in crossed) if crossed else float("nan")
    fast_train = statistics.median(f[0] for f in fast)
    fast_wall = statistics.median(f[2] for f in fast)
    reached = sum(f[1] >= TARGET for f in fast)
    print(f"notes recipe: {notes_s:.1f} s of training to {TARGET:.2%} (median over {len(crossed)} of "
          f"{len(notes)} seeds that reached it; epochs {[n[1] for n in notes]})")
    print(f"cnnkit --recipe fast: {fast_train:.1f} s of training, {fast_wall:.1f} s whole command (medians); "
          f"test accuracy {[round(f[1], 4) for f in fast]}, {reached} of {len(fast)} seeds at {TARGET:.2%} or more")
    print(f"time to {TARGET:.2%}: {notes_s / fast_train:.1f}x shorter in training time, "
          f"{notes_s / fast_wall:.1f}x against cnnkit's whole command")


if __name__ == "__main__":
    machine_header()
    main()
