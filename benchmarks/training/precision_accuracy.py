"""Does bf16 autocast keep accuracy? Trains the notes' MNIST networks with `cnnkit train` in fp32 and
in bf16 (otherwise cnnkit's defaults), side by side, and prints test accuracy and training time.

    python -m benchmarks.training.precision_accuracy [--data-dir ../shared/data] [--epochs 2] [--seeds 0]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

from benchmarks.common import SHARED_DATA, machine_header
from cnnkit import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=str(SHARED_DATA))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--models", nargs="+", default=["seed-mnist-torch", "seed-mnist-keras"])
    args = ap.parse_args()
    print(f"MNIST, {args.epochs} epochs, seeds {args.seeds}; test accuracy and training seconds (medians)")
    print(f"{'model':<18} {'fp32 acc':>9} {'bf16 acc':>9} {'fp32 s':>7} {'bf16 s':>7} {'speed-up':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            acc, secs = {"fp32": [], "bf16": []}, {"fp32": [], "bf16": []}
            for seed in args.seeds:
                for precision in ("fp32", "bf16"):
                    cfg = TrainConfig(data="mnist", model=model, epochs=args.epochs, precision=precision, seed=seed,
                                      data_dir=args.data_dir, out=f"{tmp}/{model}-{precision}-{seed}")
                    m = train(cfg, quiet=True).metrics
                    acc[precision].append(m["test_accuracy"])
                    secs[precision].append(m["train_seconds"])
            med = {k: statistics.median(v) for k, v in acc.items()}
            sec = {k: statistics.median(v) for k, v in secs.items()}
            print(f"{model:<18} {med['fp32']:>9.4f} {med['bf16']:>9.4f} {sec['fp32']:>7.1f} {sec['bf16']:>7.1f} "
                  f"{sec['fp32'] / sec['bf16']:>7.2f}x")


if __name__ == "__main__":
    machine_header()
    main()
