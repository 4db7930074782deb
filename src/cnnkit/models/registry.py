"""The model registry: named specs shipped with cnnkit (the lecture notes' networks and the
baselines), and a user's own YAML file wherever a name is accepted.

An architecture is recorded in model files as plain JSON (`architecture_record`), from which
`build_from_record` rebuilds the module without executing anything from the file.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn
import yaml

from ..errors import CnnkitError
from .spec import SpecNet, read_spec

SPEC_DIR = Path(__file__).parent / "specs"


def spec_names() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def list_models() -> list[dict]:
    """[{name, description, input}] for every registered model."""
    out = []
    for name in spec_names():
        spec = yaml.safe_load((SPEC_DIR / f"{name}.yaml").read_text())
        out.append({"name": name, "description": spec.get("description", ""), "input": spec.get("input")})
    return out


def get_spec(name_or_path: str | Path) -> dict:
    """The spec dict for a registered name or a YAML file path."""
    key = str(name_or_path)
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
                image_size: int | tuple[int, int] | None = None) -> nn.Module:
    """Build an nn.Module returning logits. Input defaults to the spec's declared input, else 1x28x28."""
    spec = model if isinstance(model, dict) else get_spec(model)
    c, h, w = default_input(spec) or (1, 28, 28)
    if in_channels is not None:
        c = in_channels
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return SpecNet(spec, c, (h, w), num_classes)


def architecture_record(model: nn.Module) -> dict:
    """JSON-able description from which build_from_record rebuilds the same module."""
    if isinstance(model, SpecNet):
        return {"kind": "spec", "name": model.spec.get("name"), "spec": model.spec,
                "in_channels": model.input_shape[0], "image_size": list(model.input_shape[1:]),
                "num_classes": model.num_classes}
    raise CnnkitError(f"cannot record architecture of {type(model).__name__}")


def build_from_record(record: dict) -> nn.Module:
    if record.get("kind") != "spec" or not isinstance(record.get("spec"), dict):
        raise CnnkitError(f"unknown architecture record kind {record.get('kind')!r}")
    return SpecNet(record["spec"], int(record["in_channels"]), tuple(record["image_size"]), int(record["num_classes"]))
