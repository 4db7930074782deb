"""Folders of images: DIR/<class>/* or DIR/{train,val,test}/<class>/*.

Every file is decoded once with Pillow (EXIF orientation applied, alpha composited on white,
16-bit scaled to 8-bit, converted to 1 or 3 channels, shorter side resized and centre-cropped to a
square), then kept as uint8 tensors. The decoded rows are cached on disk in one raw uint8 file with
a JSON sidecar, keyed by the file list, sizes, mtimes and the decode settings, so a second run skips
decoding; the build uses every core, writes as it goes and resumes after an interruption. A cache
larger than the in-memory limit (a quarter of the RAM, or $CNNKIT_MAX_IN_MEMORY_MB) is not loaded:
its images are read from the file batch by batch (DiskImages). Files that cannot be decoded are
skipped and reported with their reason; they never stop a run.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from ..decode import decoded_chunks
from ..errors import CnnkitError
from ..utils import progress, write_text_atomic
from .core import Dataset, DiskImages, Split, carve, unreadable
from .labelfile import SET_SEP
from .download import cache_dir

SPLIT_NAMES = ("train", "val", "test")
CACHE_VERSION = 2  # bump when decoding or the cache layout changes, so old caches are not reused


def list_files(root: Path) -> tuple[dict[str, list[tuple[str, str]]], list[str], list[tuple[str, str]], list[str]]:
    """{split: [(path, class_name)]}, the sorted class names, the files that cannot be read
    [(path, reason)], and the class folders holding no image. Hidden files are ignored."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    has_splits = any(p.name in SPLIT_NAMES for p in subdirs)
    split_roots = {p.name: p for p in subdirs if p.name in SPLIT_NAMES} if has_splits else {"all": root}
    if has_splits and "train" not in split_roots:
        raise CnnkitError(f"{root} has {', '.join(split_roots)} folders but no train/ folder")
    files: dict[str, list[tuple[str, str]]] = {}
    bad: list[tuple[str, str]] = []
    empty: list[str] = []
    for split, sroot in split_roots.items():
        entries = []
        for cdir in sorted(p for p in sroot.iterdir() if p.is_dir() and not p.name.startswith(".")):
            before = len(entries)
            for dirpath, dirnames, filenames in os.walk(cdir):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(filenames):
                    path = os.path.join(dirpath, f)
                    if f.startswith("."):
                        continue
                    if (why := unreadable(path)) is not None:
                        bad.append((path, why))
                    else:
                        entries.append((path, cdir.name))
            if len(entries) == before:
                empty.append(str(cdir))
        files[split] = entries
    train_key = "train" if has_splits else "all"
    class_names = sorted({c for _, c in files[train_key]})
    if not files[train_key]:
        raise CnnkitError(f"{root} holds no images: expected DIR/<class>/<image> or DIR/train/<class>/<image>")
    for split, entries in files.items():
        unknown = sorted({c for _, c in entries} - set(class_names))
        if unknown:
            raise CnnkitError(f"{root}/{split} has classes {unknown} that train/ lacks")
    return files, class_names, bad, empty


