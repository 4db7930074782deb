"""`cnnkit audit`: what a dataset holds before anyone trains on it (numbers only).

- Exact duplicates: the same decoded pixels (a hash of each image's bytes), within and across splits.
- Near duplicates: the same picture resized, re-encoded or slightly cropped. Each image becomes a
  32x32 grey thumbnail, mean-centred and scaled to unit length; two images are near duplicates when
  the cosine similarity of their thumbnails is at least NEAR_THRESHOLD, comparing every image's
  thumbnail with every other's and with the thumbnails of every image's centre crops at
  CROP_SCALES (so a copy with a narrow border trimmed still meets its original).
  Candidates come from a 64-dimensional PCA projection (a fast matrix product over all pairs, with
  a margin); each candidate is then checked on the full thumbnails.
- Leakage per pair of splits, class balance, image sizes and modes (folders: read from the file
  headers), and the files that could not be decoded.

Why not a perceptual hash (imagehash's pHash): `python -m benchmarks.data.duplicate_signatures`, on
3,000 distinct MNIST test digits decoded at 64x64: the 64-bit pHash puts 40 pairs of different
digits at distance 0, closer than any copy; the 256-bit pHash has different digits from 22 bits
and JPEG copies up to 28, trimmed copies up to 144. The thumbnail cosine: different digits at most
0.9905; copies resized, re-encoded (JPEG quality 60 or 75) or trimmed by 1 pixel a side at least
0.9968; trimmed by 2 pixels a side (14% of a 28-px digit) as low as 0.987, below the threshold.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F

from .data import Dataset, Split
from .inference import pick_precision

THUMB = 32  # thumbnail side
NEAR_THRESHOLD = 0.995  # cosine similarity of thumbnails at or above which two images are near duplicates
CROP_SCALES = (0.98, 0.96, 0.94, 0.92, 0.90, 0.88, 0.86)  # centre crops compared with whole images (trimmed copies)
PCA_DIMS = 64
CANDIDATE_MARGIN = 0.03  # PCA similarities this far below the threshold are still checked in full
BLOCK = 4096  # rows per block of the all-pairs product: 4096 x N similarities at a time
SPLITS = ("train", "val", "test")


def split_images(ds: Dataset) -> list[tuple[str, Split]]:
    """[(name, split)] for the splits present (test only when it is a split of its own)."""
    out = []
    for name in SPLITS:
        split = getattr(ds, name)
        if split is not None and (name != "test" or ds.test_source == "test"):
            out.append((name, split))
    return out


def thumbnails(images: torch.Tensor, scale: float = 1.0, chunk: int = 8192) -> torch.Tensor:
    """(N, THUMB*THUMB) float32 unit vectors: grey, the centre `scale` of each side, resized
    bilinearly with antialiasing (area averaging upsamples small images blockily: 28-px digits
    and their 1-px-cropped copies then fell to 0.95 similarity)."""
    out = []
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].float().mean(1, keepdim=True)  # (B, 1, H, W) grey
        h, w = x.shape[2:]
        ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[:, :, top:top + ch, left:left + cw]
        x = F.interpolate(x, size=(THUMB, THUMB), mode="bilinear", antialias=True, align_corners=False).flatten(1)
        x = x - x.mean(1, keepdim=True)
        out.append(x / x.norm(dim=1, keepdim=True).clamp_min(1e-6))
    return torch.cat(out)


def exact_groups(images: torch.Tensor) -> list[list[int]]:
    """Groups (of 2+) of row indices with identical pixels."""
    seen: dict[bytes, list[int]] = {}
    flat = images.reshape(len(images), -1).numpy()
    for i, row in enumerate(flat):
        seen.setdefault(hashlib.blake2b(row.tobytes(), digest_size=16).digest(), []).append(i)
    return [g for g in seen.values() if len(g) > 1]


def near_pairs(images: torch.Tensor, threshold: float = NEAR_THRESHOLD) -> dict[tuple[int, int], float]:
    """{(i, j): similarity} for i < j whose thumbnails (or one's centre crop and the other's whole)
    have cosine similarity >= threshold."""
    base = thumbnails(images)  # (N, D)
    n = len(base)
    if n < 2:
        return {}
    # PCA basis from a sample: the candidates' similarities in PCA space are within a small error of
    # the full ones (the dropped components carry little of a thumbnail's energy), hence the margin.
    sample = base[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:20000]]
    dims = min(PCA_DIMS, base.shape[1], len(sample))
    _, _, v = torch.linalg.svd(sample - sample.mean(0), full_matrices=False)
    basis = v[:dims].T  # (D, dims)
    # bf16 for the all-pairs product where this machine runs bf16 faster (hardware.precision_choice):
    # 2-3x faster than fp32 with AVX512-BF16 (and GPUs), 4x slower where bf16 is emulated;
    # its error (~0.4% of a similarity) is inside the margin, and candidates are checked in fp32.
    lowp = torch.bfloat16 if pick_precision("auto", torch.device("cpu")) == "bf16" else torch.float32
    project = lambda t: F.normalize(t @ basis, dim=1).to(lowp)  # noqa: E731  cosine in PCA space: the dropped
    base_p = project(base)  # (N, dims)                              components would shrink every dot product
    found: dict[tuple[int, int], float] = {}
    # One similarity buffer and one mask buffer for every block: fresh 300 MB tensors per block cost
    # more in page faults than the product itself (measured: 51 s of system time on MNIST).
    sims_buf = torch.empty(min(BLOCK, n) * n, dtype=lowp)
    mask_buf = torch.empty(min(BLOCK, n) * n, dtype=torch.bool)
    for scale in (1.0, *CROP_SCALES):
        query = base if scale == 1.0 else thumbnails(images, scale)
        query_p = project(query)
        for start in range(0, n, BLOCK):
            # whole images against each other: the product is symmetric, so only columns after the block's rows
            first = start if scale == 1.0 else 0
            block = query_p[start:start + BLOCK]
            shape = (len(block), n - first)
            sims = sims_buf[:shape[0] * shape[1]].view(shape)
            torch.matmul(block, base_p[first:].T, out=sims)  # (B, N - first)
            mask = mask_buf[:shape[0] * shape[1]].view(shape)
            torch.ge(sims, threshold - CANDIDATE_MARGIN, out=mask)
            rows, cols = torch.nonzero(mask, as_tuple=True)
            rows, cols = rows + start, cols + first
            keep = rows != cols
            rows, cols = rows[keep], cols[keep]
            if len(rows) == 0:
                continue
            exact = (query[rows] * base[cols]).sum(1)  # the full similarity of each candidate
            for i, j, s in zip(rows.tolist(), cols.tolist(), exact.tolist()):
                if s >= threshold:
                    key = (min(i, j), max(i, j))
                    found[key] = max(found.get(key, 0.0), s)
    return found


def image_facts(paths: list[str]) -> dict:
    """Sizes and modes of the original files (headers only: nothing is decoded)."""
    from PIL import Image
    sizes, modes, formats = Counter(), Counter(), Counter()
    for p in paths:
        try:
            with Image.open(p) as img:
                sizes[f"{img.width}x{img.height}"] += 1
                modes[img.mode] += 1
                formats[img.format or "?"] += 1
        except Exception:
            pass
    return {"sizes": dict(sizes.most_common(20)), "distinct_sizes": len(sizes), "modes": dict(modes),
            "formats": dict(formats)}


def audit(ds: Dataset, threshold: float = NEAR_THRESHOLD) -> dict:
    """Everything `cnnkit audit` reports, as plain data; `pairs` lists every duplicate pair."""
    parts = split_images(ds)
    images = torch.cat([s.images[:] for _, s in parts])  # (N, C, H, W) uint8, all splits
    where = [(name, i) for name, s in parts for i in range(len(s))]
    paths = [p for _, s in parts for p in (s.paths or [""] * len(s))]
    all_labels = torch.cat([s.labels for _, s in parts])
    if all_labels.ndim == 2:  # multi-label: a row's label is its label set, "cat;outdoor"
        labels = [";".join(ds.class_names[k] for k in torch.nonzero(row).flatten().tolist()) for row in all_labels]
    else:
        labels = [ds.class_names[c] for c in all_labels.tolist()]
    pairs: dict[tuple[int, int], tuple[str, float]] = {}
    for group in exact_groups(images):
        for i, j in combinations(group, 2):
            pairs[(i, j)] = ("exact", 1.0)
    for (i, j), sim in near_pairs(images, threshold).items():
        pairs.setdefault((i, j), ("near", sim))
    rows = []
    for (i, j), (kind, sim) in sorted(pairs.items()):
        (sa, ia), (sb, ib) = where[i], where[j]
        rows.append({"kind": kind, "similarity": round(sim, 5), "split_a": sa, "index_a": ia, "path_a": paths[i],
                     "label_a": labels[i], "split_b": sb, "index_b": ib, "path_b": paths[j],
                     "label_b": labels[j], "row_a": i, "row_b": j})
    sizes = {name: len(s) for name, s in parts}
    leakage = {}
    for a, b in combinations([name for name, _ in parts], 2):
        # images of the later split (val, test) with a copy in the earlier one: what inflates its accuracy
        hit = {r["index_b"] if r["split_b"] == b else r["index_a"] for r in rows
               if {r["split_a"], r["split_b"]} == {a, b}}
        leakage[f"{b} in {a}"] = {"images": len(hit), "share": len(hit) / max(sizes[b], 1)}
    within = {name: sum(1 for r in rows if r["split_a"] == r["split_b"] == name) for name, _ in parts}
    def counts(labels: torch.Tensor) -> np.ndarray:  # images per class (multi-label: having each label)
        return labels.sum(0).numpy() if labels.ndim == 2 else np.bincount(labels.numpy(), minlength=ds.num_classes)
    balance = {name: {c: int(v) for c, v in zip(ds.class_names, counts(s.labels))} for name, s in parts}
    result = {"data": ds.name, "source": ds.source, "images": len(where), "splits": sizes,
              "decoded_shape": list(ds.input_shape), "class_balance": balance,
              "imbalance_ratio": {name: (max(v.values()) / max(min(v.values()), 1)) for name, v in balance.items()},
              "exact_pairs": sum(r["kind"] == "exact" for r in rows),
              "near_pairs": sum(r["kind"] == "near" for r in rows),
              "pairs_within_split": within, "leakage": leakage,
              "label_conflicts": sum(r["label_a"] != r["label_b"] for r in rows),
              "unreadable": [{"path": p, "reason": r} for p, r in ds.skipped],
              "method": {"exact": "identical decoded pixels (BLAKE2b of the bytes)",
                         "near": f"cosine similarity of {THUMB}x{THUMB} grey thumbnails >= {threshold}, also between "
                                 f"centre crops at {list(CROP_SCALES)} and whole images"},
              "pairs": rows}
    if any(paths):
        result["file_facts"] = image_facts([p for p in paths if p])
    return result
