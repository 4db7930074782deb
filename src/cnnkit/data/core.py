"""The data types every loader fills and every consumer reads, and the facts about the built-in
datasets: uint8 image tensors with labels, split into train / val / test."""
from __future__ import annotations

import dataclasses
import errno
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CnnkitError

class DiskImages:
    """uint8 images (N, C, H, W) stored row after row in a raw file, read on demand by index.

    It answers what training, evaluation and preprocessing ask of an image tensor (len, shape,
    images[i], images[i:j], images[index_tensor] -> a uint8 tensor) while memory holds only the rows
    asked for: a dataset larger than memory trains in batches read from the file (os.pread, so no
    mapped pages accumulate in the process), and each data-parallel process reads only its shard."""

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, path: str, row_shape: tuple[int, int, int], rows: np.ndarray):
        self.path = str(path)
        self.row_shape = tuple(int(v) for v in row_shape)  # (C, H, W)
        self.rows = np.asarray(rows, dtype=np.int64)  # (N,) row numbers in the file
        self.row_bytes = int(np.prod(self.row_shape))
        self._fd, self._pid = None, None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.row_shape))

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, index) -> "DiskImages":
        """A view of some of the images; nothing is read."""
        return DiskImages(self.path, self.row_shape, self.rows[np.asarray(index, dtype=np.int64)])

    def to(self, device=None, *args, **kwargs) -> "DiskImages":
        return self  # stays on disk; training moves each batch to its device

    def fd(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked process opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, (int, np.integer)):
            return self[[int(key)]][0]
        if isinstance(key, slice):
            rows = self.rows[key]
        else:
            rows = self.rows[np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key, dtype=np.int64)]
        out = np.empty((len(rows), self.row_bytes), dtype=np.uint8)
        fd, i = self.fd(), 0
        while i < len(rows):  # one read per run of consecutive rows
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            view = memoryview(out[i:j]).cast("B")
            got = os.preadv(fd, [view], int(rows[i]) * self.row_bytes)
            if got != len(view):
                raise OSError(f"{self.path} is shorter than its {len(self)} images: rebuild the cache")
            i = j
        return torch.from_numpy(out).view(len(rows), *self.row_shape)


@dataclass
class Split:
    images: torch.Tensor | DiskImages  # (N, C, H, W) uint8, in memory or read from disk on demand
    labels: torch.Tensor  # (N,) int64, indices into Dataset.class_names; multi-label: (N, K) float32 0/1 rows
    paths: list[str] | None = None  # source file of each image (folder datasets only)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> "Split":
        idx = torch.as_tensor(index, dtype=torch.long)
        paths = [self.paths[i] for i in index] if self.paths is not None else None
        images = self.images.subset(index) if isinstance(self.images, DiskImages) else self.images[idx]
        return Split(images, self.labels[idx], paths)


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
    task: str = "single-label"  # or "multi-label": any number of the classes per image (labels (N, K)), or
                                # "binary": two classes, labels (N,) of 0/1, one logit (with_task)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # (C, H, W)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


BUILTIN = ("mnist", "fashion-mnist", "cifar10", "digits")  # loaded by name; anything else is a folder
# Datasets whose classes change under a horizontal flip (a mirrored 2, 3 or 7 is no digit), so
# neither augmentation nor test-time augmentation may mirror them. Every other dataset may be.
FLIP_CHANGES_CLASS = ("mnist", "digits")


def is_builtin(name: str) -> bool:
    return str(name).lower() in BUILTIN


def hflip_keeps_class(name: str) -> bool:
    """Whether mirroring an image of this dataset keeps its class."""
    return str(name).lower() not in FLIP_CHANGES_CLASS


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
    """(kept, held out): `fraction` of the split held out, stratified by class; multi-label images
    by their rarest label (none: a stratum of their own), so rare labels reach every split."""
    labels = split.labels.numpy()
    if labels.ndim == 2:
        frequency = labels.sum(0)  # (K,)
        rarest = np.where(labels > 0, frequency[None, :], np.inf).argmin(1)
        labels = np.where(labels.any(1), rarest, -1)
    keep, hold = stratified_split(labels, fraction, seed)
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


def unreadable(path: str) -> str | None:
    """Why a listed file cannot be read (a broken or looping symbolic link, no permission), or None."""
    try:
        os.stat(path)
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop (its links point at each other)"
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        return e.strerror or type(e).__name__


def with_task(ds: Dataset, task: str) -> Dataset:
    """The dataset as TrainConfig.task trains it: `auto` keeps what the data gives; binary needs two
    classes (labels stay 0/1 indices); multi-label from one class per image makes each label set
    that one class (one-hot rows (N, K)), over the same splits."""
    if task in ("auto", ds.task):
        return ds
    if ds.task == "multi-label":
        raise CnnkitError(f"{ds.name} gives several labels per image; --task {task} needs one class per image: "
                          "use --task multi-label (or leave --task out)")
    if task == "binary":
        if ds.num_classes != 2:
            raise CnnkitError(f"--task binary needs two classes; {ds.name} has {ds.num_classes} "
                              f"({', '.join(ds.class_names[:4])}{', ...' if ds.num_classes > 4 else ''})")
        return dataclasses.replace(ds, task="binary")
    if task == "multi-label":
        def one_hot(split: Split | None) -> Split | None:
            if split is None:
                return None
            return Split(split.images, F.one_hot(split.labels, ds.num_classes).float(), split.paths)
        return dataclasses.replace(ds, train=one_hot(ds.train), val=one_hot(ds.val), test=one_hot(ds.test),
                                   task="multi-label")
    return ds  # single-label data trained as single-label
