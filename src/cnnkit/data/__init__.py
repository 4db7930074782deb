"""Datasets as decoded uint8 tensors, split into train / val / test.

Everything downstream (training, evaluation) slices batches straight out of these tensors, so there
is no per-sample Python in the training loop. `load_dataset` is the one entry point:

    ds = load_dataset("mnist")            # by name: mnist, fashion-mnist, cifar10, digits
    ds = load_dataset("path/to/folder")   # DIR/<class>/* or DIR/{train,val,test}/<class>/*
    ds.train.images  # (N, C, H, W) uint8      ds.train.labels  # (N,) int64
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CnnkitError


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64, indices into Dataset.class_names
    paths: list[str] | None = None  # source file of each image (folder datasets only)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> "Split":
        idx = torch.as_tensor(index, dtype=torch.long)
        paths = [self.paths[i] for i in index] if self.paths is not None else None
        return Split(self.images[idx], self.labels[idx], paths)


@dataclass
class Dataset:
    name: str
    class_names: list[str]
    train: Split
    val: Split | None  # None until load_dataset carves it from train
    test: Split | None
    # Which split `test` really is: "test", or "val" when the data has no held-out test split
    # (then test metrics are measured on the validation split and say so).
    test_source: str = "test"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of undecodable files
    source: str = ""  # where the files were read from

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # (C, H, W)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


BUILTIN = ("mnist", "fashion-mnist", "cifar10", "digits")


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, holdout): `fraction` of every class held out, chosen by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    keep, hold = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_hold = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) > 1:
            n_hold = min(max(n_hold, 1), len(idx) - 1)  # every class keeps and holds out at least one
        hold.append(idx[:n_hold])
        keep.append(idx[n_hold:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(hold))


def carve(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    keep, hold = stratified_split(split.labels.numpy(), fraction, seed)
    return split.subset(keep), split.subset(hold)


def convert_images(images: torch.Tensor, channels: int | None, size: int | None) -> torch.Tensor:
    """Change channel count (1 <-> 3) and square size of a uint8 (N, C, H, W) tensor, in chunks."""
    n, c, h, w = images.shape
    if (channels is None or channels == c) and (size is None or (size == h and size == w)):
        return images
    out = []
    for start in range(0, n, 4096):
        x = images[start:start + 4096].float()
        if channels == 3 and c == 1:
            x = x.expand(-1, 3, -1, -1)
        elif channels == 1 and c == 3:  # ITU-R 601-2 luma, as Pillow's convert("L")
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if size is not None and (size != h or size != w):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def load_dataset(
    name_or_path: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    image_size: int | None = None,
    channels: int | None = None,
    val_split: float = 0.1,
    test_split: float = 0.2,
    seed: int = 0,
    quiet: bool = False,
) -> Dataset:
    """Load a dataset by name or folder path into uint8 tensors with train/val/test splits.

    val_split: fraction of the training data held out for validation when the data has no val split.
    test_split: fraction held out for testing when the data has no split at all (digits, flat folders).
    image_size / channels: resize to image_size x image_size and convert to 1 or 3 channels
    (default: the dataset's own; folders default to 64 px and 3 channels).
    """
    from . import builtin, folder

    if not 0 <= val_split < 1 or not 0 <= test_split < 1:
        raise CnnkitError("--val-split and --test-split must be fractions in [0, 1)")
    if channels not in (None, 1, 3):
        raise CnnkitError(f"channels must be 1 or 3, not {channels}")
    key = str(name_or_path)
    if key.lower() in BUILTIN:
        ds = builtin.load(key.lower(), data_dir=data_dir, download=download, quiet=quiet,
                          test_split=test_split, seed=seed)
        ds.train.images = convert_images(ds.train.images, channels, image_size)
        ds.test.images = convert_images(ds.test.images, channels, image_size)
    elif Path(key).is_dir():
        ds = folder.load(Path(key), image_size=image_size or 64, channels=channels or 3,
                         test_split=test_split, seed=seed, quiet=quiet)
    else:
        raise CnnkitError(
            f"unknown dataset '{key}': use one of {', '.join(BUILTIN)} or a folder of images "
            "(DIR/<class>/* or DIR/{train,val,test}/<class>/*)"
        )
    if ds.val is None:  # carve validation out of training, stratified and seeded
        if val_split == 0:
            raise CnnkitError(f"{ds.name} has no validation split: use --val-split > 0")
        ds.train, ds.val = carve(ds.train, val_split, seed)
    if ds.test is None:
        ds.test, ds.test_source = ds.val, "val"
    if ds.num_classes < 2:
        raise CnnkitError(f"{ds.name} has {ds.num_classes} class: a classifier needs at least two")
    return ds
