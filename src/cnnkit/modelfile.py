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
from .utils import save_safetensors
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
    from .models.base import unwrap

    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"model metadata lacks {missing}")
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "cnnkit_version": __version__, **meta}
    # unwrap: a compiled or data-parallel model's keys would carry `_orig_mod.` / `module.` prefixes
    tensors = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    bad = non_finite(tensors)
    if bad:  # training stops before this (training.NonFinite); no caller may write such a file
        raise CnnkitError(f"refusing to write {path}: {len(bad)} tensors hold nan or inf (first {bad[0]})")
    path = Path(path)
    save_safetensors(tensors, path, {"cnnkit": json.dumps(header)})
    return path


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a nan or an inf (what a diverged run leaves)."""
    import torch
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


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
    """(model in eval mode, metadata) from a model file or run folder.

    A model file may come from anywhere (a served file, a download), so nothing in its metadata is
    trusted: the architecture is rebuilt on the meta device (no memory) and checked against the
    tensors' shapes in the file header, the class names against the outputs, the declared input
    against the first layer, and the memory it needs against what is available, all before a byte
    of weights is read. Weights holding a nan or an inf are refused: they came from a run that diverged."""
    p = resolve_model_path(path)
    meta = read_metadata(p)
    try:
        with safe_open(p, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CnnkitError(f"{p} is damaged ({str(e).splitlines()[0]}); train it again or restore a copy") from None
    model = validated_architecture(p, meta, shapes)
    declared = model.state_dict()
    with safe_open(p, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in state.items():
        want = declared[k].dtype
        if v.dtype != want:  # a float file in another precision is cast; an integer one cannot be a weight
            if not (v.is_floating_point() and want.is_floating_point):
                raise CnnkitError(f"{p}: {k} is stored as {v.dtype} where the architecture needs {want}: "
                                  "the file is damaged or was edited")
            state[k] = v.to(want)
    bad = non_finite(state)
    if bad:
        raise CnnkitError(f"{p} holds non-finite weights (nan or inf in {len(bad)} of {len(state)} tensors, first "
                          f"{bad[0]}): it came from a run that diverged; train again with a lower --lr")
    # assign: the file's tensors become the parameters, so the weights are in memory once
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CnnkitError(f"{p}: weights do not match the architecture ({str(e).splitlines()[0]})") from None
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # a tensor the file does not hold
        raise CnnkitError(f"{p}: weights do not match the architecture (some tensors are missing)")
    return model.to(device).eval(), meta


MAX_SIDE = 16384  # pixels: no input side larger than this is believed (a 16k x 16k image is 800 MB of fp32)


def validated_architecture(p: Path, meta: dict, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """The module the metadata describes, on the meta device, once every claim is checked against
    the file's tensor shapes and the memory available; a CnnkitError naming the first lie otherwise."""
    import torch
    import torch.nn as nn

    from .models.memory import activation_numel, inference_bytes
    from .models.registry import build_from_record
    from .utils import available_memory_bytes, format_bytes

    names, inp = meta["class_names"], meta["input"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise CnnkitError(f"{p} has broken metadata: class_names must be a list of names")
    if not (isinstance(inp, dict) and all(isinstance(inp.get(k), int) and 0 < inp[k] for k in ("channels", "height", "width"))):
        raise CnnkitError(f"{p} has broken metadata: input must give positive channels, height and width")
    c, h, w = inp["channels"], inp["height"], inp["width"]
    if max(h, w) > MAX_SIDE or c > 4:
        raise CnnkitError(f"{p} declares an input of {c}x{h}x{w}, larger than cnnkit reads (at most 4 channels "
                          f"and {MAX_SIDE} pixels a side): the file is damaged or not made by cnnkit")
    record = meta["architecture"]
    try:
        with torch.device("meta"):  # shapes only: a record claiming 10^12 filters allocates nothing
            model = build_from_record(record if isinstance(record, dict) else {})
    except CnnkitError as e:
        raise CnnkitError(f"{p} has broken metadata: {e}") from None
    except Exception as e:  # whatever a crafted record provokes in a constructor: the file's fault
        raise CnnkitError(f"{p} has broken metadata: cannot rebuild the architecture "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    declared = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(declared) - set(shapes)), sorted(set(shapes) - set(declared))
    if missing or unexpected:
        raise CnnkitError(f"{p}: weights do not match the architecture"
                          + (f" (missing {', '.join(missing[:3])})" if missing else "")
                          + (f" (unexpected {', '.join(unexpected[:3])})" if unexpected else ""))
    for k, shape in declared.items():
        if shapes[k] != shape:
            raise CnnkitError(f"{p}: its metadata declares {k} of shape {list(shape)}, but the file holds "
                              f"{list(shapes[k])}: the file is damaged or was edited")
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d) and first.in_channels != c:
        raise CnnkitError(f"{p} declares {c}-channel input, but its first layer takes {first.in_channels} channels: "
                          "the metadata is wrong")
    try:
        with torch.no_grad():  # in inference mode, as it will run (BatchNorm takes a batch of one)
            outputs = model.eval()(torch.empty(1, c, h, w, device="meta")).shape[-1]
    except (RuntimeError, ValueError, IndexError) as e:
        raise CnnkitError(f"{p} declares input {c}x{h}x{w}, which the architecture cannot take "
                          f"({str(e).splitlines()[0][:160]})") from None
    if outputs != len(names):
        raise CnnkitError(f"{p} lists {len(names)} class names for a model with {outputs} outputs: the metadata is wrong")
    need, have = inference_bytes(model, (c, h, w)), available_memory_bytes()
    if need > have:
        raise CnnkitError(f"{p} needs about {format_bytes(need)} of memory to run one image "
                          f"({format_bytes(4 * activation_numel(model, (c, h, w)))} of activations); "
                          f"this machine has {format_bytes(have)} available")
    return model


def is_model_file(arg: str | Path) -> bool:
    """Whether a command's model argument names a model file or run folder (else a registered name or a YAML spec)."""
    p = Path(arg)
    return p.is_dir() or p.suffix == ".safetensors" or (p.is_file() and p.suffix not in (".yaml", ".yml"))


def model_from_argument(model: str, input_shape: tuple[int, ...] | None = None,
                        num_classes: int = 10) -> tuple[nn.Module, dict | None, str]:
    """(model, its metadata, its name) from a model file or run folder, or (a freshly built model,
    None, the spec's name) from a registered name or YAML spec, for input (C, H, W) (default: the
    spec's own, else 1x28x28). One helper for every command that takes either."""
    if is_model_file(model):
        built, meta = load_model(model)
        return built, meta, meta["architecture"].get("name") or str(model)
    from .models.registry import build_model, default_input, get_spec
    spec = get_spec(model)
    c, h, w = input_shape or default_input(spec) or (1, 28, 28)
    return build_model(spec, num_classes, in_channels=c, image_size=(h, w)), None, spec.get("name") or str(model)
