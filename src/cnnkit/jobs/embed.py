"""`cnnkit embed`: the penultimate features of image files and folders, L2-normalised, as an .npy
file (N, D) float32, with the row order beside it in a JSON sidecar (FILE.json for FILE.npy).

Files are decoded as predict decodes them (decode.py: a process pool from 512 files on, bad files
reported and skipped), then preprocessed as the model was trained (its model file's mean and std,
or the pretrained weights'), and embedded by knn.embed_images: model.embed, the input to the
network's final classifier layer.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..decode import decoded_chunks, expand_paths
from ..errors import CnnkitError
from ..runtimes import cpu_count
from ..utils import atomic_path, write_text_atomic


def sidecar_path(out: Path) -> Path:
    """The JSON file of the row order beside an .npy file: emb.npy -> emb.json."""
    return out.with_suffix(".json")


def embed_files(model: str, paths: list[str], out: str | Path, workers: int | None = None, device: str = "auto",
                on_progress: Callable[[int], None] | None = None) -> dict:
    """Write the features of every readable file under `paths` to `out` (.npy, rows in the order of
    the sidecar's `paths`) and the sidecar; return {out, paths_file, model, files, embedded, errors,
    dim, seconds, skipped: [[path, reason]]}.

    model: a run folder, a model file (a kNN model's: its network's features) or a pretrained name
    (efficientnet_lite0: ImageNet features without training)."""
    import torch

    from ..inference import pick_device
    from ..knn import backbone_input, embed_images, load_backbone

    start, out = time.perf_counter(), Path(out)
    if out.suffix != ".npy":
        raise CnnkitError(f"--out {out}: give a .npy file (NumPy's format; the row order goes beside it, in "
                          f"{sidecar_path(out.with_suffix('.npy')).name})")
    c, h, w = backbone_input(model)  # from the metadata: the decoding pool forks before any weights load
    if h != w:
        raise CnnkitError(f"embed decodes images to a square input; {model} takes {c}x{h}x{w}")
    files = expand_paths(paths)
    if not files:
        raise CnnkitError(f"no files found in {' '.join(paths)}")
    device_ = pick_device(device)
    backbone, parts, rows, skipped = None, [], [], []
    for chunk, decoded in decoded_chunks(files, h, c, cpu_count() if workers is None else workers):
        if backbone is None:  # after the pool has forked: its workers carry no PyTorch threads
            backbone = load_backbone(model)
        good = [a for a, _ in decoded if a is not None]
        if good:
            parts.append(embed_images(backbone, torch.from_numpy(np.stack(good)), device_))  # (B, D)
        for path, (array, error) in zip(chunk, decoded):
            (rows.append(path) if array is not None else skipped.append([path, error]))
        if on_progress:
            on_progress(len(chunk))
    if not rows:
        raise CnnkitError(f"none of the {len(files)} file(s) could be read (first: {skipped[0][0]}: {skipped[0][1]})")
    features = torch.cat(parts).numpy().astype(np.float32)  # (N, D)
    with atomic_path(out) as tmp:
        np.save(tmp, features)
    record = {"format": "cnnkit-embeddings", "model": str(model), "network": backbone.name,
              "rows": len(rows), "dim": int(features.shape[1]), "normalized": "L2 (each row has unit length)",
              "features": "the input to the network's final classifier layer (model.embed)",
              "paths": rows, "skipped": skipped}
    write_text_atomic(sidecar_path(out), json.dumps(record, indent=1, ensure_ascii=False))
    return {"out": str(out), "paths_file": str(sidecar_path(out)), "model": str(model), "network": backbone.name,
            "files": len(files), "embedded": len(rows), "errors": len(skipped), "dim": int(features.shape[1]),
            "seconds": time.perf_counter() - start, "skipped": skipped}