def cache_key(files: dict[str, list[tuple[str, str]]], size: int, channels: int) -> str:
    h = hashlib.sha256(json.dumps([CACHE_VERSION, size, channels]).encode())
    for split in sorted(files):
        for path, cls in files[split]:
            st = os.stat(path)
            h.update(f"{split}\0{path}\0{cls}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def in_memory_limit_bytes() -> int:
    """Decoded datasets up to this size are loaded into memory; larger ones are read from the disk
    cache batch by batch. $CNNKIT_MAX_IN_MEMORY_MB sets it; the default is a quarter of the RAM."""
    env = os.environ.get("CNNKIT_MAX_IN_MEMORY_MB")
    if env:
        try:
            return int(float(env) * 2**20)
        except ValueError:
            raise CnnkitError(f"CNNKIT_MAX_IN_MEMORY_MB must be a number of megabytes, not {env!r}") from None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def build_cache(entries: list[tuple[str, str, str]], raw: Path, size: int, channels: int, quiet: bool) -> dict:
    """Decode [(split, path, class)] in order into `raw` (uint8 rows of channels x size x size) and
    return its metadata. Decoding runs on all cores in chunks that are written as they arrive, so
    memory holds a few chunks, never the dataset. Progress is saved after each chunk beside the
    partial file: an interrupted build resumes where it stopped."""
    partial, progress_file = raw.with_suffix(".partial"), raw.with_suffix(".progress.json")
    row_bytes = channels * size * size
    done, rows, skipped = 0, 0, []
    if partial.is_file() and progress_file.is_file():
        try:
            state = json.loads(progress_file.read_text())
            done, rows, skipped = int(state["files_done"]), int(state["rows"]), list(state["skipped"])
        except (OSError, ValueError, KeyError, TypeError):
            done, rows, skipped = 0, 0, []
    if done and not quiet:
        print(f"resuming the decoding of {len(entries)} files at file {done + 1}", flush=True)
    bar = progress(len(entries), "decode images", unit="img", disable=quiet)
    bar.update(done)
    workers = min(os.cpu_count() or 1, 8)
    # check_file=False: the files were listed and stat'ed just now, so a file's reason for being skipped
    # is the decoder's. start_method=None: the platform's default, as this cache has always used (fork
    # on Linux; spawn on macOS, where forking a process that has loaded torch is not safe).
    chunks = decoded_chunks([p for _, p, _ in entries[done:]], size, channels, workers, start_method=None,
                            check_file=False)
    with open(partial, "r+b" if done else "wb") as out, closing(chunks):
        out.truncate(rows * row_bytes)
        out.seek(rows * row_bytes)
        for _, results in chunks:
            for (arr, err), path in zip(results, entries[done:done + len(results)]):
                if arr is None:
                    skipped.append([path[1], err])
                else:
                    out.write(np.ascontiguousarray(arr).tobytes())
                    rows += 1
            done += len(results)
            out.flush()
            os.fsync(out.fileno())  # the rows are on disk before the progress file says so
            write_text_atomic(progress_file, json.dumps({"files_done": done, "rows": rows, "skipped": skipped}))
            bar.update(len(results))
    bar.close()
    skipped_paths = {p for p, _ in skipped}
    kept = [(split, p, c) for split, p, c in entries if p not in skipped_paths]
    meta = {"version": CACHE_VERSION, "row_shape": [channels, size, size], "rows": rows,
            "entries": kept, "skipped": skipped}
    write_text_atomic(raw.with_suffix(".json"), json.dumps(meta))
    os.replace(partial, raw)
    progress_file.unlink(missing_ok=True)
    return meta


def read_cache_meta(raw: Path, size: int, channels: int) -> dict | None:
    """The metadata of a complete cache file, or None (missing, old, or damaged: rebuilt, never trusted)."""
    try:
        meta = json.loads(raw.with_suffix(".json").read_text())
        if meta.get("version") == CACHE_VERSION and raw.stat().st_size == meta["rows"] * size * size * channels:
            return meta
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return None


def load(root: Path, image_size: int, channels: int, test_split: float, seed: int, quiet: bool) -> Dataset:
    files, class_names, unreadable_files, empty = list_files(root)
    if empty and not quiet:  # a class folder without images is no class: say so rather than drop it silently
        print(f"note: {len(empty)} class folder(s) hold no images: {', '.join(empty[:5])}"
              f"{' ...' if len(empty) > 5 else ''} (a class is learned only from images in its folder)", flush=True)
    return load_listed(files, class_names, unreadable_files, root.name, str(root), image_size, channels, test_split,
                       seed, quiet)


def cached_rows(files: dict[str, list[tuple[str, str]]], image_size: int, channels: int,
                quiet: bool) -> tuple[Path, dict]:
    """(the raw cache file, its metadata) of a listing's decoded rows, decoding them if no complete cache exists."""
    key = cache_key(files, image_size, channels)
    raw = cache_dir() / "folders" / f"{key}.u8"
    raw.parent.mkdir(parents=True, exist_ok=True)
    meta = read_cache_meta(raw, image_size, channels)
    if meta is None:
        # One builder at a time (the processes of a torchrun job load the same folder): the others
        # wait for the lock, then find the cache complete.
        with open(raw.with_suffix(".lock"), "w") as lock:
            fcntl.lockf(lock, fcntl.LOCK_EX)  # a POSIX lock: the decoding pool's forked workers do not hold it
            meta = read_cache_meta(raw, image_size, channels)
            if meta is None:
                entries = [(split, p, c) for split, ents in files.items() for p, c in ents]
                meta = build_cache(entries, raw, image_size, channels, quiet)
    return raw, meta


def row_labels(classes: list[str], class_names: list[str], multi_label: bool) -> torch.Tensor:
    """(N,) int64 class indices; multi-label (each entry labels joined by SET_SEP): (N, K) 0/1 float32 rows."""
    index = {c: i for i, c in enumerate(class_names)}
    if not multi_label:
        return torch.tensor([index[c] for c in classes], dtype=torch.int64)
    labels = torch.zeros(len(classes), len(class_names))
    for row, c in enumerate(classes):
        labels[row, [index[n] for n in c.split(SET_SEP) if n]] = 1
    return labels


def load_listed(files: dict[str, list[tuple[str, str]]], class_names: list[str],
                unreadable_files: list[tuple[str, str]], name: str, source: str, image_size: int, channels: int,
                test_split: float, seed: int, quiet: bool, multi_label: bool = False) -> Dataset:
    """A dataset from a listing {split ('all': none given): [(path, class name)]}, a folder's
    (list_files) or a label file's (labelfile.read_label_file): decoded once into the disk cache.
    multi_label: each class name is a set of labels joined by labelfile.SET_SEP, and the labels are
    (N, K) 0/1 float32 rows instead of (N,) class indices."""
    raw, meta = cached_rows(files, image_size, channels, quiet)
    row_shape = (channels, image_size, image_size)
    rows = np.arange(meta["rows"])
    on_disk = meta["rows"] * channels * image_size ** 2 > in_memory_limit_bytes()
    if on_disk:
        everything = DiskImages(str(raw), row_shape, rows)
    else:
        everything = torch.from_numpy(np.fromfile(raw, dtype=np.uint8)).view(meta["rows"], *row_shape)
    split_of = np.array([SPLIT_NAMES.index(split) if split in SPLIT_NAMES else -1 for split, _, _ in meta["entries"]])
    labels = row_labels([c for _, _, c in meta["entries"]], class_names, multi_label)
    splits = {}
    for split in files:
        index = np.flatnonzero(split_of == (SPLIT_NAMES.index(split) if split in SPLIT_NAMES else -1))
        start, stop = (int(index[0]), int(index[-1]) + 1) if len(index) else (0, 0)  # each split's rows are contiguous
        images = everything.subset(np.arange(start, stop)) if on_disk else everything[start:stop]
        splits[split] = Split(images, labels[start:stop], [meta["entries"][i][1] for i in range(start, stop)])
    skipped = [(p, r) for p, r in meta["skipped"]] + unreadable_files
    train_key = "all" if "all" in splits else "train"
    if len(splits[train_key]) == 0:
        raise CnnkitError(f"{source}: none of the {len(files[train_key])} training files could be decoded "
                          f"(first error: {skipped[0][1] if skipped else '?'})")
    if "all" in splits:  # no split folders: seeded stratified test split, validation carved later
        train, test = carve(splits["all"], test_split or 0.2, seed)
        splits = {"train": train, "test": test}
    present = (sorted(set(splits["train"].labels.tolist())) if not multi_label
               else torch.nonzero(splits["train"].labels.sum(0)).flatten().tolist())
    if multi_label and len(present) < len(class_names):  # a label never seen in training cannot be learned
        missing = [class_names[k] for k in range(len(class_names)) if k not in present]
        raise CnnkitError(f"{source}: no training image has the label(s) {missing}: a label is learned from its "
                          "training images")
    if not multi_label and len(present) < 2:
        raise CnnkitError(f"{source} has images of only one class ({class_names[present[0]]}): "
                          "a classifier needs at least two")
    return Dataset(name, class_names, splits["train"], splits.get("val"), splits.get("test"),
                   test_source="test", skipped=skipped, source=source,
                   task="multi-label" if multi_label else "single-label")
