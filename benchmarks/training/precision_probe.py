"""Does `--precision auto` pick the faster precision? fp32 against bf16 training throughput of every
seed network, side by side in one run (interleaved repeats, medians), beside what auto chose and why.

Each repeat is cnnkit's own training loop (training.run_epoch: batch 128, channels-last, fused Adam)
over random uint8 images of the network's input shape (dense kernels take the same time whatever the
pixels). The verdict column says whether auto's precision is within 10% of the faster one.

    python -m benchmarks.training.precision_probe [--repeats 3] [--images 2560] [--layouts]
    CNNKIT_CPU_FLAGS="avx2 avx512f avx512_vnni" python -m benchmarks.training.precision_probe   # auto as on an Ice Lake

--layouts also times each precision with contiguous (NCHW) activations against cnnkit's default
channels-last (NHWC), the other layout choice that may differ between CPUs.

The probe itself (hardware._probe_step_seconds) is timed too: it must stay well under a second.
"""
from __future__ import annotations

import argparse
import functools
import time

from benchmarks.common import cnnkit_loop, interleaved, machine_header, medians, random_images
from cnnkit import build_model
from cnnkit.hardware import _probe_step_seconds, precision_choice

SEED_NETS = {"seed-digits": (1, 8, 8), "seed-mnist-torch": (1, 28, 28), "seed-mnist-keras": (1, 28, 28),
             "seed-cifar10": (3, 32, 32), "seed-patch64": (3, 64, 64)}


def speeds(name: str, shape: tuple[int, int, int], args, variants: dict) -> dict:
    """Median images/s of cnnkit's loop training `name` on random images of its shape, a variant (keyword
    arguments of cnnkit_loop) at a time, in interleaved repeats (so a drift in machine speed hits all)."""
    u8, labels = random_images(args.images, shape)

    def run(kw: dict) -> float:
        model = build_model(name, 10, in_channels=shape[0], image_size=shape[1:])
        return cnnkit_loop(model, u8, labels, warmup_steps=3, **kw)
    return medians(interleaved({v: functools.partial(run, kw) for v, kw in variants.items()}, args.repeats, seed=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=2560, help="training images per timed repeat (64 px: a quarter)")
    ap.add_argument("--layouts", action="store_true", help="also contiguous (NCHW) against channels-last")
    args = ap.parse_args()
    if args.layouts:
        return layouts(args)

    t0 = time.perf_counter()
    probe = _probe_step_seconds()
    probe_s = time.perf_counter() - t0
    auto, why = precision_choice("auto", "cpu")
    print(f"probe: {probe_s:.2f} s in all; one step {probe['fp32'] * 1e3:.1f} ms fp32, "
          f"{probe['bf16'] * 1e3:.1f} ms bf16 ({probe['fp32'] / probe['bf16']:.2f}x)")
    print(f"auto chose {auto}: {why}")
    print(f"{'network':<18} {'fp32 img/s':>11} {'bf16 img/s':>11} {'bf16/fp32':>10} {'auto':>5} {'auto/best':>10}")
    worst = 1.0
    for name, shape in SEED_NETS.items():
        speed = speeds(name, shape, args, {p: {"precision": p} for p in ("fp32", "bf16")})
        fp32, bf16 = speed["fp32"], speed["bf16"]
        share = (fp32 if auto == "fp32" else bf16) / max(fp32, bf16)
        worst = min(worst, share)
        print(f"{name:<18} {fp32:>11.0f} {bf16:>11.0f} {bf16 / fp32:>9.2f}x {auto:>5} {share:>9.0%}"
              f"{'' if share >= 0.9 else '  <- auto is more than 10% slower than the best'}")
    print(f"auto within 10% of the faster precision on every seed network: {'yes' if worst >= 0.9 else 'NO'}")


def layouts(args) -> None:
    """Images/s of each seed network in fp32 and bf16, channels-last against contiguous."""
    variants = [(p, cl) for p in ("fp32", "bf16") for cl in (True, False)]
    print(f"{'network':<18} " + " ".join(f"{p + (' NHWC' if cl else ' NCHW'):>10}" for p, cl in variants)
          + f" {'fp32 NHWC/NCHW':>15} {'bf16 NHWC/NCHW':>15}")
    for name, shape in SEED_NETS.items():
        med = speeds(name, shape, args, {(p, cl): {"precision": p, "channels_last": cl} for p, cl in variants})
        print(f"{name:<18} " + " ".join(f"{med[v]:>10.0f}" for v in variants)
              + f" {med[('fp32', True)] / med[('fp32', False)]:>14.2f}x"
                f" {med[('bf16', True)] / med[('bf16', False)]:>14.2f}x")


if __name__ == "__main__":
    machine_header()
    main()
