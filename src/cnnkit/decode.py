"""Decoding image files to uint8 arrays, the one way training, predict and serving all use, and the
one process pool that decodes many files (a folder dataset's cache, predict).

This module imports no torch (numpy and Pillow only), so `cnnkit predict` with an ONNX runtime and
the decoding workers of every process pool start without loading PyTorch.
"""
from __future__ import annotations

import ctypes
import os
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
from PIL import Image, ImageOps

RESIZE_METHOD = "shorter-side-center-crop"  # recorded in model files: predict must do the same
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
CHUNK_FILES = 256  # files per decoding task: large enough that a task's overhead (pickling ~3 MB back) is small
# decoded_chunks decodes in a process pool from this many files on, in the calling process below it.
# One value for every caller (a folder's cache, predict), as the trade is the same for both: the
# pool's start-up (forking workers, pickling each chunk's arrays back) against decoding on every
# core. 512 files are two chunks, one for each of two workers, and ~40 ms of decoding at 80 µs a
# CIFAR-size JPEG (benchmarks/NOTES.md, v0.3.0): about what the start-up costs, by estimate, not
# measurement. Larger images decode slower, so for them the pool pays off sooner. (The folder
# cache used 2,000 and predict 512; neither was measured; predict's came with its speed work.)
PARALLEL_FROM_FILES = 512


class ImageTooLarge(ValueError):
    """The image's header claims more pixels than allowed: refused before any pixel is decoded."""


def decode_image(path, size: int, channels: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode one file (a path or a binary file object) to a uint8 array (channels, size, size).
    Raises on anything undecodable, and ImageTooLarge past max_pixels (a decompression bomb: a
    small file whose header claims 30000x30000 would need gigabytes once decoded)."""
    with Image.open(path) as img:
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ImageTooLarge(f"{img.width}x{img.height} pixels is more than the {max_pixels:,} allowed")
        if img.format == "JPEG":  # let libjpeg decode at 1/2, 1/4 or 1/8 scale: much faster for big photos
            img.draft("RGB" if channels == 3 else "L", (size, size))
        img.load()  # decode now: a truncated file fails here, inside the caller's try
        # EXIF-rotated photos arrive upright; in place: no copy of the (usual) unrotated image
        img = ImageOps.exif_transpose(img, in_place=True) or img
        img = to_8bit(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))  # transparent areas become white, not black
        img = img.convert("RGB" if channels == 3 else "L")
        if img.size != (size, size):  # already the model's size (CIFAR at 32, MNIST at 28): nothing to resample
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


def decode_files(args: tuple[list[str], int, int], check_file: bool = True) -> list[tuple[np.ndarray | None, str]]:
    """(array or None, error) per path: a bad file is its own row's error, never the batch's.
    check_file: a path that is not a file is 'FileNotFoundError: no such file' without opening it;
    False where the caller listed the files itself (a folder dataset), whose reasons come from
    the decoder alone."""
    paths, size, channels = args
    out = []
    for path in paths:
        try:
            if check_file and not os.path.isfile(path):
                raise FileNotFoundError("no such file")
            out.append((decode_image(path, size, channels), ""))
        except Exception as e:  # any decode failure is this file's error, not the batch's
            out.append((None, f"{type(e).__name__}: {e}".splitlines()[0][:200]))
    return out


def decoded_chunks(files: list[str], size: int, channels: int, workers: int, *, start_method: str | None = "fork",
                  check_file: bool = True):
    """Yield (paths, [(array or None, error)]) per chunk of CHUNK_FILES files, in order. From
    PARALLEL_FROM_FILES files on, with more than one worker, a process pool decodes ahead, at most 2
    chunks per worker in flight, so memory stays bounded for any number of files.

    start_method: the pool's ("fork": workers start in milliseconds and need nothing the parent has
    not imported; None: the platform's default). check_file: as for decode_files."""
    chunks = [files[i:i + CHUNK_FILES] for i in range(0, len(files), CHUNK_FILES)]
    if workers <= 1 or len(files) < PARALLEL_FROM_FILES:
        for chunk in chunks:
            yield chunk, decode_files((chunk, size, channels), check_file)
        return
    context = get_context(start_method) if start_method else None
    with ProcessPoolExecutor(workers, mp_context=context, initializer=die_with_parent) as pool:
        pending: deque = deque()
        todo = iter(chunks)
        try:
            for chunk in todo:
                pending.append((chunk, pool.submit(decode_files, (chunk, size, channels), check_file)))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                chunk, future = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(decode_files, (nxt, size, channels), check_file)))
                yield chunk, future.result()
        finally:  # a caller that stops early (an error, a closed generator) leaves no decoding behind
            for _, future in pending:
                future.cancel()


def expand_paths(paths: list[str]) -> list[str]:
    """Files as given; folders searched recursively for files (hidden ones skipped), sorted."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                out += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
        else:
            out.append(p)
    return out


def die_with_parent() -> None:
    """A decoding worker ends when its parent does, even if the parent is killed (SIGKILL) and
    cannot shut the pool down: otherwise it would wait forever for work (Linux: PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a killed build leaves idle workers until they are killed
        pass
