"""`cnnkit export`: an ONNX or torch.export file (export.py), then its parity with PyTorch proved."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CnnkitError


def export_with_proof(model_path: str | Path, fmt: str, out: str | Path | None = None,
                      image_paths: list[str] | None = None) -> dict:
    """`cnnkit export`: write the export, then run the same images through PyTorch and the export.
    The images: the files named, else up to PARITY_IMAGES of the model's own validation split.
    Returns {out, format, task, bytes, checked_on, n, agreement, agreement_on, max_abs_diff, passed,
    max_allowed_diff}; agreement is top-1, or a multi-label model's whole label set (export.parity)."""
    from ..decode import decode_files, expand_paths
    from ..evaluate import load_split_for
    from ..export import FORMATS, PARITY_IMAGES, PARITY_MAX_DIFF, export, exportable, parity
    from ..modelfile import load_model, resolve_model_path

    src = resolve_model_path(model_path)
    model, info = load_model(src)
    exportable(info)  # single-label or multi-label, before any data is read
    out = Path(out) if out else src.with_suffix(FORMATS.get(fmt, ""))
    if image_paths:
        decoded = decode_files((expand_paths(image_paths), info.input.height, info.input.channels))
        arrays = [a for a, _ in decoded if a is not None][:PARITY_IMAGES]
        if not arrays:
            raise CnnkitError("none of the --images files could be decoded")
        images, source = torch.from_numpy(np.stack(arrays)), f"{len(arrays)} of the files named"
    else:
        # the data as the run was given it (a label file's or folder's path), else its name (a built-in dataset's)
        data = info.training.get("data") or info.data_name
        if not data:
            raise CnnkitError("the model file does not name its dataset: "
                              "give image files with --images to check the export")
        try:
            split, _ = load_split_for(info, data, "val")
        except CnnkitError as e:
            raise CnnkitError(f"cannot load {data} to check the export ({e}); give image files with --images") from None
        images, source = split.images[:PARITY_IMAGES], f"{min(len(split), PARITY_IMAGES)} validation images of {data}"
    export(model, info, fmt, out)
    check = parity(model, info, out, fmt, images)
    return {"out": str(out), "format": fmt, "task": info.task, "bytes": out.stat().st_size, "checked_on": source,
            **check, "max_allowed_diff": PARITY_MAX_DIFF}
