"""The named datasets: MNIST and Fashion-MNIST (IDX gzip), CIFAR-10 (the official binary
version: raw records, no pickle) and scikit-learn's bundled 8x8 digits."""
from __future__ import annotations

import gzip
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CnnkitError
from . import Dataset, Split, carve
from .download import cache_dir, download, search_dirs, verify


@dataclass(frozen=True)
class Remote:
    name: str  # file name on the server and on disk
    md5: str  # published checksum
    decompressed: bool  # True: md5 is of the gunzipped content (survives re-compression)


MNIST_URLS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
# md5 of the decompressed IDX files, so a re-compressed copy of the same bytes is accepted.
MNIST_FILES = {
    "train_images": Remote("train-images-idx3-ubyte.gz", "6bbc9ace898e44ae57da46a324031adb", True),
    "train_labels": Remote("train-labels-idx1-ubyte.gz", "a25bea736e30d166cdddb491f175f624", True),
    "test_images": Remote("t10k-images-idx3-ubyte.gz", "2646ac647ad5339dbf082846283269ea", True),
    "test_labels": Remote("t10k-labels-idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637", True),
}
FASHION_URLS = ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]
# Zalando publishes md5s of the .gz files only (github.com/zalandoresearch/fashion-mnist).
FASHION_FILES = {
    "train_images": Remote("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", False),
    "train_labels": Remote("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", False),
    "test_images": Remote("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", False),
    "test_labels": Remote("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", False),
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_ARCHIVE = Remote("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", False)
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32  # label byte, then 1024 red, 1024 green, 1024 blue


def parse_idx(data: bytes, path: Path) -> np.ndarray:
    """Parse an IDX file (already decompressed): magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise CnnkitError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = 4 + 4 * ndim
    if len(data) - body != int(np.prod(dims)):
        raise CnnkitError(f"{path} is truncated: header says {dims}, file holds {len(data) - body} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=body).reshape(dims)


def find_or_fetch(remote: Remote, urls: list[str], subdirs: list[str], data_dir, allow_download: bool,
                  quiet: bool) -> Path:
    """Return a verified local copy of `remote`, downloading it into the cache if it is nowhere."""
    looked = search_dirs(data_dir, subdirs)
    for d in looked:
        p = d / remote.name
        if p.is_file():
            verify(p, remote.md5, remote.decompressed)
            return p
    if not allow_download:
        raise CnnkitError(
            f"{remote.name} not found in {', '.join(map(str, looked))}; put the file in one of these "
            "folders (or pass --data-dir), or allow downloading"
        )
    dest = cache_dir() / subdirs[0] / remote.name
    try:
        return download([u + remote.name if u.endswith("/") else u for u in urls], dest, remote.md5,
                        remote.decompressed, quiet=quiet)
    except CnnkitError as e:
        raise CnnkitError(
            f"{remote.name} not found in {', '.join(map(str, looked))} and {e}; "
            f"with no network, copy the official file into {dest.parent} or pass --data-dir"
        ) from None


def load_idx_pair(name: str, files: dict[str, Remote], urls: list[str], class_names: list[str],
                  data_dir, allow_download: bool, quiet: bool) -> Dataset:
    subdirs = [name, name.replace("-", "_"), ""]
    arrays = {}
    for key, remote in files.items():
        path = find_or_fetch(remote, urls, subdirs, data_dir, allow_download, quiet)
        with gzip.open(path, "rb") as f:
            arrays[key] = parse_idx(f.read(), path)
    splits = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise CnnkitError(f"{name} {split} images {images.shape} and labels {labels.shape} do not match")
        splits[split] = Split(torch.from_numpy(images.copy()).unsqueeze(1),  # (N, 1, 28, 28)
                              torch.from_numpy(labels.astype(np.int64)))
    return Dataset(name, class_names, splits["train"], None, splits["test"], source=str(path.parent))


def parse_cifar_bin(data: bytes, path: Path) -> Split:
    """Official CIFAR-10 binary records: any whole number of 3,073-byte records."""
    if len(data) == 0 or len(data) % CIFAR_RECORD_BYTES:
        raise CnnkitError(f"{path} is not CIFAR-10 binary data: {len(data)} bytes is not a whole number "
                          f"of {CIFAR_RECORD_BYTES}-byte records (truncated?)")
    rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR_RECORD_BYTES)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() >= 10:
        raise CnnkitError(f"{path} has label {labels.max()}: not CIFAR-10 binary data")
    images = rec[:, 1:].reshape(-1, 3, 32, 32)  # channel-major planes, rows row-major
    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels))


def load_cifar10(data_dir, allow_download: bool, quiet: bool) -> Dataset:
    subdirs = ["", "cifar10", "cifar-10-batches-bin", "cifar10/cifar-10-batches-bin"]
    looked = search_dirs(data_dir, subdirs)
    folder = next((d for d in looked if (d / "test_batch.bin").is_file()
                   and (d / "data_batch_1.bin").is_file()), None)
    if folder is None:
        if not allow_download:
            raise CnnkitError(f"CIFAR-10 binary files (data_batch_1.bin, test_batch.bin) not found in "
                              f"{', '.join(map(str, looked))}; pass --data-dir or allow downloading")
        archive = cache_dir() / "cifar10" / CIFAR_ARCHIVE.name
        if not archive.is_file():
            try:
                download([CIFAR_URL], archive, CIFAR_ARCHIVE.md5, False, quiet=quiet)
            except CnnkitError as e:
                raise CnnkitError(f"CIFAR-10 not found in {', '.join(map(str, looked))} and {e}; with no "
                                  f"network, put cifar-10-binary.tar.gz in {archive.parent} or pass --data-dir") from None
        verify(archive, CIFAR_ARCHIVE.md5, False)
        with tarfile.open(archive, "r:gz") as tar:  # plain byte files; the 'data' filter refuses links
            tar.extractall(archive.parent, filter="data")
        folder = archive.parent / "cifar-10-batches-bin"
    train = [parse_cifar_bin((folder / f"data_batch_{i}.bin").read_bytes(), folder / f"data_batch_{i}.bin")
             for i in range(1, 6) if (folder / f"data_batch_{i}.bin").is_file()]
    train_split = Split(torch.cat([s.images for s in train]), torch.cat([s.labels for s in train]))
    test = parse_cifar_bin((folder / "test_batch.bin").read_bytes(), folder / "test_batch.bin")
    meta = folder / "batches.meta.txt"
    names = [n.strip() for n in meta.read_text().splitlines() if n.strip()] if meta.is_file() else CIFAR_CLASSES
    return Dataset("cifar10", names[:10], train_split, None, test, source=str(folder))


def load_digits_dataset(test_split: float, seed: int) -> Dataset:
    from sklearn.datasets import load_digits
    d = load_digits()
    # Pixel values are 0..16; scale to 0..255 so every dataset is uint8 in the same range.
    images = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8)
    full = Split(images, torch.from_numpy(d.target.astype(np.int64)))
    train, test = carve(full, test_split or 0.2, seed)
    return Dataset("digits", [str(i) for i in range(10)], train, None, test, source="sklearn.datasets.load_digits")


def load(name: str, data_dir, download: bool, quiet: bool, test_split: float, seed: int) -> Dataset:
    if name == "mnist":
        return load_idx_pair("mnist", MNIST_FILES, MNIST_URLS, [str(i) for i in range(10)], data_dir, download, quiet)
    if name == "fashion-mnist":
        return load_idx_pair("fashion-mnist", FASHION_FILES, FASHION_URLS, FASHION_CLASSES, data_dir, download, quiet)
    if name == "cifar10":
        return load_cifar10(data_dir, download, quiet)
    if name == "digits":
        return load_digits_dataset(test_split, seed)
    raise AssertionError(name)
