"""What the training toolbox buys (issue 26): whole `cnnkit train` commands, side by side, on the same
seeds and the same number of epochs, their test accuracy and training seconds. Each experiment is
a baseline and its variants; a variant's seconds over the baseline's say whether equal epochs were
also equal time.

  mix          CIFAR-10 (the JPEG folder), the fast recipe for --epochs, against the same with
               --cutmix 1 and with --mixup 0.2 (timm's and airbench's usual strengths).
  randaugment  few images: the lossless CIFAR-10 subset (4,000 training images, the official 1,000
               first test images), the fast recipe (light augmentation: 2-px shifts, mirror) against
               the same with random erasing 0.25, randaugment (2 ops at 9) and trivialaugment: 48 steps.
  randaugment-long  the same 4,000 images, the small recipe's fast-mnist alone (no teacher) for 40 epochs
               of 128 (1,240 steps): no augmentation, light, light + erasing, randaugment, trivialaugment.
  distill      CIFAR-10 (the JPEG folder), the small recipe's student (fast-mnist-sized, 2.2 M
               multiply-adds, 25x fewer than the teacher's speedrun-small) alone, against the same
               distilled from --teacher (a run folder; without one, the fast recipe is trained first
               for --teacher-epochs).

    python -m benchmarks.training.toolbox_effect mix [--epochs 6] [--seeds 0]
    python -m benchmarks.training.toolbox_effect randaugment [--seeds 0 1]
    python -m benchmarks.training.toolbox_effect randaugment-long [--seeds 0 1]
    python -m benchmarks.training.toolbox_effect distill [--teacher RUN] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import SHARED_DATA, cnnkit_train, machine_header

CIFAR = str(SHARED_DATA / "cifar10-jpeg")
CIFAR_SUBSET = str(SHARED_DATA / "cifar10-subset-bin")  # 4,000 lossless training images, 1,000 test


def experiments(args, tmp: Path, env: dict) -> tuple[list[str], dict[str, list[str]]]:
    """(the flags every run shares, {variant: its own flags}); the first variant is the baseline."""
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    if args.experiment == "mix":
        return (["--recipe", "fast-cifar10", "--data", CIFAR, *epochs],
                {"fast": [], "fast + cutmix 1": ["--cutmix", "1"], "fast + mixup 0.2": ["--mixup", "0.2"]})
    if args.experiment == "randaugment":
        return (["--recipe", "fast-cifar10", "--data", "cifar10", "--data-dir", CIFAR_SUBSET, *epochs],
                {"light": [], "light + erasing 0.25": ["--random-erasing", "0.25"],
                 "randaugment": ["--augment", "randaugment"], "trivialaugment": ["--augment", "trivialaugment"]})
    if args.experiment == "randaugment-long":  # the small recipe's network, alone, for 40 epochs of 128 (1,240 steps)
        return (["--recipe", "small-cifar10", "--teacher", "none", "--data", "cifar10", "--data-dir", CIFAR_SUBSET,
                 "--batch-size", "128", *(epochs or ["--epochs", "40"])],
                {"none": [], "light": ["--augment", "light"],
                 "light + erasing 0.25": ["--augment", "light", "--random-erasing", "0.25"],
                 "randaugment": ["--augment", "randaugment"], "trivialaugment": ["--augment", "trivialaugment"]})
    teacher = args.teacher
    if teacher is None:  # the fast recipe's model, trained here
        teacher = str(tmp / "teacher")
        metrics, _ = cnnkit_train(["--recipe", "fast-cifar10", "--data", CIFAR, "--epochs", str(args.teacher_epochs)],
                                  Path(teacher), env)
        print(f"  teacher (fast-cifar10, {args.teacher_epochs} epochs): test {metrics['test_accuracy']:.4f}",
              flush=True)
    return (["--recipe", "small-cifar10", "--data", CIFAR, *epochs],
            {"student alone": ["--teacher", "none"], "student distilled": ["--teacher", teacher]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=["mix", "randaugment", "randaugment-long", "distill"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=None, help="every run's epochs (default: each recipe's own)")
    ap.add_argument("--teacher", default=None, help="distill: the teacher's run folder")
    ap.add_argument("--teacher-epochs", type=int, default=12)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CNNKIT_DATA": os.environ.get("CNNKIT_DATA", str(Path(tmp) / "cache"))}
        shared, variants = experiments(args, Path(tmp), env)
        results: dict[str, list[dict]] = {name: [] for name in variants}
        for seed in args.seeds:
            for name, flags in variants.items():  # interleaved: a drift in the machine's speed hits each alike
                metrics, wall = cnnkit_train([*shared, *flags, "--seed", str(seed)],
                                             Path(tmp) / f"{name.replace(' ', '_')}-{seed}", env)
                results[name].append(metrics)
                print(f"  {name:20s} seed {seed}: test {metrics['test_accuracy']:.4f} "
                      f"in {metrics['train_seconds']:.0f} s of training ({wall:.0f} s whole command)", flush=True)
    base = next(iter(results))
    base_acc = statistics.median(m["test_accuracy"] for m in results[base])
    base_s = statistics.median(m["train_seconds"] for m in results[base])
    print(f"{args.experiment}: medians over seeds {', '.join(map(str, args.seeds))} "
          f"(`cnnkit train {' '.join(shared)}`)")
    for name, runs in results.items():
        acc = statistics.median(m["test_accuracy"] for m in runs)
        secs = statistics.median(m["train_seconds"] for m in runs)
        gains = [r["test_accuracy"] - b["test_accuracy"] for r, b in zip(runs, results[base])]
        print(f"  {name:20s} test {acc:.4f} ({acc - base_acc:+.4f}; per seed "
              f"{', '.join(f'{g:+.4f}' for g in gains)}), {secs:.0f} s of training ({secs / base_s:.2f}x)")


if __name__ == "__main__":
    machine_header()
    main()
