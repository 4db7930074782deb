"""`cnnkit label-issues` on MNIST with a known share of training labels flipped at random: how many
of the flipped images the ranking puts first, and test accuracy trained with and without the
flagged images.

    python -m benchmarks.data.label_noise [--noise 0.01] [--epochs 3] [--label-smoothing 0] [--folds 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

import cnnkit
from benchmarks.common import SHARED_DATA, machine_header
from cnnkit.config import recipe_file
from cnnkit.jobs.label_issues import label_issues
from cnnkit.training import load_data_and_model

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--noise", type=float, default=0.01, help="share of training labels flipped")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    recipe = cnnkit.TrainConfig.from_file(recipe_file("fast", "mnist")).to_dict()
    cfg = cnnkit.TrainConfig.from_dict({**recipe, "data_dir": str(SHARED_DATA), "epochs": args.epochs,
                                        "label_smoothing": args.label_smoothing, "seed": args.seed, "report": False})
    ds, _ = load_data_and_model(cfg, quiet=True)
    rng = np.random.default_rng(args.seed)
    n = len(ds.train)
    flipped = rng.choice(n, int(n * args.noise), replace=False)
    labels = ds.train.labels.clone()
    labels[flipped] = (labels[flipped] + torch.as_tensor(rng.integers(1, 10, len(flipped)))) % 10
    noisy = dataclasses.replace(ds, train=dataclasses.replace(ds.train, labels=labels))
    start = time.perf_counter()
    result, _ = label_issues(cfg, folds=args.folds, retrain=True, out=Path("/tmp") / "cnnkit-label-noise", ds=noisy)
    seconds = time.perf_counter() - start
    top = set(result["ranking"][: len(flipped)].tolist())
    print(json.dumps({"flipped": len(flipped), "recall_in_top_share": len(top & set(flipped.tolist())) / len(flipped),
                      "flagged": result["flagged"],
                      "flipped_among_flagged": float(result["flagged_mask"][flipped].mean()),
                      **result["retrain"], "seconds": seconds}, indent=2))


if __name__ == "__main__":
    machine_header()
    main()
