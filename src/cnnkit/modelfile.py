"""The model file: one safetensors file holding the weights, with cnnkit's JSON metadata in the
safetensors header (`__metadata__["cnnkit"]`). Loading parses JSON and raw tensors only: nothing in
the file can execute code. Writes go to a temporary name and are renamed.

Metadata keys: format, format_version, cnnkit_version, architecture (rebuild record), class_names,
input {channels, height, width}, preprocessing {resize, mean, std}, training (config), metrics.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from .errors import CnnkitError
from .utils import atomic_path
from .version import __version__

if TYPE_CHECKING:  # torch is imported when weights are read or written, not for the metadata alone:
    import torch  # `cnnkit predict` on an ONNX runtime never loads PyTorch
    import torch.nn as nn

FORMAT = "cnnkit-model"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"  # its name inside a run folder
REQUIRED = ("architecture", "class_names", "input", "preprocessing")


def save_model(path: str | Path, model: nn.Module, meta: dict) -> Path:
    """Write weights + metadata atomically. `meta` needs the REQUIRED keys."""
    from safetensors.torch import save_file

    from .models.base import unwrap

    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"model metadata lacks {missing}")
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "cnnkit_version": __version__, **meta}
    # unwrap: a compiled or data-parallel model's keys would carry `_orig_mod.` / `module.` prefixes
    tensors = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"cnnkit": json.dumps(header)})
    return path


def resolve_model_path(path: str | Path) -> Path:
    """A model file, or a run folder holding model.safetensors."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise CnnkitError(f"no model file at {path} (expected a .safetensors model file or a run folder holding {MODEL_FILE})")
    return p


def read_metadata(path: str | Path) -> dict:
    p = resolve_model_path(path)
    try:
        with safe_open(p, framework="numpy") as f:
            raw = (f.metadata() or {}).get("cnnkit")
    except (SafetensorError, OSError, ValueError, UnicodeError) as e:
        raise CnnkitError(f"{p} is not a cnnkit model file (not a valid safetensors file: {str(e).splitlines()[0]}); "
                          "it may be a pickle or another format, which cnnkit never loads") from None
    if raw is None:
        raise CnnkitError(f"{p} is a safetensors file without cnnkit metadata; train a model with `cnnkit train`")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CnnkitError(f"{p} has broken metadata (invalid JSON: {e}); the file is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CnnkitError(f"{p} has metadata that is not a cnnkit model's (format={meta.get('format') if isinstance(meta, dict) else '?'})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CnnkitError(f"{p} was written by a newer cnnkit ({meta.get('cnnkit_version')}); upgrade cnnkit")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise CnnkitError(f"{p} has broken metadata: missing {', '.join(missing)}")
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, metadata) from a model file or run folder."""
    from .models.registry import build_from_record

    p = resolve_model_path(path)
    meta = read_metadata(p)
    try:
        model = build_from_record(meta["architecture"])
    except (KeyError, TypeError, ValueError) as e:
        raise CnnkitError(f"{p} has broken metadata: cannot rebuild the architecture ({e})") from None
    with safe_open(p, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CnnkitError(f"{p}: weights do not match the architecture ({str(e).splitlines()[0]}...)") from None
    return model.to(device).eval(), meta
