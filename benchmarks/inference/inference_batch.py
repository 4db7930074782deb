"""Which inference batch size is fastest on this machine? `predict_logits` over uint8 images for the
notes' networks, in fp32 (tests, evaluation) and bf16 (per-epoch validation), at several batch sizes,
interleaved, medians of --repeats; ratios against 512 (cnnkit's default before issue 9), and the
largest logit difference against it (the result must not depend on the batch size).

    python -m benchmarks.inference.inference_batch [--repeats 3] [--images 8000]
"""
from __future__ import annotations

import argparse
import functools
import statistics

import torch

from benchmarks.common import interleaved, machine_header, timed_call
from cnnkit.inference import predict_logits
from cnnkit.models import build_model
from cnnkit.preprocess import Preprocess

NETS = {"seed-mnist-torch": (1, 28, 28), "seed-mnist-keras": (1, 28, 28), "seed-cifar10": (3, 32, 32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512])
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{'network':<18} {'precision':<9} " + " ".join(f"{'b' + str(b):>12}" for b in args.batches))
    for name, shape in NETS.items():
        x = torch.randint(0, 256, (args.images, *shape), dtype=torch.uint8)
        model = build_model(name, 10, in_channels=shape[0], image_size=shape[1:]).eval()
        model = model.to(memory_format=torch.channels_last)
        pre = Preprocess([0.5] * shape[0], [0.25] * shape[0], channels_last=True)
        for precision in ("fp32", "bf16"):
            outs = {}

            def run(b: int) -> float:
                outs[b], took = timed_call(lambda: predict_logits(model, x, pre, torch.device("cpu"), precision,
                                                                  batch_size=b))
                return took
            # interleaved, so drift of the machine hits every size alike
            times = interleaved({b: functools.partial(run, b) for b in args.batches}, args.repeats)
            ref = 512 if 512 in times else args.batches[-1]
            cells = []
            for b in args.batches:
                med = statistics.median(times[b])
                diff = float((outs[b] - outs[ref]).abs().max())
                cells.append(f"{args.images / med:6.0f}/s {statistics.median(times[ref]) / med:4.2f}x" +
                             ("" if diff == 0 else f" d{diff:.0e}"))
            print(f"{name:<18} {precision:<9} " + " ".join(f"{c:>12}" for c in cells))
    print(f"images/s and speed-up against batch {ref}; 'd' marks a logit difference from it (none: identical)")


if __name__ == "__main__":
    machine_header()
    main()
