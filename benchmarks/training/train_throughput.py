"""Training throughput of seed-mnist-torch on MNIST: the lecture notes' way against cnnkit's, side
by side in one run, medians of several repeats.

  notes : a DataLoader over a TensorDataset of normalized float tensors, batch 64, fp32, Adam 1e-3,
          the network written as a plain nn.Module as in the notes.
  cnnkit: cnnkit.training.run_epoch (the loop `cnnkit train` runs) with its defaults: uint8 tensors
          sliced by a shuffled index, whole-batch normalization, bf16 autocast where the CPU has it,
          channels-last, fused Adam, batch 128.

Count first: seed-mnist-torch is 13.9 M multiply-adds per image forward (`cnnkit summary
seed-mnist-torch`), so a training step costs about 3 x 2 x 13.9 M = 83 MFLOP per image.

    python -m benchmarks.training.train_throughput [--data-dir ../shared/data] [--repeats 5] [--images 12800]
        [--ablation]
    python -m benchmarks.training.train_throughput --all-nets [--repeats 3]

--all-nets: every seed network (and the fast recipes' networks), the notes' loop (DataLoader over
float tensors, fp32, per-tensor Adam, the notes' batch size) against cnnkit's (run_epoch, batch 128,
bf16 where the CPU has it, channels-last, fused Adam), on random images of each network's input
shape (dense kernels take the same time whatever the pixels), with the machine's ceilings: a
4096^3 matmul in bf16 and in fp32. FLOP per training image is taken as 3 x 2 x multiply-adds.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import (ALL_NETS, SHARED_DATA, NotesNet, cnnkit_loop, interleaved, machine_header,
                               median_seconds, medians, notes_loop, notes_normalize, random_images)
from cnnkit import build_model, load_dataset, summary
from cnnkit.inference import pick_precision


def notes_way(images_u8: torch.Tensor, labels: torch.Tensor) -> float:
    """The notes' loop on seed-mnist-torch as the notes write it."""
    return notes_loop(NotesNet(), notes_normalize(images_u8), labels)


def cnnkit_way(images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int = 128, precision: str = "auto",
               channels_last: bool = True, fused: bool = True) -> float:
    return cnnkit_loop(build_model("seed-mnist-torch", 10), images_u8, labels, batch_size, precision, channels_last,
                       fused)


def matmul_ceiling(dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of an n x n x n matmul: the most the CPU's matrix units give this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / median_seconds(lambda: a @ b, repeats)


def all_nets(repeats: int, images: int) -> None:
    bf16, fp32 = matmul_ceiling(torch.bfloat16), matmul_ceiling(torch.float32)
    print(f"ceilings ({torch.get_num_threads()} threads): bf16 matmul {bf16 / 1e9:.0f} GFLOP/s, "
          f"fp32 matmul {fp32 / 1e9:.0f} GFLOP/s")
    print(f"{'network':<18} {'MACs/img':>9} {'notes img/s':>12} {'GFLOP/s':>8} {'% fp32':>7} "
          f"{'cnnkit img/s':>13} {'GFLOP/s':>8} {'% bf16':>7} {'ratio':>6}")
    for name, (shape, batch) in ALL_NETS.items():
        u8, labels = random_images(images, shape)  # 64 px images: a quarter as many
        x = (u8.float() / 255 - 0.5) / 0.25
        build = lambda: build_model(name, 10, in_channels=shape[0], image_size=shape[1:])  # noqa: E731
        macs = summary(build())["macs_per_image"]
        speed = medians(interleaved({"notes": lambda: notes_loop(build(), x, labels, batch, warmup_steps=3),
                                     "cnnkit": lambda: cnnkit_loop(build(), u8, labels, warmup_steps=3)},
                                    repeats, seed=True))
        a, b = speed["notes"], speed["cnnkit"]
        fa, fb = a * 6 * macs, b * 6 * macs
        print(f"{name:<18} {macs / 1e6:>8.1f}M {a:>12.0f} {fa / 1e9:>8.0f} {100 * fa / fp32:>6.0f}% "
              f"{b:>13.0f} {fb / 1e9:>8.0f} {100 * fb / bf16:>6.0f}% {b / a:>5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(SHARED_DATA))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=12800, help="training images per timed repeat")
    ap.add_argument("--ablation", action="store_true", help="also time each of cnnkit's changes on its own")
    ap.add_argument("--all-nets", action="store_true", help="every seed network against the machine's ceilings")
    args = ap.parse_args()
    if args.all_nets:
        return all_nets(args.repeats, args.images)

    ds = load_dataset("mnist", data_dir=args.data_dir, quiet=True)
    images, labels = ds.train.images[: args.images].contiguous(), ds.train.labels[: args.images].contiguous()
    macs = summary(build_model("seed-mnist-torch", 10))["macs_per_image"]
    flop_per_image = 3 * 2 * macs  # forward + two backward products
    precision = pick_precision("auto", torch.device("cpu"))
    variants = {
        "notes (DataLoader, b64, fp32)": lambda: notes_way(images, labels),
        f"cnnkit default (b128, {precision}, channels-last)": lambda: cnnkit_way(images, labels),
    }
    if args.ablation:
        variants.update({
            "cnnkit b64 fp32 (slicing only)": lambda: cnnkit_way(images, labels, 64, "fp32", False, False),
            "cnnkit b64 fp32 fused Adam": lambda: cnnkit_way(images, labels, 64, "fp32", False),
            "cnnkit b128 bf16 channels-last, foreach Adam":
                lambda: cnnkit_way(images, labels, 128, "bf16", True, False),
            "cnnkit b64 bf16": lambda: cnnkit_way(images, labels, 64, "bf16", False),
            "cnnkit b64 bf16 channels-last": lambda: cnnkit_way(images, labels, 64, "bf16", True),
            "cnnkit b128 fp32 channels-last": lambda: cnnkit_way(images, labels, 128, "fp32", True),
            "cnnkit b256 bf16 channels-last": lambda: cnnkit_way(images, labels, 256, "bf16", True),
        })
    results = interleaved(variants, args.repeats, seed=True)
    med = medians(results)
    base = med["notes (DataLoader, b64, fp32)"]
    print(f"seed-mnist-torch on MNIST, {args.images} images per repeat, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'variant':<44} {'img/s (median)':>15} {'min':>7} {'max':>7} {'GFLOP/s':>8} {'ratio':>6}")
    for name, vals in results.items():
        print(f"{name:<44} {med[name]:>15.0f} {min(vals):>7.0f} {max(vals):>7.0f} "
              f"{med[name] * flop_per_image / 1e9:>8.1f} {med[name] / base:>5.2f}x")


if __name__ == "__main__":
    machine_header()
    main()
