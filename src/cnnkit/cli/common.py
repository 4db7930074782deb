"""What several commands share: exit codes, shapes typed as CxHxW, and the TrainConfig flags
(train, label-issues and augment-preview take every one)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CnnkitError

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130
# predict's and serve's --runtime choices: runtimes.RUNTIMES, written out here because importing runtimes
# would load numpy and the model file's reader for every command's --help (tests/test_int8.py checks they agree)
RUNTIMES = ("auto", "torch", "onnx", "int8", "openvino", "openvino-int8")


def print_json(result: dict, files: dict | None = None) -> None:
    """A job's result on stdout as JSON (--json), with its files as strings when it wrote some."""
    import json
    print(json.dumps({**result, "files": {k: str(v) for k, v in files.items()}} if files is not None else result,
                     indent=2, ensure_ascii=False))


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise CnnkitError(f"--input must look like CxHxW, e.g. 1x28x28, not {text!r}")
    return parts


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--config and --recipe, then one flag per TrainConfig field, its help text the field's
    comment: the config is the one place an option is defined. Defaults are SUPPRESSed, so
    config_from_args sees only the flags a user typed and a --config file keeps every value they do
    not override."""
    import dataclasses

    from ..config import CHOICES, FIELD_TYPES, PER_DATASET_RECIPES, TrainConfig, field_help, recipe_names

    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="a YAML (or JSON) file of config fields, e.g. a recipe or a run's config.json")
    parser.add_argument("--recipe", metavar="NAME", default=None,
                        help=f"a shipped recipe (src/cnnkit/recipes): {', '.join(recipe_names())}, or "
                             f"{' / '.join(PER_DATASET_RECIPES)} for the --data given; --config and flags override it")
    helps, defaults = field_help(), TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag, kind, default = "--" + f.name.replace("_", "-"), FIELD_TYPES[f.name], getattr(defaults, f.name)
        text = f"{helps.get(f.name, '')} (default: {default})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            choices = [c for c in CHOICES.get(f.name, ()) if c is not None] or None
            kind = learning_rate if f.name == "lr" else kind  # --lr auto: TrainConfig reads it as lr_find
            parser.add_argument(flag, type=kind, choices=choices, default=argparse.SUPPRESS,
                                metavar=None if choices else f.name.upper(), help=text)


def learning_rate(text: str) -> float | str:
    """--lr's value: a number, or auto (the lr-find sweep's suggestion)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or auto, not {text!r}") from None


def read_listed(fields: dict):
    """The label file given as --data (data.labelfile.LabelFile, read with the column flags given),
    for `--recipe fast` to look at its images; None when --data is no label file."""
    from ..config import TrainConfig
    data = fields.get("data") or TrainConfig().data
    suffixes = (".csv", ".tsv", ".jsonl")  # data.LABEL_FILE_SUFFIXES, without importing torch for every command
    if not (Path(data).is_file() and Path(data).suffix.lower() in suffixes):
        return None
    from ..data.labelfile import Columns, read_label_file
    columns = Columns(path=fields.get("path_column"), label=fields.get("label_column"),
                      split=fields.get("split_column"), label_sep=fields.get("label_sep") or TrainConfig().label_sep)
    return read_label_file(Path(data), columns)


def listed_files(fields: dict, listed=None) -> list[str] | None:
    """The image paths of read_listed's label file (`listed`, when the caller has read it); None when
    --data is no label file."""
    listed = listed or read_listed(fields)
    return None if listed is None else [p for entries in listed.files.values() for p, _ in entries]


# A recipe's one-class-per-image choices, dropped for a multi-label run (typed, they are refused: session.py)


def config_from_args(args):
    """The TrainConfig a command's flags describe: lowest to highest precedence, the recipe, the
    --config file, the flags typed (their defaults are SUPPRESSed, so only typed ones are here)."""
    import dataclasses

    from ..config import TrainConfig, recipe_choice

    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    base = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    if "lr" in given:  # a typed --lr wins over a file's `lr: auto` (--lr auto sets lr_find again)
        base["lr_find"] = False
    if args.recipe:
        data = given.get("data") or base.get("data") or TrainConfig().data
        listed = read_listed({**base, **given}) if args.recipe == "fast" else None
        path, why = recipe_choice(args.recipe, data, listed_files({}, listed) if listed else None)
        if why:  # chosen by looking at the folder: say what and why
            print(f"recipe fast for {data}: {why} ({path.name})", file=sys.stderr)
        recipe = TrainConfig.from_file(path).to_dict()
        multi = (listed is not None and listed.multi_label) or {**base, **given}.get("task") == "multi-label"
        from ..jobs.train import ONE_CLASS_FIELDS
        if multi and any(recipe.get(k) != v for k, v in ONE_CLASS_FIELDS.items()):
            recipe.update(ONE_CLASS_FIELDS)
            print(f"recipe {args.recipe} for multi-label data: without its label smoothing, class balancing and "
                  "per-class augmentation (they mean one class per image)", file=sys.stderr)
        base = {**recipe, **base}
    return TrainConfig.from_dict({**base, **given},
                                 source=f"config file {args.config}" if args.config else "the flags"), given
