"""torch.compile against eager for a training step of the speedrun nets on this machine (bf16
autocast, channels-last, Nesterov SGD), interleaved, medians of several repeats; compile time apart.

    python -m benchmarks.training.compile_speed [--repeats 3] [--steps 6] [--batch 512]
"""
from __future__ import annotations

import argparse
import functools
import time

import torch

from benchmarks.common import interleaved, machine_header, medians, per_second, train_step
from cnnkit.models.speedrun import SpeedrunNet


def make_step(widths: tuple[int, int, int], compiled: bool, batch: int):
    torch.manual_seed(0)
    model = SpeedrunNet(widths=widths).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.85, nesterov=True)
    forward = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    return train_step(forward, opt, x, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args()
    for widths in ((64, 128, 128), (64, 256, 256)):
        steps, warm = {}, {}
        for compiled in (False, True):
            steps[compiled] = make_step(widths, compiled, args.batch)
            t0 = time.perf_counter()
            steps[compiled]()
            steps[compiled]()  # the compiled graph is built during these
            warm[compiled] = time.perf_counter() - t0
        rates = medians(interleaved({c: functools.partial(per_second, step, args.batch, args.steps)
                                     for c, step in steps.items()}, args.repeats))
        eager, comp = rates[False], rates[True]
        print(f"widths {widths}: eager {eager:,.0f} images/s, compiled {comp:,.0f} images/s ({comp / eager:.2f}x); "
              f"first two steps {warm[False]:.1f} s eager, {warm[True]:.1f} s compiled", flush=True)


if __name__ == "__main__":
    machine_header()
    main()
