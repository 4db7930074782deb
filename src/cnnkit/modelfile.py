"""The model file: one safetensors file holding the weights, with cnnkit's JSON metadata in the
safetensors header (`__metadata__["cnnkit"]`). Loading parses JSON and raw tensors only: nothing in
the file can execute code. Writes go to a temporary name and are renamed.

The metadata is a `ModelInfo`: read once per command (`read_info`, `load_model`) and handed on; its
defaults live here and nowhere else, and this is the one module that reads the JSON by key.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from .conformal import check_record
from .decode import RESIZE_METHOD
from .errors import CnnkitError
from .utils import save_safetensors
from .version import __version__

if TYPE_CHECKING:  # torch is imported when weights are read or written, not for the metadata alone:
    import torch  # `cnnkit predict` on an ONNX runtime never loads PyTorch
    import torch.nn as nn

    from .config import TrainConfig

FORMAT = "cnnkit-model"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"  # its name inside a run folder
REQUIRED = ("architecture", "class_names", "input", "preprocessing")
TASKS = ("single-label", "multi-label", "binary")  # one class per image (softmax) | any set of them (one sigmoid
# per label) | one of two classes from one logit (sigmoid: the probability of the second class)


@dataclass(frozen=True)
class InputShape:
    """What the model takes: channels x height x width, in pixels."""
    channels: int
    height: int
    width: int

    @property
    def chw(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width

    @property
    def square(self) -> bool:
        return self.height == self.width

    def __str__(self) -> str:
        return f"{self.channels}x{self.height}x{self.width}"


@dataclass(frozen=True)
class Preprocessing:
    """pixel (uint8) -> (pixel / scale - mean) / std per channel, after decoding by `resize`."""
    mean: list[float]
    std: list[float]
    scale: int = 255
    resize: str = RESIZE_METHOD  # how images are decoded to the input size (the only rule so far)


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: the image, maybe its mirror, and four shifts of shift_pixels."""
    hflip: bool = True  # False where a mirror changes the class (digits)
    shift_pixels: int = 2  # the notes' 2 pixels on 28x28


@dataclass(frozen=True)
class DataRecord:
    """The data a model was trained on, as the report tells it."""
    name: str = ""  # dataset name or folder name
    source: str = ""  # where it was read from
    sizes: dict = field(default_factory=dict)  # images per split
    test_source: str = "test"  # 'val' when the data had no test split
    skipped: list = field(default_factory=list)  # [path, reason] of files that could not be decoded


