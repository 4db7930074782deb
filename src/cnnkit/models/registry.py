"""The model registry: named specs shipped with cnnkit (the lecture notes' networks and the
baselines), and a user's own YAML file wherever a name is accepted.

An architecture is recorded in model files as plain JSON (`architecture_record`), from which
`build_from_record` rebuilds the module without executing anything from the file.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch.nn as nn

from ..errors import CnnkitError
from .base import unwrap
from .spec import SpecNet, read_spec
from .zoo import ARCHS, SMALL_INPUT_MAX_SIDE

SPEC_DIR = Path(__file__).parent / "specs"


def spec_names() -> list[str]:
    """Every registered name: the YAML specs shipped with cnnkit and the classic architectures."""
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml")) + list(ARCHS)


def list_models() -> list[dict]:
    """[{name, description, input, params, pretrained}] for every registered model. params is the
    PyTorch parameter count at the default input (ImageNet's 1000 classes for the classic nets, 10
    for the specs), counted on the meta device so no memory is allocated."""
    import torch

    from .pretrained import package_available

    out = []
    for name in spec_names():
        spec = get_spec(name)
        classes = 1000 if name in ARCHS and ARCHS[name].default_input[1] >= 224 else 10
        with torch.device("meta"):
            c, h, w = default_input(spec) or (1, 28, 28)
            model = build_model(spec, classes, in_channels=c, image_size=(h, w))
        out.append({"name": name, "description": spec.get("description", ""), "input": spec.get("input"),
                    "params": sum(p.numel() for p in model.parameters()), "num_classes": classes,
                    "pretrained": "installed" if package_available(name) else
                    ("from a state-dict file (--pretrained FILE)" if name in ARCHS and name != "lenet5" else "no")})
    return out


def get_spec(name_or_path: str | Path) -> dict:
    """The spec dict for a registered name or a YAML file path. A classic architecture's "spec" is
    {name, arch, input, description}: build_model builds it from Python code."""
    key = str(name_or_path)
    if key in ARCHS:
        a = ARCHS[key]
        return {"name": key, "arch": key, "input": list(a.default_input), "description": a.description}
    if key in spec_names():
        return read_spec(SPEC_DIR / f"{key}.yaml")
    p = Path(key)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise CnnkitError(f"model spec file {p} does not exist")
        return read_spec(p)
    raise CnnkitError(f"unknown model '{key}': use one of {', '.join(spec_names())} or a YAML spec file")


def default_input(spec: dict) -> tuple[int, int, int] | None:
    """The spec's declared (channels, height, width), if any."""
    shape = spec.get("input")
    if shape is None:
        return None
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise CnnkitError(f"model spec {spec.get('name')}: input must be [channels, height, width], not {shape!r}")
    return tuple(shape)


def build_model(model: str | Path | dict, num_classes: int, in_channels: int | None = None,
                image_size: int | tuple[int, int] | None = None, **args) -> nn.Module:
    """Build an nn.Module returning logits. Input defaults to the spec's declared input, else 1x28x28.
    args go to a classic architecture's constructor (e.g. aux_logits=True for googlenet)."""
    spec = model if isinstance(model, dict) else get_spec(model)
    c, h, w = default_input(spec) or (1, 28, 28)
    if in_channels is not None:
        c = in_channels
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if "arch" in spec:
        return build_arch(spec["arch"], num_classes, c, (h, w), args)
    return SpecNet(spec, c, (h, w), num_classes)


def build_arch(name: str, num_classes: int, in_channels: int, image_size: tuple[int, int], args: dict) -> nn.Module:
    arch = ARCHS[name]
    if min(image_size) < arch.min_size:
        raise CnnkitError(f"{name} needs inputs of at least {arch.min_size}x{arch.min_size} pixels, not "
                          f"{image_size[0]}x{image_size[1]}; use --image-size {arch.min_size} or more")
    args = dict(args)
    if arch.small_input and "small_input" not in args:
        args["small_input"] = max(image_size) <= SMALL_INPUT_MAX_SIDE
    record = {"kind": "registry", "name": name, "args": args, "in_channels": in_channels,
              "image_size": list(image_size), "num_classes": num_classes}
    return arch.build(num_classes=num_classes, in_channels=in_channels, image_size=tuple(image_size),
                      record=record, **args)


def architecture_record(model: nn.Module) -> dict:
    """The JSON-able record from which build_from_record rebuilds the same module (models/base.py)."""
    model = unwrap(model)
    record = getattr(model, "architecture", None)
    if not isinstance(record, dict):
        raise CnnkitError(f"cannot record the architecture of {type(model).__name__}: build it with "
                          "cnnkit.build_model so that a model file can rebuild it")
    return copy.deepcopy(record)  # a caller may annotate its copy (the SVM renames it) without touching the model


def build_from_record(record: dict) -> nn.Module:
    if record.get("kind") == "knn":  # a network's record inside, the vote's sizes beside it (models/knn.py)
        from .knn import build_knn
        return build_knn(record, build_from_record)
    if record.get("kind") == "registry":
        if record.get("name") not in ARCHS:
            raise CnnkitError(f"the model file's architecture {record.get('name')!r} is unknown to this cnnkit")
        return build_arch(record["name"], int(record["num_classes"]), int(record["in_channels"]),
                          tuple(record["image_size"]), dict(record.get("args") or {}))
    if record.get("kind") != "spec" or not isinstance(record.get("spec"), dict):
        raise CnnkitError(f"unknown architecture record kind {record.get('kind')!r}")
    return SpecNet(record["spec"], int(record["in_channels"]), tuple(record["image_size"]), int(record["num_classes"]))
