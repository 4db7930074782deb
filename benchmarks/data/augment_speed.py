"""cnnkit's batch augmentation (plain torch ops, cnnkit/augment.py) against kornia's equivalent
augmentations on the same batches: milliseconds per batch, medians of --repeats, interleaved, and the
ratio kornia / cnnkit. kornia gets float images in [0, 1] (its convention; the conversion is
included, as training would need it); cnnkit takes the uint8 batch as training gathers it.

    pip install kornia   # for this benchmark only
    python -m benchmarks.data.augment_speed [--batch 128] [--size 32] [--repeats 20] [--threads N]

The policies (cnnkit/augment_policy.py) against kornia.augmentation.auto's: note that kornia draws
RandAugment's ops once per batch (every image the same ops, only magnitudes' signs per image), while
cnnkit draws them per image and runs each op on the images that drew it, so kornia's does less work.
Random erasing: cnnkit fills with per-pixel noise, kornia with a constant.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleaved, machine_header, medians, seconds
from cnnkit.augment import Augment, random_erasing
from cnnkit.augment_policy import Policy


def kornia_ops(size: int) -> dict:
    import kornia.augmentation as K
    blur = 2 * (3 * 1) + 1
    return {
        "shift 10%": K.RandomAffine(0.0, translate=(0.1, 0.1), padding_mode="border", p=1.0),
        "hflip": K.RandomHorizontalFlip(p=0.5),
        "rotate+scale+shear": K.RandomAffine(15.0, scale=(0.85, 1.15), shear=10.0, padding_mode="border", p=1.0),
        "perspective": K.RandomPerspective(0.2, p=1.0),
        "cutout 25%": K.RandomErasing(scale=(0.0625, 0.0625), ratio=(1.0, 1.0), value=0.5, p=1.0),
        "brightness+contrast": K.ColorJitter(brightness=0.3, contrast=0.3, p=1.0),
        "saturation": K.ColorJitter(saturation=0.3, p=1.0),
        "noise": K.RandomGaussianNoise(std=8 / 255, p=1.0),
        "blur": K.RandomGaussianBlur((blur, blur), sigma=(0.1, 1.0), p=1.0),
        "preset light": K.AugmentationSequential(K.RandomAffine(0.0, translate=(0.1, 0.1), padding_mode="border"),
                                                 K.RandomHorizontalFlip()),
        "preset strong": K.AugmentationSequential(
            K.RandomAffine(15.0, translate=(0.125, 0.125), scale=(0.85, 1.15), shear=10.0, padding_mode="border"),
            K.RandomHorizontalFlip(), K.RandomPerspective(0.2, p=1.0),
            K.ColorJitter(0.3, 0.3, 0.3, p=1.0), K.RandomGaussianBlur((blur, blur), sigma=(0.1, 1.0), p=1.0),
            K.RandomGaussianNoise(std=8 / 255, p=1.0),
            K.RandomErasing(scale=(0.0625, 0.0625), ratio=(1.0, 1.0), p=1.0)),
        "randaugment 2 ops, m 9": K.auto.RandAugment(n=2, m=9),
        "trivialaugment": K.auto.TrivialAugment(),
        "random erasing 0.25": K.RandomErasing(scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), p=0.25),
    }


OURS = {
    "shift 10%": Augment(shift=0.1), "hflip": Augment(hflip=0.5),
    "rotate+scale+shear": Augment(rotate=15, scale=0.15, shear=10), "perspective": Augment(perspective=0.1),
    "cutout 25%": Augment(cutout=0.25), "brightness+contrast": Augment(brightness=0.3, contrast=0.3),
    "saturation": Augment(saturation=0.3), "noise": Augment(noise=8.0), "blur": Augment(blur=1.0),
    "preset light": Augment.preset("light"), "preset strong": Augment.preset("strong"),
    "randaugment 2 ops, m 9": Policy(Augment(), "randaugment", 2, 9.0),
    "trivialaugment": Policy(Augment(), "trivialaugment"),
    "random erasing 0.25": lambda x, g: random_erasing(x.float(), 0.25, g),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, the cores)")
    ap.add_argument("--only", default="", help="only the ops whose name contains this, e.g. 'augment'")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
    theirs = kornia_ops(args.size)
    g = torch.Generator().manual_seed(0)
    print(f"batch {args.batch} x 3 x {args.size} x {args.size}, {torch.get_num_threads()} threads, "
          "ms per batch (median)")
    print(f"{'op':<22} {'cnnkit':>8} {'kornia':>8} {'kornia/cnnkit':>14}")
    for name, ours in OURS.items():
        if args.only not in name:
            continue
        med = medians(interleaved({"cnnkit": lambda: seconds(lambda: ours(x, g)),
                                   "kornia": lambda: seconds(lambda: theirs[name](x.float() / 255))}, args.repeats))
        a, b = med["cnnkit"] * 1e3, med["kornia"] * 1e3
        print(f"{name:<22} {a:8.2f} {b:8.2f} {b / a:13.1f}x")


if __name__ == "__main__":
    machine_header()
    main()
