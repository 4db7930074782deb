"""The named datasets: MNIST and Fashion-MNIST (IDX gzip), CIFAR-10 (the official binary
version: raw records, no pickle) and scikit-learn's bundled 8x8 digits."""
from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import CnnkitError
from ..utils import atomic_path
from .core import Dataset, Split, carve
from .download import cache_dir, download, read_verified, search_dirs, verify


@dataclass(frozen=True)
class Remote:
    name: str  # file name on the server and on disk (.gz); the uncompressed file may stand in for it
    archive_md5: str | None  # md5 of the published .gz
    content_md5: str | None  # md5 of the decompressed file: survives re-compression and uncompressed copies

    def local_names(self) -> list[str]:
        """The names a local copy may have: the archive, the uncompressed file, and Kaggle's spelling
        of it (train-images.idx3-ubyte)."""
        plain = self.name[:-3] if self.name.endswith(".gz") else self.name
        return [self.name, plain, plain.replace("-idx", ".idx")]


MNIST_URLS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
MNIST_FILES = {
    "train_images": Remote("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                           "6bbc9ace898e44ae57da46a324031adb"),
    "train_labels": Remote("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432",
                           "a25bea736e30d166cdddb491f175f624"),
    "test_images": Remote("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3",
                          "2646ac647ad5339dbf082846283269ea"),
    "test_labels": Remote("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c",
                          "27ae3e4e09519cfbb04c329615203637"),
}
FASHION_URLS = ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]
# Archive md5s as Zalando publishes them (github.com/zalandoresearch/fashion-mnist); content md5s
# measured on a re-compressed copy whose pixel mean/std (0.2860/0.3530), class counts and first
# test labels match the published ones (issue 10).
FASHION_FILES = {
    "train_images": Remote("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                           "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train_labels": Remote("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe",
                           "9018921c3c673c538a1fc5bad174d6f9"),
    "test_images": Remote("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79",
                          "8181f5470baa50b63fa0f6fddb340f0a"),
    "test_labels": Remote("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310",
                          "15d484375f8d13e6eb1aabb0c3f46965"),
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_ARCHIVE = Remote("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", None)
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DECODED_CACHE_VERSION = 1  # bump when parsing changes, so old decoded caches are not reused
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


def locate(remote: Remote, subdirs: list[str], data_dir) -> tuple[Path | None, list[Path]]:
    """(the first local copy of `remote`, archive or uncompressed, or None; the folders looked in)."""
    looked = search_dirs(data_dir, subdirs)
    for d in looked:
        for name in remote.local_names():
            if (d / name).is_file():
                return d / name, looked
    return None, looked


def fetch(remote: Remote, urls: list[str], subdirs: list[str], looked: list[Path], allow_download: bool,
          quiet: bool) -> tuple[Path, bytes]:
    """Download `remote` into the cache: (its path, its verified content, kept from the download's
    check so the file is not read and decompressed again); or say where it was looked for."""
    if not allow_download:
        raise CnnkitError(
            f"{remote.name} not found in {', '.join(map(str, looked))}; put the file in one of these "
            "folders (or pass --data-dir), or allow downloading"
        )
    dest = cache_dir() / subdirs[0] / remote.name
    verified: dict[str, bytes] = {}

    def check(path: Path) -> None:
        verified["content"] = read_verified(path, remote.archive_md5, remote.content_md5)
    try:
        return download([u + remote.name if u.endswith("/") else u for u in urls], dest, check, quiet=quiet), \
            verified["content"]
    except CnnkitError as e:
        raise CnnkitError(
            f"{remote.name} not found in {', '.join(map(str, looked))} and {e}; "
            f"with no network, copy the official file into {dest.parent} or pass --data-dir"
        ) from None


def decoded_cache_path(name: str, paths: list[Path]) -> Path:
    """Where the decoded tensors of these exact files are kept: keyed by each file's resolved path,
    size and modification time, so a changed file is verified and decoded afresh (load times:
    `python -m benchmarks.training.run_overhead` prints them)."""
    h = hashlib.sha256(f"v{DECODED_CACHE_VERSION}\0{name}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"\0{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return cache_dir() / "decoded" / f"{name}-{h.hexdigest()[:24]}.safetensors"


def load_idx_pair(name: str, files: dict[str, Remote], urls: list[str], class_names: list[str],
                  data_dir, allow_download: bool, quiet: bool) -> Dataset:
    subdirs = [name, name.replace("-", "_"), ""]
    paths, contents = {}, {}  # contents: verified bytes of the files downloaded just now
    for key, remote in files.items():
        paths[key], looked = locate(remote, subdirs, data_dir)
        if paths[key] is None:
            paths[key], contents[key] = fetch(remote, urls, subdirs, looked, allow_download, quiet)
    cache = decoded_cache_path(name, list(paths.values()))
    tensors = None
    if cache.is_file() and not contents:
        try:
            # Copied out of the file's memory map: another process replacing or truncating the
            # cache file while this run trains must not crash it (SIGBUS on a vanished page).
            tensors = {k: v.clone() for k, v in load_file(cache).items()}
        except Exception:  # a damaged cache is rebuilt, never trusted
            tensors = None
    if tensors is None or set(tensors) != set(files):
        # Each file decompressed once, for checksum and parser alike.
        for key, r in files.items():
            if key not in contents:
                contents[key] = read_verified(paths[key], r.archive_md5, r.content_md5)
        tensors = {key: torch.from_numpy(parse_idx(contents[key], paths[key]).copy()) for key in files}
        try:
            with atomic_path(cache) as tmp:
                save_file(tensors, tmp)
        except OSError:  # a read-only or full cache folder only costs the next run its decoding
            pass
    splits = {}
    for split in ("train", "test"):
        images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise CnnkitError(f"{name} {split} images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                              "do not match")
        splits[split] = Split(images.unsqueeze(1), labels.to(torch.int64))  # (N, 1, 28, 28) uint8, (N,)
    return Dataset(name, class_names, splits["train"], None, splits["test"], source=str(paths["test_labels"].parent))


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
                download([CIFAR_URL], archive, lambda p: verify(p, CIFAR_ARCHIVE.archive_md5), quiet=quiet)
            except CnnkitError as e:
                raise CnnkitError(f"CIFAR-10 not found in {', '.join(map(str, looked))} and {e}; with no network, "
                                  f"put cifar-10-binary.tar.gz in {archive.parent} or pass --data-dir") from None
        verify(archive, CIFAR_ARCHIVE.archive_md5)
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
