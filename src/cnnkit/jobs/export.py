"""`cnnkit export`: an ONNX or torch.export file (export.py), then its parity with PyTorch proved;
with --int8, the ONNX file quantized (quantize.py) and what that did to test accuracy measured."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CnnkitError


def export_with_proof(model_path: str | Path, fmt: str, out: str | Path | None = None,
                      image_paths: list[str] | None = None, int8: dict | None = None) -> dict:
    """`cnnkit export`: write the export, then run the same images through PyTorch and the export.
    The images: the files named, else up to PARITY_IMAGES of the model's own validation split.
    Returns {out, format, task, bytes, checked_on, n, agreement, agreement_on, max_abs_diff, passed,
    max_allowed_diff}; agreement is top-1, or a multi-label model's whole label set (export.parity).
    int8: {max_drop, calibration_images, keep_float} for an int8 ONNX file (see export_int8)."""
    from ..export import FORMATS, PARITY_MAX_DIFF, export, exportable, parity
    from ..modelfile import load_model, resolve_model_path

    src = resolve_model_path(model_path)
    model, info = load_model(src)
    exportable(info)  # a task the export writes, before any data is read
    if int8 is not None:
        if fmt != "onnx":
            raise CnnkitError("--int8 writes ONNX (ONNX Runtime's quantizer): use --format onnx")
        from ..quantize import export_int8

        out = Path(out) if out else src.with_suffix(".int8.onnx")
        return export_int8(model, info, out, *parity_images(info, image_paths), **int8)
    out = Path(out) if out else src.with_suffix(FORMATS.get(fmt, ""))
    images, source = parity_images(info, image_paths)
    export(model, info, fmt, out)
    check = parity(model, info, out, fmt, images)
    return {"out": str(out), "format": fmt, "task": info.task, "bytes": out.stat().st_size, "checked_on": source,
            **check, "max_allowed_diff": PARITY_MAX_DIFF}


def parity_images(info, image_paths: list[str] | None) -> tuple[torch.Tensor, str]:
    """uint8 (N, C, H, W) images to check parity on, and where they came from."""
    from ..decode import decode_files, expand_paths
    from ..evaluate import load_model_split
    from ..export import PARITY_IMAGES

    if image_paths:
        decoded = decode_files((expand_paths(image_paths), info.input.height, info.input.channels))
        arrays = [a for a, _ in decoded if a is not None][:PARITY_IMAGES]
        if not arrays:
            raise CnnkitError("none of the --images files could be decoded")
        return torch.from_numpy(np.stack(arrays)), f"{len(arrays)} of the files named"
    try:
        split, data = load_model_split(info, "val", "check the export")
    except CnnkitError as e:
        raise CnnkitError(f"{e}; give image files with --images") from None
    return split.images[:PARITY_IMAGES], f"{min(len(split), PARITY_IMAGES)} validation images of {data}"
