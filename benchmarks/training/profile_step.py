"""Where a training step's time goes: torch.profiler over cnnkit's step (Preprocess, bf16 autocast
where the CPU has it, channels-last, fused Adam), the share of the matrix work (convolutions and
matrix products, forward and backward) against everything else (BatchNorm, activations, pooling,
the optimizer, copies), and the top operators.

    python -m benchmarks.training.profile_step [--model fast-mnist] [--batch 256] [--steps 10]
    python -m benchmarks.training.profile_step --model benchmarks/specs/fast-mnist-bn-first.yaml
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import machine_header, train_step
from cnnkit.config import TrainConfig
from cnnkit.inference import pick_precision
from cnnkit.models import build_model, get_spec
from cnnkit.models.registry import default_input
from cnnkit.preprocess import Preprocess
from cnnkit.training import make_optimizer

MATRIX_OPS = ("convolution", "mm", "linear", "matmul", "bmm")  # substrings of the matrix operators' names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fast-mnist")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    shape = default_input(get_spec(args.model)) or (1, 28, 28)
    model = build_model(args.model, 10, in_channels=shape[0],
                        image_size=shape[1:]).to(memory_format=torch.channels_last)
    opt = make_optimizer(TrainConfig(), model)
    pre = Preprocess([0.5] * shape[0], [0.25] * shape[0], channels_last=True)
    x = torch.randint(0, 256, (args.batch, *shape), dtype=torch.uint8)
    y = torch.randint(0, 10, (args.batch,))
    precision = pick_precision("auto", torch.device("cpu"))

    step = train_step(lambda batch: model(pre(batch)), opt, x, y, bf16=precision == "bf16")
    for _ in range(5):  # warm-up: kernels chosen, memory allocated
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    ops = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in ops)
    matrix = sum(e.self_cpu_time_total for e in ops if any(m in e.key for m in MATRIX_OPS))
    print(f"{args.model}, batch {args.batch}, {precision}: {ms:.1f} ms a step, {args.batch / ms * 1e3:,.0f} images/s")
    print(f"matrix work (convolutions, matrix products): {100 * matrix / total:.0f}% of the step; "
          f"everything else: {100 * (total - matrix) / total:.0f}%")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"  {e.key:<45} {100 * e.self_cpu_time_total / total:5.1f}%")


if __name__ == "__main__":
    machine_header()
    main()
