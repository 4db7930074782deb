"""Training-step speed of the fast-mnist network's versions, interleaved, medians of several repeats:

  fast-mnist-3x3           until v0.3.0: 3x3 'same' conv -> ReLU -> max pool -> BatchNorm, three times
  fast-mnist-3x3-pool-relu the same function with each ReLU after its pooling (benchmarks/specs/)
  fast-mnist               today's: a 5x5 stride-2 first conv, then two pool-before-ReLU blocks
  fast-mnist-3x3-stride2   today's with a 3x3 first conv (tried, less accurate in 3 epochs)
  compiled fast-mnist      with --compile: today's under torch.compile (its compile time printed apart)

Each step as `--recipe fast` trains: batch 256 of random 28x28 images, bf16 autocast, channels-last,
fused Adam, label smoothing 0.1.

    python -m benchmarks.training.mnist_net_speed [--repeats 7] [--steps 20] [--compile]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from benchmarks.common import SPECS, interleaved, machine_header, per_second, train_step
from cnnkit import build_model

VERSIONS = {"fast-mnist-3x3": str(SPECS / "fast-mnist-3x3.yaml"),
            "fast-mnist-3x3-pool-relu": str(SPECS / "fast-mnist-3x3-pool-relu.yaml"),
            "fast-mnist": "fast-mnist",
            "fast-mnist-3x3-stride2": str(SPECS / "fast-mnist-3x3-stride2.yaml")}


def make_step(model_name: str, batch: int, compiled: bool = False):
    torch.manual_seed(0)
    model = build_model(model_name, 10, 1).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    forward = torch.compile(model) if compiled else model
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    step = train_step(forward, opt, x, y, label_smoothing=0.1)
    for _ in range(3):  # warm-up: oneDNN primitives, allocator
        step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--compile", action="store_true", help="also today's fast-mnist under torch.compile")
    args = ap.parse_args()
    steps = {name: make_step(spec, args.batch) for name, spec in VERSIONS.items()}
    if args.compile:
        t0 = time.perf_counter()
        steps["compiled fast-mnist"] = make_step("fast-mnist", args.batch, compiled=True)
        print(f"torch.compile: {time.perf_counter() - t0:.1f} s to compile and warm up")
    # interleaved: the machine's drift hits every version alike
    rates = interleaved({name: functools.partial(per_second, step, args.batch, args.steps)
                         for name, step in steps.items()}, args.repeats)
    base = statistics.median(rates["fast-mnist-3x3"])
    for name, r in rates.items():
        print(f"{name:26s} {statistics.median(r):8,.0f} images/s  {statistics.median(r) / base:.2f}x")


if __name__ == "__main__":
    machine_header()
    main()
