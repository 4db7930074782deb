"""Is lr-find's suggestion a good learning rate? For each dataset/model pair, `cnnkit train --lr auto`
(the sweep's suggestion, the lowest smoothed loss's lr / 3, then training at it) against a grid of
lrs a factor sqrt(10) apart around the recipe's own, every run with the same options and epochs,
and runs at fastai's two suggestions (valley, steep) beside it; the best grid lr is the one with the
best validation accuracy. Prints each run's lr, validation and test accuracy and seconds, then per
pair the ratio suggestion / best grid lr (the issue's check: within a factor of 3).

    python -m benchmarks.training.lr_find_vs_grid [--data-dir ../shared/data] [--quick] [--pairs mnist hymenoptera]

The pairs (about 10 minutes on 2 cores, EPYC):
    mnist         --recipe fast-mnist (fast-mnist, adam, one-cycle to lr 0.01), 1 epoch, 7 grid lrs
    cifar10       the 4,000-image lossless subset (cifar10-subset-bin), seed-cifar10, adam lr 0.002, 3 epochs,
                  7 grid lrs
    hymenoptera   --recipe fast-folder-photos (a new head on EfficientNet-Lite0's frozen ImageNet features,
                  adam lr 0.001), 3 epochs, 5 grid lrs: the pair held out when the suggestion's rule was chosen
--quick: digits with seed-digits for 1 epoch, a 3-lr grid (seconds; proves the script runs).
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from benchmarks.common import SHARED_DATA, machine_header
from cnnkit import TrainConfig, train
from cnnkit.config import recipe_file

FACTOR = math.sqrt(10)  # between grid neighbours: ~3.16


def pairs(data_dir: Path, quick: bool) -> list[tuple[str, dict, int]]:
    """(name, config fields, grid points) of each dataset/model pair."""
    if quick:
        return [("digits, seed-digits, 1 epoch", {"data": "digits", "model": "seed-digits", "epochs": 1}, 3)]
    mnist = TrainConfig.from_file(recipe_file("fast-mnist", "mnist")).to_dict()
    photos = TrainConfig.from_file(recipe_file("fast-folder-photos", "")).to_dict()
    return [("mnist, fast-mnist recipe, 1 epoch", {**mnist, "epochs": 1, "data_dir": str(data_dir / "mnist")}, 7),
            ("cifar10 subset (4,000), seed-cifar10, 3 epochs",
             {"data": "cifar10", "data_dir": str(data_dir / "cifar10-subset-bin"), "model": "seed-cifar10",
              "epochs": 3}, 7),
            ("hymenoptera, fast-folder-photos, 3 epochs",
             {**photos, "epochs": 3, "data": str(data_dir / "hymenoptera")}, 5)]


def run(fields: dict, out: Path, **change) -> dict:
    """Train once; the lr it trained at (the found one for lr_find), accuracies and seconds."""
    t0 = time.perf_counter()
    result = train(TrainConfig.from_dict({**fields, **change, "out": str(out), "report": False}).validate(),
                   quiet=True, echo=None)
    m = result.metrics
    return {"lr": result.config.lr, "val": m["val_accuracy"], "test": m["test_accuracy"],
            "seconds": time.perf_counter() - t0, "sweep": result.info.training.get("lr_find_sweep")}


def compare(name: str, fields: dict, tmp: Path, points: int) -> dict:
    """The suggestion's run and the grid's, printed as a table; returns the pair's summary."""
    base = TrainConfig.from_dict(fields).lr
    grid = [base * FACTOR ** (k - points // 2) for k in range(points)]
    print(f"\n{name}: grid around lr {base:g}")
    print(f"{'run':<12} {'lr':>10} {'val acc':>8} {'test acc':>9} {'seconds':>8}")
    found = run(fields, tmp / f"{len(name)}-auto", lr="auto")
    others = {k: run(fields, tmp / f"{len(name)}-{k}", lr=found["sweep"][k]) for k in ("valley", "steep")}  # fastai's
    for label, r in (("lr auto", found), *others.items()):
        print(f"{label:<12} {r['lr']:>10.3g} {r['val']:>8.4f} {r['test']:>9.4f} {r['seconds']:>8.1f}")
    rows = []
    for k, lr in enumerate(grid):
        rows.append(run(fields, tmp / f"{len(name)}-{k}", lr=lr))
        r = rows[-1]
        print(f"{'grid':<12} {r['lr']:>10.3g} {r['val']:>8.4f} {r['test']:>9.4f} {r['seconds']:>8.1f}")
    best = max(rows, key=lambda r: (r["val"], r["test"]))
    ratio = found["lr"] / best["lr"]
    print(f"best grid lr {best['lr']:.3g} (val {best['val']:.4f}, test {best['test']:.4f}); suggestion "
          f"{found['lr']:.3g} (val {found['val']:.4f}, test {found['test']:.4f}): ratio {ratio:.2f}, "
          f"{'within' if 1 / 3 <= ratio <= 3 else 'outside'} a factor of 3")
    return {"name": name, "ratio": ratio, "test_gap": found["test"] - best["test"],
            **{f"{k}_ratio": r["lr"] / best["lr"] for k, r in others.items()},
            **{f"{k}_gap": r["test"] - best["test"] for k, r in others.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=SHARED_DATA)
    ap.add_argument("--quick", action="store_true", help="digits only, a 3-lr grid: the smoke test")
    ap.add_argument("--pairs", nargs="+", default=None, help="only the pairs whose names start with these words")
    args = ap.parse_args()
    print("lr-find's suggestion (--lr auto: the lowest loss's lr / 3, 100 steps from 1e-7 to 10) against a grid of "
          f"lrs a factor {FACTOR:.2f} apart, the same epochs each; seed 0")
    with tempfile.TemporaryDirectory() as tmp:
        summaries = [compare(name, fields, Path(tmp), points)
                     for name, fields, points in pairs(args.data_dir, args.quick)
                     if not args.pairs or name.split(",")[0].split(" ")[0] in args.pairs]
    print("\nsummary: each suggestion / the best grid lr, and its test accuracy minus the best grid lr's")
    for s in summaries:
        print(f"  {s['name']:<48} lr auto: ratio {s['ratio']:>6.2f} test {s['test_gap']:+.4f} | "
              f"valley: {s['valley_ratio']:>6.2f} {s['valley_gap']:+.4f} | steep: {s['steep_ratio']:>6.2f} "
              f"{s['steep_gap']:+.4f}")


if __name__ == "__main__":
    machine_header()
    main()
