"""Which signature tells copies from different images? On 3,000 distinct MNIST test digits decoded
at 64x64 (as a folder is), with copies of the first 300 (resized to 56x56, JPEG quality 60 and 75,
1- and 2-pixel borders cropped), compared with: imagehash's pHash (64 and 256 bits; Hamming
distance) and cnnkit audit's signature (32x32 grey thumbnails, cosine, best over centre-crop scales).
A good signature puts every copy closer than every pair of different digits.

    python -m benchmarks.data.duplicate_signatures      (needs `pip install imagehash`)
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

import cnnkit
from benchmarks.common import SHARED_DATA, machine_header
from cnnkit.audit import CROP_SCALES, NEAR_THRESHOLD, thumbnails
from cnnkit.decode import decode_image

COPIES = {
    "resized 56x56": lambda im: (im.resize((56, 56), Image.Resampling.BICUBIC), "PNG", {}),
    "JPEG q60": lambda im: (im, "JPEG", {"quality": 60}),
    "JPEG q75": lambda im: (im, "JPEG", {"quality": 75}),
    "cropped 1 px": lambda im: (im.crop((1, 1, 27, 27)), "PNG", {}),
    "cropped 2 px": lambda im: (im.crop((2, 2, 26, 26)), "PNG", {}),
}


def decoded(img: Image.Image, fmt: str = "PNG", **kw) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    buf.seek(0)
    return decode_image(buf, 64, 1)  # (1, 64, 64)


def main() -> None:
    import imagehash

    digits = cnnkit.load_dataset("mnist", data_dir=str(SHARED_DATA), quiet=True).test.images[:3000, 0]
    originals = [Image.fromarray(d.numpy()) for d in digits]
    base = np.stack([decoded(im) for im in originals])  # (3000, 1, 64, 64)
    copies = {kind: np.stack([decoded(*make(im)[:2], **make(im)[2]) for im in originals[:300]])
              for kind, make in COPIES.items()}
    iu = np.triu_indices(len(base), 1)
    print(f"{'signature':<28} {'different digits (closest; pairs that close)':<46} "
          + " ".join(f"{k:>14}" for k in COPIES))
    for bits in (8, 16):
        h = lambda a: imagehash.phash(Image.fromarray(a[0]), hash_size=bits).hash.ravel()  # noqa: E731
        hb = np.stack([h(a) for a in base]).astype(np.uint8)  # (3000, bits^2)
        dist = (hb @ (1 - hb).T + (1 - hb) @ hb.T)[iu]  # Hamming distances of distinct pairs
        worst = [int(max((h(c) != hb[i]).sum() for i, c in enumerate(copies[k]))) for k in COPIES]
        closest = (f"min {dist.min()} ({(dist == dist.min()).sum():,} pairs), "
                   f"{(dist <= max(worst)).sum():,} <= {max(worst)}")
        print(f"{f'pHash {bits * bits} bits (distance)':<28} {closest:<46} "
              + " ".join(f"{f'max {w}':>14}" for w in worst))
    tb = thumbnails(torch.from_numpy(base))
    sims = (tb @ tb.T).numpy()[iu]
    worst = []
    for k in COPIES:
        tc = thumbnails(torch.from_numpy(copies[k]))
        best = torch.stack([(thumbnails(torch.from_numpy(base[:300]), s) * tc).sum(1)
                            for s in (1.0, *CROP_SCALES)]).amax(0)
        worst.append(float(best.min()))
    print(f"{'thumbnail cosine (audit)':<28} "
          f"{f'max {sims.max():.4f}, {(sims >= NEAR_THRESHOLD).sum():,} pairs >= {NEAR_THRESHOLD}':<46} "
          + " ".join(f"{f'min {w:.4f}':>14}" for w in worst))


if __name__ == "__main__":
    machine_header()
    main()
