"""Datasets as decoded uint8 tensors, split into train / val / test.

Everything downstream (training, evaluation) slices batches straight out of these tensors, so there
is no per-sample Python in the training loop. `load_dataset` is the one entry point:

    ds = load_dataset("mnist")            # by name: mnist, fashion-mnist, cifar10, digits
    ds = load_dataset("path/to/folder")   # DIR/<class>/* or DIR/{train,val,test}/<class>/*
    ds = load_dataset("labels.csv")       # a label file: image paths, classes, maybe splits (labelfile.py)
    ds.train.images  # (N, C, H, W) uint8      ds.train.labels  # (N,) int64
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import CnnkitError
from .core import (BUILTIN, FLIP_CHANGES_CLASS, Dataset, Split, carve, convert_images,  # noqa: F401
                   hflip_keeps_class, is_builtin, stratified_split, with_task)
from .labelfile import LABEL_FILE_SUFFIXES, Columns, is_label_file, read_label_file


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
    columns: Columns | None = None,
) -> Dataset:
    """Load a dataset by name or folder path into uint8 tensors with train/val/test splits.

    val_split: fraction of the training data held out for validation when the data has no val split.
    test_split: fraction held out for testing when the data has no split at all (digits, flat folders).
    image_size / channels: resize to image_size x image_size and convert to 1 or 3 channels
    (default: the dataset's own; folders and label files default to 64 px and 3 channels).
    columns: a label file's columns (None: found by name).
    """
    from . import builtin, folder

    if not 0 <= val_split < 1 or not 0 <= test_split < 1:
        raise CnnkitError("--val-split and --test-split must be fractions in [0, 1)")
    if channels not in (None, 1, 3):
        raise CnnkitError(f"channels must be 1 or 3, not {channels}")
    key = str(name_or_path)
    if is_builtin(key):
        ds = builtin.load(key.lower(), data_dir=data_dir, download=download, quiet=quiet,
                          test_split=test_split, seed=seed)
        ds.train.images = convert_images(ds.train.images, channels, image_size)
        ds.test.images = convert_images(ds.test.images, channels, image_size)
    elif Path(key).is_dir():
        ds = folder.load(Path(key), image_size=image_size or 64, channels=channels or 3,
                         test_split=test_split, seed=seed, quiet=quiet)
    elif Path(key).is_file() and is_label_file(key):
        listing = read_label_file(key, columns or Columns())
        ds = folder.load_listed(listing.files, listing.class_names, listing.unreadable, Path(key).stem, key,
                                image_size or 64, channels or 3, test_split, seed, quiet, listing.multi_label)
    else:
        raise CnnkitError(not_a_dataset(key))
    if ds.val is None:  # carve validation out of training, stratified and seeded
        if val_split == 0:
            raise CnnkitError(f"{ds.name} has no validation split: use --val-split > 0")
        ds.train, ds.val = carve(ds.train, val_split, seed)
    if ds.test is None:
        ds.test, ds.test_source = ds.val, "val"
    if ds.num_classes < 2:
        raise CnnkitError(f"{ds.name} has {ds.num_classes} class: a classifier needs at least two")
    return ds


def not_a_dataset(key: str) -> str:
    """Why --data KEY names no dataset, in one line."""
    if Path(key).exists():
        return (f"--data {key} is a file: give a folder of images (DIR/<class>/*), a label file "
                f"({', '.join(LABEL_FILE_SUFFIXES)}) or a dataset name")
    if os.path.islink(key):
        return f"--data {key} is a symbolic link to nothing ({os.readlink(key)}), or a loop of links: fix the link"
    if os.sep in key or key.startswith((".", "~")):  # meant as a path, not a name
        return f"no such folder: {key} (--data takes a folder of images or one of {', '.join(BUILTIN)})"
    return (f"unknown dataset '{key}': use one of {', '.join(BUILTIN)} or a folder of images "
            "(DIR/<class>/* or DIR/{train,val,test}/<class>/*)")
