"""Models from a declarative YAML layer spec, in the lecture notes' vocabulary.

    name: seed-mnist-keras
    input: [1, 28, 28]            # default input (channels, height, width); the data may override it
    layers:
      - conv: {filters: 32, kernel: 3, activation: relu}   # stride 1, padding valid|same|full|<int>
      - maxpool: 2                                          # or {size: 2, stride: 1} (overlapping)
      - flatten
      - dense: {units: 64, activation: relu}
      - dense: {units: num_classes}                         # width from the dataset's class count

Layers: conv, maxpool, avgpool, l2pool, globalavgpool, globalmaxpool, batchnorm, dropout, flatten,
dense, activation. Activations: relu, sigmoid, tanh, softmax, none (conv and hidden dense default to
relu, the last dense to none); `activation: relu` is one on its own, e.g. after a pooling layer:
max pooling and ReLU commute, so `conv {activation: none}, maxpool, activation: relu` is the same
function as `conv, maxpool` with a quarter of the values to rectify. Shapes are propagated from the
input, so no width is ever typed by hand; a spec that does not fit its input is refused naming the
layer and the shape where it breaks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml

from ..errors import CnnkitError
from .base import Classifier
from .layers import ACTIVATIONS, Conv, Dense, GlobalPool, Pool, output_size, resolve_padding

LAYER_TYPES = ("conv", "maxpool", "avgpool", "l2pool", "globalavgpool", "globalmaxpool",
               "batchnorm", "dropout", "flatten", "dense", "activation")
SPATIAL = ("conv", "maxpool", "avgpool", "l2pool", "globalavgpool", "globalmaxpool")  # need a (C, H, W) input
# The parameter a bare value stands for: `maxpool: 2` means size 2, `dropout: 0.5` rate 0.5.
SHORTHAND = {"conv": "filters", "maxpool": "size", "avgpool": "size", "l2pool": "size",
             "dropout": "rate", "dense": "units", "activation": "function"}
ALLOWED = {
    "conv": {"filters", "kernel", "stride", "padding", "activation"},
    "maxpool": {"size", "stride", "padding"}, "avgpool": {"size", "stride", "padding"},
    "l2pool": {"size", "stride", "padding"},
    "dropout": {"rate"}, "dense": {"units", "activation"}, "activation": {"function"},
    "globalavgpool": set(), "globalmaxpool": set(), "batchnorm": set(), "flatten": set(),
}


def read_spec(path: str | Path) -> dict:
    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeError) as e:
        raise CnnkitError(f"cannot read model spec {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("layers"), list) or not spec["layers"]:
        raise CnnkitError(f"{path} is not a model spec: it needs a 'layers:' list "
                          "(see `cnnkit summary seed-mnist-keras`)")
    spec.setdefault("name", Path(path).stem)
    return spec


def normalize_layer(entry: Any, index: int) -> dict:
    """One spec entry -> {'type': ..., **params}. Accepts 'flatten', {conv: {...}}, {maxpool: 2},
    and {type: conv, filters: 32}."""
    if isinstance(entry, str):
        kind, params = entry, {}
    elif isinstance(entry, dict) and "type" in entry:
        kind, params = entry["type"], {k: v for k, v in entry.items() if k != "type"}
    elif isinstance(entry, dict) and len(entry) == 1:
        kind, params = next(iter(entry.items()))
        if str(kind).lower() not in LAYER_TYPES:
            raise CnnkitError(f"layer {index + 1}: unknown layer type '{kind}' (known: {', '.join(LAYER_TYPES)})")
        kind = str(kind).lower()
        if params is None:
            params = {}
        elif not isinstance(params, dict):
            if kind not in SHORTHAND:
                raise CnnkitError(f"layer {index + 1} ({kind}) takes no value")
            params = {SHORTHAND[kind]: params}
    else:
        raise CnnkitError(f"layer {index + 1}: cannot read {entry!r}; "
                          "write e.g. 'flatten' or {conv: {filters: 32}}")
    kind = str(kind).lower()
    if kind not in LAYER_TYPES:
        raise CnnkitError(f"layer {index + 1}: unknown layer type '{kind}' (known: {', '.join(LAYER_TYPES)})")
    extra = set(params) - ALLOWED[kind]
    if extra:
        raise CnnkitError(f"layer {index + 1} ({kind}): unknown parameter(s) {sorted(extra)}; "
                          f"allowed: {sorted(ALLOWED[kind]) or 'none'}")
    return {"type": kind, **params}


def _int(layer: dict, key: str, default: int | None, index: int) -> int:
    value = layer.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CnnkitError(f"layer {index + 1} ({layer['type']}): {key} must be a positive whole number, not {value!r}")
    return value


def _activation(name: str, where: str, known=tuple(ACTIVATIONS)) -> str:
    if name not in known:
        raise CnnkitError(f"{where}: unknown activation '{name}' (known: {', '.join(known)})")
    return name


def fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


class SpecNet(Classifier):
    """A network built from a layer spec: a plain nn.Sequential of layers, returning logits. Its
    architecture record holds the whole spec, so a model file never needs the YAML file again."""

    def __init__(self, spec: dict, in_channels: int, image_size: tuple[int, int], num_classes: int):
        super().__init__(num_classes, (in_channels, *image_size),
                         {"kind": "spec", "name": spec.get("name"), "spec": spec, "in_channels": in_channels,
                          "image_size": list(image_size), "num_classes": num_classes})
        self.spec = spec
        layers, self.descriptions, self.shapes = build_layers(spec, self.input_shape, num_classes)
        self.layers = nn.Sequential(*layers)

    @property
    def head(self) -> nn.Linear:
        """The last dense layer: the classifier that transfer learning replaces and trains alone."""
        return self.layers[self.head_index].linear

    @property
    def head_index(self) -> int:
        """The position of the last dense layer in `layers`."""
        index = max((i for i, m in enumerate(self.layers) if isinstance(m, Dense)), default=None)
        if index is None:
            raise CnnkitError(f"model spec {self.spec.get('name')} has no dense layer, so no classifier head to "
                              "replace or features before it: end it with `dense: {units: num_classes}`")
        return index

    def embed(self, x):  # (N, C, H, W) -> (N, D): what the last dense layer takes
        return self.layers[:self.head_index](x)

    def classify(self, features):  # (N, D) -> logits: the last dense layer and any layers after it
        return self.layers[self.head_index:](features)

    def forward(self, x):  # (N, C, H, W) -> (N, num_classes) logits: embed then classify, in one pass
        return self.layers(x)


def build_layers(spec: dict, input_shape: tuple[int, int, int], num_classes: int):
    """Propagate shapes through the spec; return (modules, descriptions, output shapes)."""
    entries = [normalize_layer(e, i) for i, e in enumerate(spec["layers"])]
    shape: tuple[int, ...] = tuple(input_shape)
    modules, descriptions, shapes = [], [], []
    last_dense = max((i for i, e in enumerate(entries) if e["type"] == "dense"), default=-1)
    for i, layer in enumerate(entries):
        kind = layer["type"]
        where = f"layer {i + 1} ({kind}) on input {fmt_shape(shape)}"
        if kind in SPATIAL and len(shape) != 3:
            raise CnnkitError(f"{where}: needs a (channels, height, width) input, but the data is already flat")
        if kind == "dense":
            module, description, shape = _dense(layer, i, shape, where, num_classes,
                                                last_dense=i == last_dense, last=i == len(entries) - 1)
        else:
            module, description, shape = LAYER_BUILDERS[kind](layer, i, shape, where)
        modules.append(module)
        descriptions.append(description)
        shapes.append(shape)
    if shape != (num_classes,):
        raise CnnkitError(f"the last layer gives {fmt_shape(shape)} outputs but the data has {num_classes} "
                          "classes: end the spec with `dense: {units: num_classes}`")
    return modules, descriptions, shapes


# One builder per layer type: (layer, index, input shape, where) -> (module, description, output shape).
# `where` names the layer and its input shape for error messages.


def _conv(layer: dict, i: int, shape: tuple[int, ...], where: str):
    filters, k = _int(layer, "filters", None, i), _int(layer, "kernel", 3, i)
    s, pad = _int(layer, "stride", 1, i), layer.get("padding", "valid")
    act = _activation(layer.get("activation", "relu"), where)
    if not (pad in ("valid", "same", "full") or (isinstance(pad, int) and pad >= 0)):
        raise CnnkitError(f"{where}: padding must be valid, same, full or a number, not {pad!r}")
    ph, pw = resolve_padding(pad, k, s, shape[1]), resolve_padding(pad, k, s, shape[2])
    h, w = output_size(shape[1], k, *ph, s), output_size(shape[2], k, *pw, s)
    if h < 1 or w < 1:
        raise CnnkitError(f"{where}: a {k}x{k} kernel with padding {pad} does not fit; "
                          "use a larger --image-size or padding same")
    description = f"conv {filters} {k}x{k} stride {s} pad {pad} {act}"
    return Conv(shape[0], filters, k, s, ph, pw, act), description, (filters, h, w)


def _pool(layer: dict, i: int, shape: tuple[int, ...], where: str):
    kind = layer["type"]
    size = _int(layer, "size", 2, i)
    s, pad = _int(layer, "stride", size, i), layer.get("padding", "valid")
    if pad not in ("valid", "same"):
        raise CnnkitError(f"{where}: pooling padding must be valid or same, not {pad!r}")
    ph, pw = resolve_padding(pad, size, s, shape[1]), resolve_padding(pad, size, s, shape[2])
    h, w = output_size(shape[1], size, *ph, s), output_size(shape[2], size, *pw, s)
    if h < 1 or w < 1:
        raise CnnkitError(f"{where}: a {size}x{size} window does not fit; use a larger --image-size")
    description = f"{kind} {size}x{size} stride {s}" + (" same" if pad == "same" else "")
    return Pool(kind[:-4], size, s, ph, pw), description, (shape[0], h, w)


def _global_pool(layer: dict, i: int, shape: tuple[int, ...], where: str):
    return GlobalPool(layer["type"][6:9]), layer["type"], (shape[0],)


def _batchnorm(layer: dict, i: int, shape: tuple[int, ...], where: str):
    return (nn.BatchNorm2d(shape[0]) if len(shape) == 3 else nn.BatchNorm1d(shape[0])), "batchnorm", shape


def _dropout(layer: dict, i: int, shape: tuple[int, ...], where: str):
    rate = layer.get("rate", 0.5)
    if not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise CnnkitError(f"{where}: dropout rate must be in [0, 1), not {rate!r}")
    return nn.Dropout(rate), f"dropout {rate}", shape


def _activation_layer(layer: dict, i: int, shape: tuple[int, ...], where: str):
    # softmax belongs at the edges (the loss, predict), not between layers
    act = _activation(layer.get("function", "relu"), where, known=("relu", "sigmoid", "tanh", "none"))
    return ACTIVATIONS[act](), act, shape


def _flatten(layer: dict, i: int, shape: tuple[int, ...], where: str):
    return nn.Flatten(), "flatten", (int(_prod(shape)),)


def _dense(layer: dict, i: int, shape: tuple[int, ...], where: str, num_classes: int, *, last_dense: bool,
           last: bool):
    """last_dense: the spec's last dense layer (no activation by default); last: the spec's last layer."""
    if len(shape) != 1:
        raise CnnkitError(f"{where}: dense needs a flat input; add 'flatten' or 'globalavgpool' before it")
    units = layer.get("units", "num_classes")
    units = num_classes if units in ("num_classes", "classes") else units
    if not isinstance(units, int) or units < 1:
        raise CnnkitError(f"{where}: units must be a positive number or num_classes, not {units!r}")
    act = _activation(layer.get("activation", "none" if last_dense else "relu"), where)
    if last and act == "softmax":
        # Models return logits: the loss (and predict) apply softmax at the edges.
        act = "none"
    return Dense(shape[0], units, act), f"dense {units} {act}", (units,)


LAYER_BUILDERS = {"conv": _conv, "maxpool": _pool, "avgpool": _pool, "l2pool": _pool,
                  "globalavgpool": _global_pool, "globalmaxpool": _global_pool, "batchnorm": _batchnorm,
                  "dropout": _dropout, "activation": _activation_layer, "flatten": _flatten}  # dense: _dense


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
