"""What the batch regularisers cost on the fast CIFAR-10 recipe: cnnkit's own epoch loop
(training.run_epoch) with the recipe's model (speedrun-small), optimizer, batch (1,024), precision
and light augmentation, over the same random 32x32 images, without and with each regulariser.
The variants are interleaved and each figure is the median of --repeats runs; the cost is the
extra time as a share of the plain epoch's. Random erasing and the two policies (in place of the
light augmentation, which they include) are measured alike.

Count first: a speedrun-small step is 1,024 x 325 MFLOP = 333 GFLOP (forward and backward); CutMix
copies one rectangle of 1,024 x 3 x 32 x 32 floats (12 MB at most), MixUp blends two such batches
(~25 MB of memory traffic): under 1% of a step's time at the ~500 GFLOP/s this CPU trains at.

    python -m benchmarks.training.regulariser_cost [--steps 8] [--repeats 5]
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from benchmarks.common import interleaved, machine_header, medians, random_images, seconds
from cnnkit.augment import Augment, BatchAugment
from cnnkit.augment_policy import Policy
from cnnkit.config import RECIPE_DIR, TrainConfig
from cnnkit.inference import pick_precision
from cnnkit.models.registry import build_model, get_spec
from cnnkit.preprocess import Preprocess
from cnnkit.training import EpochSettings, make_optimizer, run_epoch
from cnnkit.training.mix import Mix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="steps of 1,024 images per timed epoch")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = TrainConfig.from_file(RECIPE_DIR / "fast-cifar10.yaml")
    images, labels = random_images(cfg.batch_size * args.steps, (3, 32, 32))
    torch.manual_seed(0)
    model = build_model(get_spec(cfg.model), 10, in_channels=3, image_size=(32, 32))
    model.init_from_data(Preprocess.fit(images)(images[:5000]))
    model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    precision = pick_precision(cfg.precision, torch.device("cpu"))
    light = BatchAugment(Augment.preset(cfg.augment, True, **cfg.augment_overrides()))
    base = EpochSettings(batch_size=cfg.batch_size, lr_fn=lambda i: 0.01, preprocess=Preprocess.fit(images, True),
                         precision=precision, label_smoothing=cfg.label_smoothing, augment=light,
                         generator=torch.Generator().manual_seed(0))
    variants = {
        "plain (light augmentation)": base,
        "cutmix 1": dataclasses.replace(base, mix=Mix(cutmix=1.0), mix_generator=torch.Generator().manual_seed(1)),
        "mixup 0.2": dataclasses.replace(base, mix=Mix(mixup=0.2), mix_generator=torch.Generator().manual_seed(1)),
        "cutmix 1 / mixup 0.2, switch 0.5": dataclasses.replace(
            base, mix=Mix(mixup=0.2, cutmix=1.0), mix_generator=torch.Generator().manual_seed(1)),
        "random erasing 0.25": dataclasses.replace(base, augment=dataclasses.replace(light, erasing=0.25)),
        "randaugment 2 ops at 9 (for light)": dataclasses.replace(
            base, augment=BatchAugment(Policy(light.default, "randaugment", 2, 9.0))),
        "trivialaugment (for light)": dataclasses.replace(
            base, augment=BatchAugment(Policy(light.default, "trivialaugment"))),
    }
    perm = torch.arange(len(labels))
    run_epoch(model, optimizer, images, labels, perm[:cfg.batch_size * 2], base)  # warm-up: oneDNN's first calls
    times = medians(interleaved({name: (lambda s=s: seconds(lambda: run_epoch(model, optimizer, images, labels,
                                                                               perm, s)))
                                 for name, s in variants.items()}, args.repeats))
    # The ops alone on one batch: differences of whole epochs are within the machine's noise (a few %),
    # so each op's own time over the plain step's is the cost that can be read
    batch, y = images[:cfg.batch_size], labels[:cfg.batch_size]
    ops = medians(interleaved({name: (lambda s=s: seconds(lambda: batch_ops(s, batch, y)))
                               for name, s in variants.items()}, args.repeats * 3))
    plain, step = times["plain (light augmentation)"], times["plain (light augmentation)"] / args.steps
    print(f"speedrun-small, fast-cifar10's settings ({precision}, batch {cfg.batch_size}), {args.steps} steps, "
          f"medians of {args.repeats}; the ops alone on one batch, medians of {args.repeats * 3}:")
    for name, t in times.items():
        extra = ops[name] - ops["plain (light augmentation)"]
        print(f"  {name:36s} {cfg.batch_size * args.steps / t:6.0f} images/s ({(t - plain) / plain:+6.1%} an epoch) | "
              f"ops {ops[name] * 1000:6.1f} ms a batch, {extra * 1000:+6.1f} ms over light = {extra / step:+6.1%} "
              f"of a {step * 1000:.0f} ms step")


def batch_ops(s: EpochSettings, batch: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What a step does to its batch before the model: the augmentation, then the mixing."""
    x = s.augment(batch, y, s.generator)
    return s.mix(x, s.mix_generator)[0] if s.mix is not None else x

if __name__ == "__main__":
    machine_header()
    main()