@dataclass
class ModelInfo:
    """Everything a model file records besides its weights: enough to rebuild the model, preprocess
    new images exactly as in training, and tell what it is. Fields absent from older files take the
    defaults here."""
    architecture: dict  # the rebuild record (models.registry.build_from_record): kind, name, spec or args
    class_names: list[str]  # output k is class_names[k]
    input: InputShape
    preprocessing: Preprocessing
    task: str = "single-label"  # one of TASKS
    temperature: float = 1.0  # calibration: logits / temperature before the softmax (1: uncalibrated)
    calibrated_on: str | None = None  # the split the temperature was fitted on ('val'), None if never
    tta: TTA = field(default_factory=TTA)
    data: DataRecord = field(default_factory=DataRecord)
    training: dict = field(default_factory=dict)  # the run's TrainConfig as a dict (config.json)
    metrics: dict = field(default_factory=dict)  # metrics.json's figures
    history: list[dict] = field(default_factory=list)  # one row per epoch (history.csv)
    precision: dict = field(default_factory=dict)  # {"training": 'bf16'|'fp32', "reason": why}
    pretrained: dict | None = None  # where ImageNet weights came from, their mean/std, tensors loaded
    cnnkit_version: str = __version__  # of the cnnkit that wrote the file
    thresholds: list[float] | None = None  # multi-label: label k is present when its probability >= thresholds[k];
                                           # binary: [t], the second class when its probability >= t
    distillation: dict | None = None  # the teacher a model was distilled from: its file, sha256, architecture, input,
                                      # test accuracy, and --kd-alpha / --kd-temperature (training.distill)
    conformal: dict | None = None  # conformal.fit's record, {score, scores}: the validation split's sorted conformity
                                   # scores, for prediction sets at any coverage (in the calibration record)

    @property
    def name(self) -> str:
        """The architecture's name for people (the SVM's, a spec's, a registered one's)."""
        return self.architecture.get("name") or self.architecture.get("kind") or "model"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def outputs(self) -> int:
        """The model's logits per image: one per class, or one for a binary model."""
        return 1 if self.task == "binary" else len(self.class_names)

    @property
    def decision_thresholds(self) -> list[float]:
        """The thresholds that decide: a multi-label model's one per label, a binary model's one,
        0.5 each where the file records none (and for a single-label model, whose argmax decides)."""
        return [float(t) for t in self.thresholds] if self.thresholds is not None else [0.5] * self.outputs

    @property
    def data_name(self) -> str | None:
        """The dataset it was trained on, by name (the data record's, else the config's)."""
        return self.data.name or self.training.get("data")

    def train_config(self) -> TrainConfig:
        """The run's TrainConfig; fields an older cnnkit recorded and this one lacks are dropped,
        fields it lacks take today's defaults."""
        from .config import TrainConfig
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in self.training.items() if k in known})

    def numeric_metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.metrics.items() if isinstance(v, (int, float))}

    def square_side(self, what: str) -> int:
        """The input side of a model that takes square images; a one-line error naming `what` otherwise."""
        if not self.input.square:
            raise CnnkitError(f"{what} needs a model with square input; this one takes {self.input}")
        return self.input.height

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = {"architecture": self.architecture, "class_names": list(self.class_names),
             "input": dataclasses.asdict(self.input), "preprocessing": dataclasses.asdict(self.preprocessing),
             "task": self.task, "tta": dataclasses.asdict(self.tta), "data": dataclasses.asdict(self.data),
             "training": self.training, "metrics": self.metrics, "history": self.history,
             "precision": self.precision, "pretrained": self.pretrained, "cnnkit_version": self.cnnkit_version}
        if self.calibrated_on is not None or self.temperature != 1.0 or self.conformal is not None:
            d["calibration"] = self.calibration()
        if self.thresholds is not None:
            d["thresholds"] = [float(t) for t in self.thresholds]
        if self.distillation is not None:
            d["distillation"] = self.distillation
        return d

    def calibration(self) -> dict:
        """The calibration record: {temperature, fitted_on (when fitted), conformal (when fitted)}; exports carry it."""
        return {"temperature": self.temperature, **({"fitted_on": self.calibrated_on} if self.calibrated_on else {}),
                **({"conformal": self.conformal} if self.conformal is not None else {})}

    @classmethod
    def from_export(cls, record: Any, where: str) -> ModelInfo:
        """The ModelInfo of an export (export.export_metadata's record: input with its layout, the
        architecture's name only; a multi-label one's task and thresholds, a single-label one's no
        task), so predict and serve read ONNX files and model files alike."""
        if not (isinstance(record, dict) and record.get("format") == "cnnkit-export"):
            raise CnnkitError(f"{where} is an ONNX file without cnnkit metadata; export it with `cnnkit export`")
        inp = {k: v for k, v in (record.get("input") or {}).items() if k in ("channels", "height", "width")}
        calibration = record.get("calibration") or {}
        return cls.from_dict({"architecture": {"name": record.get("architecture")}, "input": inp,
                              "class_names": record.get("class_names"), "preprocessing": record.get("preprocessing"),
                              "calibration": calibration, "metrics": record.get("metrics") or {},
                              "task": record.get("task", "single-label"), "thresholds": record.get("thresholds"),
                              "cnnkit_version": record.get("cnnkit_version", "?")}, where=where)

    @classmethod
    def from_dict(cls, d: Any, where: str = "the metadata") -> ModelInfo:
        """A ModelInfo from the JSON of a model file (or a dict a caller built), checked for shape:
        one CnnkitError naming the first field that is missing, unknown or of the wrong kind."""
        def broken(why: str) -> CnnkitError:
            return CnnkitError(f"{where} has broken metadata: {why}")
        if not isinstance(d, dict):
            raise broken("it is not a JSON object")
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise broken(f"missing {', '.join(missing)}")
        known = {"format", "format_version", "calibration", *(f.name for f in dataclasses.fields(cls))}
        unknown = sorted(set(d) - known)
        if unknown:
            raise broken(f"unknown field(s) {', '.join(unknown)} (written by a newer cnnkit? upgrade cnnkit)")
        names, inp, pre = d["class_names"], d["input"], d["preprocessing"]
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise broken("class_names must be a list of names")
        if not (isinstance(inp, dict) and all(isinstance(inp.get(k), int) and 0 < inp[k]
                                              for k in ("channels", "height", "width"))):
            raise broken("input must give positive channels, height and width")
        if not (isinstance(pre, dict) and all(isinstance(pre.get(k), list) and pre[k] for k in ("mean", "std"))):
            raise broken("preprocessing must give mean and std per channel")
        if not isinstance(d["architecture"], dict):
            raise broken("architecture must be a record")
        if d.get("task", "single-label") not in TASKS:
            raise broken(f"task {d.get('task')!r} is not one of {', '.join(TASKS)} (written by a newer cnnkit?)")
        thresholds, binary = d.get("thresholds"), d.get("task") == "binary"
        if binary and len(names) != 2:
            raise broken("a binary model has two class names")
        if thresholds is not None and not (isinstance(thresholds, list) and len(thresholds) == (
                1 if binary else len(names)) and all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1 for t in thresholds)):
            raise broken("thresholds must be one probability in [0, 1] per class (one in all for a binary model)")

        def record(kind, key: str):
            value = d.get(key) or {}
            try:
                return kind(**value) if isinstance(value, dict) else kind()
            except TypeError as e:
                raise broken(f"{key}: {e}") from None
        calibration = d.get("calibration") or {}
        return cls(architecture=d["architecture"], class_names=names,
                   input=InputShape(inp["channels"], inp["height"], inp["width"]),
                   preprocessing=record(Preprocessing, "preprocessing"), task=d.get("task", "single-label"),
                   temperature=float(calibration.get("temperature", 1.0)), calibrated_on=calibration.get("fitted_on"),
                   tta=record(TTA, "tta"), data=record(DataRecord, "data"), training=d.get("training") or {},
                   metrics=d.get("metrics") or {}, history=d.get("history") or [], precision=d.get("precision") or {},
                   pretrained=d.get("pretrained"), cnnkit_version=d.get("cnnkit_version", "?"), thresholds=thresholds,
                   conformal=check_record(calibration.get("conformal"), where),
                   distillation=d["distillation"] if isinstance(d.get("distillation"), dict) else None)


