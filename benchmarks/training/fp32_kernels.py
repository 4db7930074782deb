"""fp32 training of the seed networks on this CPU, the kernel and layout choices side by side: what
`--precision fp32` trains with (the default where bf16 is emulated, as on an Ice Lake Xeon) against
each alternative, interleaved, medians of several repeats.

  cnnkit      : cnnkit's loop (training.run_epoch): channels-last, oneDNN convolutions, fused Adam
  contiguous  : the same in NCHW
  native conv : oneDNN off (torch.backends.mkldnn.enabled = False): PyTorch's own im2col + GEMM
                convolutions, which can win on small layers where oneDNN's reorders dominate
  foreach Adam: the per-tensor-list Adam instead of the fused kernel
  compiled    : torch.compile of the model (--compile; compile time reported apart)

    python -m benchmarks.training.fp32_kernels [--repeats 3] [--steps 40] [--compile]
"""
from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import torch

from benchmarks.common import ALL_NETS, interleaved, machine_header, medians
from cnnkit.config import TrainConfig
from cnnkit.models import build_model
from cnnkit.preprocess import Preprocess
from cnnkit.training import EpochSettings, make_optimizer, run_epoch

# torch warns about Intel-GPU TF32 each time the oneDNN flags are set: not this CPU's business
warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")

NETS = {"seed-mnist-keras": 100, **{k: v[1] for k, v in ALL_NETS.items() if k in
                                    ("seed-mnist-torch", "seed-cifar10", "seed-patch64")}}


def variant_step(name: str, shape: tuple[int, int, int], batch: int, steps: int):
    """A function timing `steps` fp32 training steps of `name` in one variant (images/s), set up once."""
    def make(channels_last: bool, fused: bool, compiled: bool):
        torch.manual_seed(0)
        model = build_model(name, 10, in_channels=shape[0], image_size=shape[1:])
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        cfg = TrainConfig(optimizer="adam", lr=1e-3)
        opt = make_optimizer(cfg, model) if fused else torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
        trained = torch.compile(model) if compiled else model
        images = torch.randint(0, 256, (batch * steps, *shape), dtype=torch.uint8)
        labels = torch.randint(0, 10, (batch * steps,))
        norm = Preprocess([0.5] * shape[0], [0.25] * shape[0], channels_last=channels_last)
        settings = EpochSettings(batch_size=batch, lr_fn=lambda i: 1e-3, preprocess=norm, precision="fp32")
        t0 = time.perf_counter()
        run_epoch(trained, opt, images, labels, torch.arange(batch * 3), settings)  # warm-up (and compile)
        warm = time.perf_counter() - t0

        def timed() -> float:
            start = time.perf_counter()
            _, _, seen, _ = run_epoch(trained, opt, images, labels, torch.randperm(len(labels)), settings)
            return seen / (time.perf_counter() - start)
        return timed, warm
    return make


def with_onednn(timed, onednn: bool):
    """timed, called with oneDNN off where onednn is False (on, as it is by default, otherwise)."""
    def call() -> float:
        with torch.backends.mkldnn.flags(enabled=onednn) if not onednn else contextlib.nullcontext():
            return timed()
    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    variants = {"cnnkit": (True, True, False, True), "contiguous": (False, True, False, True),
                "native conv": (True, True, False, False), "foreach Adam": (True, False, False, True)}
    if args.compile:
        variants["compiled"] = (True, True, True, True)
    print(f"fp32 training, images/s, medians of {args.repeats} interleaved repeats of {args.steps} steps "
          f"({torch.get_num_threads()} threads)")
    print(f"{'network':<18} {'batch':>5} " + " ".join(f"{v:>13}" for v in variants) + "   best")
    for name, batch in NETS.items():
        shape = ALL_NETS[name][0]
        make = variant_step(name, shape, batch, args.steps)
        timers, notes = {}, []
        for v, (cl, fused, compiled, onednn) in variants.items():
            with torch.backends.mkldnn.flags(enabled=onednn):
                timers[v], warm = make(cl, fused, compiled)
            if compiled:
                notes.append(f"compile {warm:.1f} s")
        med = medians(interleaved({v: with_onednn(timers[v], onednn) for v, (_, _, _, onednn) in variants.items()},
                                  args.repeats))
        best = max(med, key=med.get)
        base = med["cnnkit"]
        print(f"{name:<18} {batch:>5} " + " ".join(f"{med[v]:>7.0f} {med[v] / base:4.2f}x" for v in variants)
              + f"   {best}" + (f" ({', '.join(notes)})" if notes else ""), flush=True)


if __name__ == "__main__":
    machine_header()
    main()
