"""Decoding image files to uint8 arrays, the one way training, predict and serving all use.

This module imports no torch (numpy and Pillow only), so `cnnkit predict` with an ONNX runtime and
the decoding workers of every process pool start without loading PyTorch.
"""
from __future__ import annotations

import ctypes
import os
import signal

import numpy as np
from PIL import Image, ImageOps

RESIZE_METHOD = "shorter-side-center-crop"  # recorded in model files: predict must do the same
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


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


def decode_files(args: tuple[list[str], int, int]) -> list[tuple[np.ndarray | None, str]]:
    """(array or None, error) per path: a bad file is its own row's error, never the batch's."""
    paths, size, channels = args
    out = []
    for path in paths:
        try:
            if not os.path.isfile(path):
                raise FileNotFoundError("no such file")
            out.append((decode_image(path, size, channels), ""))
        except Exception as e:  # any decode failure is this file's error, not the batch's
            out.append((None, f"{type(e).__name__}: {e}".splitlines()[0][:200]))
    return out


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
