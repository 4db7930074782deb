"""Training throughput of seed-mnist-torch on MNIST: the lecture notes' way against cnnkit's, side
by side in one run, medians of several repeats.

  notes : a DataLoader over a TensorDataset of normalized float tensors, batch 64, fp32, Adam 1e-3,
          the network written as a plain nn.Module as in the notes.
  cnnkit: cnnkit.training.run_epoch (the loop `cnnkit train` runs) with its defaults: uint8 tensors
          sliced by a shuffled index, whole-batch normalization, bf16 autocast where the CPU has it,
          channels-last, fused Adam, batch 128.

Count first: seed-mnist-torch is 13.9 M multiply-adds per image forward (`cnnkit summary
seed-mnist-torch`), so a training step costs about 3 x 2 x 13.9 M = 83 MFLOP per image.

    python benchmarks/train_throughput.py [--data-dir ../shared/data] [--repeats 5] [--images 12800] [--ablation]
    python benchmarks/train_throughput.py --all-nets [--repeats 3]

--all-nets: every seed network (and the fast recipes' networks), the notes' loop (DataLoader over
float tensors, fp32, per-tensor Adam, the notes' batch size) against cnnkit's (run_epoch, batch 128,
bf16 where the CPU has it, channels-last, fused Adam), on random images of each network's input
shape (dense kernels take the same time whatever the pixels), with the machine's ceilings: a
4096^3 matmul in bf16 and in fp32. FLOP per training image is taken as 3 x 2 x multiply-adds.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from cnnkit import build_model, load_dataset, summary
from cnnkit.config import TrainConfig
from cnnkit.inference import pick_precision
from cnnkit.preprocess import Preprocess
from cnnkit.training import make_optimizer, run_epoch


class NotesNet(nn.Module):
    """seed-mnist-torch as the notes write it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 1024)
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(1024, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.dropout(F.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)


def notes_loop(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 64,
               warmup_steps: int = 5) -> float:
    """Images per second of the notes' loop (after a few warm-up steps): a DataLoader over normalized
    float tensors (as ToTensor + Normalize give), fp32, per-tensor Adam 1e-3."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    seen, start = 0, None
    for step, (xb, yb) in enumerate(DataLoader(TensorDataset(x, labels), batch_size=batch_size, shuffle=True)):
        if step == warmup_steps:
            start, seen = time.perf_counter(), 0
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(yb)
    return seen / (time.perf_counter() - start)


def notes_way(images_u8: torch.Tensor, labels: torch.Tensor) -> float:
    """The notes' loop on seed-mnist-torch as the notes write it."""
    return notes_loop(NotesNet(), (images_u8.float() / 255 - 0.1307) / 0.3081, labels)


def cnnkit_loop(model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int = 128,
                precision: str = "auto", channels_last: bool = True, fused: bool = True,
                warmup_steps: int = 5) -> float:
    """Images per second of cnnkit's loop (training.run_epoch) over uint8 images."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(TrainConfig(optimizer="adam", lr=1e-3), model) if fused else \
        torch.optim.Adam(model.parameters(), lr=1e-3)
    norm = Preprocess.fit(images_u8[:5000], channels_last=channels_last)
    precision = pick_precision(precision, torch.device("cpu"))
    kw = dict(batch_size=batch_size, lr_fn=lambda i: 1e-3, precision=precision)
    run_epoch(model, opt, images_u8, labels, torch.randperm(len(labels))[: warmup_steps * batch_size], norm, **kw)
    start = time.perf_counter()
    _, _, seen, _ = run_epoch(model, opt, images_u8, labels, torch.randperm(len(labels)), norm, **kw)
    return seen / (time.perf_counter() - start)


def cnnkit_way(images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int = 128, precision: str = "auto",
               channels_last: bool = True, fused: bool = True) -> float:
    return cnnkit_loop(build_model("seed-mnist-torch", 10), images_u8, labels, batch_size, precision, channels_last, fused)


# network -> (input shape, the notes' batch size)
ALL_NETS = {"seed-mnist-torch": ((1, 28, 28), 64), "seed-mnist-keras": ((1, 28, 28), 128),
            "seed-cifar10": ((3, 32, 32), 32), "seed-patch64": ((3, 64, 64), 32),
            "fast-mnist": ((1, 28, 28), 64), "mnist-stride2": ((1, 28, 28), 64)}


def matmul_ceiling(dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of an n x n x n matmul: the most the CPU's matrix units give this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def all_nets(repeats: int, images: int) -> None:
    bf16, fp32 = matmul_ceiling(torch.bfloat16), matmul_ceiling(torch.float32)
    print(f"ceilings ({torch.get_num_threads()} threads): bf16 matmul {bf16 / 1e9:.0f} GFLOP/s, "
          f"fp32 matmul {fp32 / 1e9:.0f} GFLOP/s")
    print(f"{'network':<18} {'MACs/img':>9} {'notes img/s':>12} {'GFLOP/s':>8} {'% fp32':>7} "
          f"{'cnnkit img/s':>13} {'GFLOP/s':>8} {'% bf16':>7} {'ratio':>6}")
    for name, (shape, batch) in ALL_NETS.items():
        n = images if shape[1] <= 32 else images // 4  # 64 px images: a quarter as many
        g = torch.Generator().manual_seed(0)
        u8 = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g)
        x = (u8.float() / 255 - 0.5) / 0.25
        macs = summary(build_model(name, 10, in_channels=shape[0], image_size=shape[1:]))["macs_per_image"]
        notes, ours = [], []
        for r in range(repeats):  # interleaved
            torch.manual_seed(r)
            build = lambda: build_model(name, 10, in_channels=shape[0], image_size=shape[1:])  # noqa: E731
            notes.append(notes_loop(build(), x, labels, batch, warmup_steps=3))
            ours.append(cnnkit_loop(build(), u8, labels, warmup_steps=3))
        a, b = statistics.median(notes), statistics.median(ours)
        fa, fb = a * 6 * macs, b * 6 * macs
        print(f"{name:<18} {macs / 1e6:>8.1f}M {a:>12.0f} {fa / 1e9:>8.0f} {100 * fa / fp32:>6.0f}% "
              f"{b:>13.0f} {fb / 1e9:>8.0f} {100 * fb / bf16:>6.0f}% {b / a:>5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
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
            "cnnkit b128 bf16 channels-last, foreach Adam": lambda: cnnkit_way(images, labels, 128, "bf16", True, False),
            "cnnkit b64 bf16": lambda: cnnkit_way(images, labels, 64, "bf16", False),
            "cnnkit b64 bf16 channels-last": lambda: cnnkit_way(images, labels, 64, "bf16", True),
            "cnnkit b128 fp32 channels-last": lambda: cnnkit_way(images, labels, 128, "fp32", True),
            "cnnkit b256 bf16 channels-last": lambda: cnnkit_way(images, labels, 256, "bf16", True),
        })
    results: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):  # interleaved, so drifts in machine speed hit every variant alike
        for name, fn in variants.items():
            torch.manual_seed(r)
            results[name].append(fn())
    base = statistics.median(results["notes (DataLoader, b64, fp32)"])
    print(f"seed-mnist-torch on MNIST, {args.images} images per repeat, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'variant':<44} {'img/s (median)':>15} {'min':>7} {'max':>7} {'GFLOP/s':>8} {'ratio':>6}")
    for name, vals in results.items():
        med = statistics.median(vals)
        print(f"{name:<44} {med:>15.0f} {min(vals):>7.0f} {max(vals):>7.0f} "
              f"{med * flop_per_image / 1e9:>8.1f} {med / base:>5.2f}x")


if __name__ == "__main__":
    from cnnkit.hardware import machine_line
    print(machine_line(), flush=True)  # the machine every figure below was measured on
    main()
