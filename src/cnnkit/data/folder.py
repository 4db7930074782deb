"""Folders of images: DIR/<class>/* or DIR/{train,val,test}/<class>/*.

Every file is decoded once with Pillow (EXIF orientation applied, alpha composited on white,
16-bit scaled to 8-bit, converted to 1 or 3 channels, shorter side resized and centre-cropped to a
square), then kept as uint8 tensors. The decoded tensors are cached on disk in safetensors, keyed by
the file list, sizes, mtimes and the decode settings, so a second run skips decoding. Files that
cannot be decoded are skipped and reported with their reason; they never stop a run.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from ..errors import CnnkitError
from ..utils import atomic_path, progress
from .core import Dataset, Split, carve
from .download import cache_dir

SPLIT_NAMES = ("train", "val", "test")
RESIZE_METHOD = "shorter-side-center-crop"  # recorded in model files: predict must do the same
CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused
PARALLEL_FROM_FILES = 2000  # below this, a process pool costs more than it saves


def decode_image(path: str, size: int, channels: int) -> np.ndarray:
    """Decode one file to a uint8 array (channels, size, size). Raises on anything undecodable."""
    with Image.open(path) as img:
        if img.format == "JPEG":  # let libjpeg decode at 1/2, 1/4 or 1/8 scale: much faster for big photos
            img.draft("RGB" if channels == 3 else "L", (size, size))
        img.load()  # decode now: a truncated file fails here, inside the caller's try
        img = ImageOps.exif_transpose(img)  # EXIF-rotated photos arrive upright
        img = to_8bit(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))  # transparent areas become white, not black
        img = img.convert("RGB" if channels == 3 else "L")
        img = ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def to_8bit(img: Image.Image) -> Image.Image:
    """Pillow's convert() clips 16-bit and 32-bit grey to 0..255 (mostly white); rescale instead."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(arr / 257.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    return img


def decode_many(args: tuple[list[str], int, int]) -> list[tuple[np.ndarray | None, str]]:
    paths, size, channels = args
    out = []
    for p in paths:
        try:
            out.append((decode_image(p, size, channels), ""))
        except Exception as e:  # any decoder failure means "skip this file and say why"
            out.append((None, f"{type(e).__name__}: {e}".splitlines()[0][:200]))
    return out


def list_files(root: Path) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """{split: [(path, class_name)]} and the sorted class names. Hidden files are ignored."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    has_splits = any(p.name in SPLIT_NAMES for p in subdirs)
    split_roots = {p.name: p for p in subdirs if p.name in SPLIT_NAMES} if has_splits else {"all": root}
    if has_splits and "train" not in split_roots:
        raise CnnkitError(f"{root} has {', '.join(split_roots)} folders but no train/ folder")
    files: dict[str, list[tuple[str, str]]] = {}
    for split, sroot in split_roots.items():
        entries = []
        for cdir in sorted(p for p in sroot.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for dirpath, dirnames, filenames in os.walk(cdir):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                entries += [(os.path.join(dirpath, f), cdir.name) for f in sorted(filenames) if not f.startswith(".")]
        files[split] = entries
    train_key = "train" if has_splits else "all"
    class_names = sorted({c for _, c in files[train_key]})
    if not files[train_key]:
        raise CnnkitError(f"{root} holds no images: expected DIR/<class>/<image> or DIR/train/<class>/<image>")
    for split, entries in files.items():
        unknown = sorted({c for _, c in entries} - set(class_names))
        if unknown:
            raise CnnkitError(f"{root}/{split} has classes {unknown} that train/ lacks")
    return files, class_names


def cache_key(files: dict[str, list[tuple[str, str]]], size: int, channels: int) -> str:
    h = hashlib.sha256(json.dumps([CACHE_VERSION, size, channels]).encode())
    for split in sorted(files):
        for path, cls in files[split]:
            st = os.stat(path)
            h.update(f"{split}\0{path}\0{cls}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def decode_all(paths: list[str], size: int, channels: int, quiet: bool) -> list[tuple[np.ndarray | None, str]]:
    chunk = 256
    jobs = [(paths[i:i + chunk], size, channels) for i in range(0, len(paths), chunk)]
    results: list = []
    bar = progress(len(paths), "decode images", unit="img", disable=quiet)
    workers = min(os.cpu_count() or 1, 8)
    if len(paths) >= PARALLEL_FROM_FILES and workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for r in pool.map(decode_many, jobs):
                results += r
                bar.update(len(r))
    else:
        for job in jobs:
            r = decode_many(job)
            results += r
            bar.update(len(r))
    bar.close()
    return results


def load(root: Path, image_size: int, channels: int, test_split: float, seed: int, quiet: bool) -> Dataset:
    files, class_names = list_files(root)
    class_index = {c: i for i, c in enumerate(class_names)}
    key = cache_key(files, image_size, channels)
    cache = cache_dir() / "folders" / f"{key}.safetensors"
    tensors, meta = None, None
    if cache.is_file():
        try:
            tensors = load_file(cache)
            meta = json.loads((cache.with_suffix(".json")).read_text())
        except Exception:  # a damaged cache is rebuilt, never trusted
            tensors = None
    if tensors is None:
        tensors, meta = {}, {"paths": {}, "skipped": []}
        for split, entries in files.items():
            decoded = decode_all([p for p, _ in entries], image_size, channels, quiet)
            ok = [(arr, p, c) for (arr, _), (p, c) in zip(decoded, entries) if arr is not None]
            meta["skipped"] += [[p, err] for (arr, err), (p, _) in zip(decoded, entries) if arr is None]
            images = np.stack([a for a, _, _ in ok]) if ok else np.zeros((0, channels, image_size, image_size), np.uint8)
            tensors[f"{split}.images"] = torch.from_numpy(np.ascontiguousarray(images))
            tensors[f"{split}.labels"] = torch.tensor([class_index[c] for _, _, c in ok], dtype=torch.int64)
            meta["paths"][split] = [p for _, p, _ in ok]
        with atomic_path(cache.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(meta))
        with atomic_path(cache) as tmp:
            save_file(tensors, tmp)
    splits = {s: Split(tensors[f"{s}.images"], tensors[f"{s}.labels"], meta["paths"][s]) for s in files}
    skipped = [(p, r) for p, r in meta["skipped"]]
    train_key = "all" if "all" in splits else "train"
    if len(splits[train_key]) == 0:
        raise CnnkitError(f"{root}: none of the {len(files[train_key])} training files could be decoded "
                          f"(first error: {skipped[0][1] if skipped else '?'})")
    if "all" in splits:  # no split folders: seeded stratified test split, validation carved later
        train, test = carve(splits["all"], test_split or 0.2, seed)
        splits = {"train": train, "test": test}
    present = sorted(set(splits["train"].labels.tolist()))
    if len(present) < 2:
        raise CnnkitError(f"{root} has images of only one class ({class_names[present[0]]}): a classifier needs at least two")
    return Dataset(root.name, class_names, splits["train"], splits.get("val"), splits.get("test"),
                   test_source="test", skipped=skipped, source=str(root))
