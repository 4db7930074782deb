"""PyTorch against onnxruntime for prediction on this machine, fp32, medians of --repeats:
(1) images/s of onnxruntime per call size (what onnxrun.BATCH is chosen from), (2) milliseconds for
one image alone and per image in a batch of 64, in both runtimes (what batching can save a server).

    python -m benchmarks.inference.runtimes [--repeats 5]

Networks with seeded random weights (speed does not depend on them), exported as `cnnkit export`
does, on random uint8 images.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_header, median_seconds
from cnnkit.export import export
from cnnkit.inference import probabilities
from cnnkit.models.registry import architecture_record, build_model, get_spec
from cnnkit.onnxrun import OnnxRunner

NETS = {"seed-mnist-torch": (1, 28), "seed-cifar10": (3, 32), "seed-patch64": (3, 64)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=2048)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cnnkit-runtimes-"))
    print(f"{'network':<18} {'onnx images/s at call size 64 / 128 / 256 / 512':<50} "
          f"{'1 image alone, ms (torch / onnx)':<34} per image in 64 (torch / onnx)")
    for name, (c, h) in NETS.items():
        torch.manual_seed(0)
        model = build_model(get_spec(name), 10, in_channels=c, image_size=(h, h)).eval()
        meta = {"class_names": [str(i) for i in range(10)], "input": {"channels": c, "height": h, "width": h},
                "preprocessing": {"mean": [0.5] * c, "std": [0.25] * c}, "architecture": architecture_record(model)}
        path = export(model, meta, "onnx", tmp / f"{name}.onnx")
        runner = OnnxRunner(path)
        x = np.random.default_rng(0).integers(0, 256, (args.images, c, h, h), dtype=np.uint8)
        xt = torch.from_numpy(x)
        per_call = []
        for size in (64, 128, 256, 512):
            run = lambda: [runner.session.run(None, {runner.input_name: np.ascontiguousarray(  # noqa: E731
                x[i:i + size].transpose(0, 2, 3, 1))}) for i in range(0, len(x), size)]
            per_call.append(len(x) / median_seconds(run, args.repeats))
        single = [1000 * median_seconds(lambda: [probabilities(model, meta, xt[i:i + 1]) for i in range(64)],
                                        args.repeats) / 64,
                  1000 * median_seconds(lambda: [runner(x[i:i + 1]) for i in range(64)], args.repeats) / 64]
        batched = [1000 * median_seconds(lambda: probabilities(model, meta, xt[:64]), args.repeats) / 64,
                   1000 * median_seconds(lambda: runner(x[:64]), args.repeats) / 64]
        print(f"{name:<18} {' / '.join(f'{v:,.0f}' for v in per_call):<50} "
              f"{single[0]:.3f} / {single[1]:.3f}{'':<20} {batched[0]:.3f} / {batched[1]:.3f}")


if __name__ == "__main__":
    machine_header()
    main()