def save_model(path: str | Path, model: nn.Module, info: ModelInfo | dict) -> Path:
    """Write weights + metadata atomically. A dict is read as ModelInfo.from_dict reads a file's."""
    from .models.base import unwrap

    if not isinstance(info, ModelInfo):
        info = ModelInfo.from_dict(info, where="the model to save")
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, **info.to_dict(), "cnnkit_version": __version__}
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
        raise CnnkitError(f"no model file at {path} (expected a .safetensors model file or a run folder holding "
                          f"{MODEL_FILE})")
    return p


def read_info(path: str | Path) -> ModelInfo:
    """The metadata of a model file or run folder, checked for shape (not yet against the tensors)."""
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
        raise CnnkitError(f"{p} has metadata that is not a cnnkit model's "
                          f"(format={meta.get('format') if isinstance(meta, dict) else '?'})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CnnkitError(f"{p} was written by a newer cnnkit ({meta.get('cnnkit_version')}); upgrade cnnkit")
    return ModelInfo.from_dict(meta, where=str(p))


def load_model(path: str | Path, device: str | torch.device = "cpu", info: ModelInfo | None = None
               ) -> tuple[nn.Module, ModelInfo]:
    """(model in eval mode, metadata) from a model file or run folder (`info`: its metadata, if
    already read, so the file is parsed once).

    A model file may come from anywhere (a served file, a download), so nothing in its metadata is
    trusted: the architecture is rebuilt on the meta device (no memory) and checked against the
    tensors' shapes in the file header, the class names against the outputs, the declared input
    against the first layer, and the memory it needs against what is available, all before a byte
    of weights is read. Weights holding a nan or an inf are refused: they came from a run that diverged."""
    p = resolve_model_path(path)
    info = info or read_info(p)
    try:
        with safe_open(p, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CnnkitError(f"{p} is damaged ({str(e).splitlines()[0]}); train it again or restore a copy") from None
    model = validated_architecture(p, info, shapes)
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
    return model.to(device).eval(), info


MAX_SIDE = 16384  # pixels: no input side larger than this is believed (a 16k x 16k image is 800 MB of fp32)


def validated_architecture(p: Path, info: ModelInfo, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """The module the metadata describes, on the meta device, once every claim is checked against
    the file's tensor shapes and the memory available; a CnnkitError naming the first lie otherwise."""
    import torch
    import torch.nn as nn

    from .models.memory import activation_numel, inference_bytes
    from .models.registry import build_from_record
    from .utils import available_memory_bytes, format_bytes

    names = info.class_names
    c, h, w = info.input.chw
    if max(h, w) > MAX_SIDE or c > 4:
        raise CnnkitError(f"{p} declares an input of {c}x{h}x{w}, larger than cnnkit reads (at most 4 channels "
                          f"and {MAX_SIDE} pixels a side): the file is damaged or not made by cnnkit")
    try:
        with torch.device("meta"):  # shapes only: a record claiming 10^12 filters allocates nothing
            model = build_from_record(info.architecture)
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
    if outputs != info.outputs:
        one = " (a binary model has one)" if info.task == "binary" else ""
        raise CnnkitError(f"{p} lists {len(names)} class names for a model with {outputs} outputs{one}: "
                          "the metadata is wrong")
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
                        num_classes: int = 10) -> tuple[nn.Module, ModelInfo | None, str]:
    """(model, its metadata, its name) from a model file or run folder, or (a freshly built model,
    None, the spec's name) from a registered name or YAML spec, for input (C, H, W) (default: the
    spec's own, else 1x28x28). One helper for every command that takes either."""
    if is_model_file(model):
        built, info = load_model(model)
        return built, info, info.name
    from .models.registry import build_model, default_input, get_spec
    spec = get_spec(model)
    c, h, w = input_shape or default_input(spec) or (1, 28, 28)
    return build_model(spec, num_classes, in_channels=c, image_size=(h, w)), None, spec.get("name") or str(model)
