"""`cnnkit tune`'s search space: a YAML mapping of TrainConfig fields to distributions, checked against the
config's own types, ranges and choices before any trial runs.

    lr: {log_uniform: [1e-4, 1e-1]}          a float drawn uniformly in log space (low > 0)
    weight_decay: {uniform: [0.0, 1e-3]}     a float drawn uniformly
    epochs: {int: [2, 6]}                    a whole number, both ends included ({int: [a, b], step: 2} too)
    batch_size: {log_int: [32, 512]}         a whole number drawn uniformly in log space
    optimizer: {choice: [adam, sgd]}         one of the values (any type the field takes)

    Space.from_file(path, base) -> Space     refuses an unknown field, a field that is not the model's to tune,
                                             inverted or out-of-range bounds, and a value of the wrong type,
                                             each in one line naming the file and the field
    space.suggest(trial) -> {field: value}   the trial's values (an optuna.Trial's suggest_* calls)
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import CHOICES, FIELD_TYPES, OPTIONAL, TrainConfig
from .errors import CnnkitError

KINDS = ("uniform", "log_uniform", "int", "log_int", "choice")
COMBINATIONS = 512  # combinations of a space's ends and choices checked together against the config, at most
# Fields that say where data and results live or how a run is watched, not how a model learns: a search over
# them would compare different experiments, not settings of one
NOT_TUNABLE = ("data", "data_dir", "download", "out", "path_column", "label_column", "split_column", "label_sep",
               "device", "track", "mlflow_uri", "report", "report_tta", "lr_find", "val_split", "test_split", "task")


@dataclass(frozen=True)
class Dimension:
    field: str  # the TrainConfig field
    kind: str  # one of KINDS
    values: tuple  # (low, high) for the ranges, the candidates for choice
    step: int | None = None  # int: the grid's step (None: 1)

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.field, list(self.values))
        low, high = self.values
        if self.kind in ("uniform", "log_uniform"):
            return trial.suggest_float(self.field, float(low), float(high), log=self.kind == "log_uniform")
        return trial.suggest_int(self.field, low, high, step=self.step or 1, log=self.kind == "log_int")

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.field} in {{{', '.join(map(str, self.values))}}}"
        low, high = self.values
        return f"{self.field} {self.kind.replace('_', '-')} [{low:g}, {high:g}]"


@dataclass(frozen=True)
class Space:
    dimensions: tuple[Dimension, ...]

    @classmethod
    def from_file(cls, path: str | Path, base: TrainConfig) -> "Space":
        import yaml
        try:
            d = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeError) as e:
            raise CnnkitError(f"cannot read search space {path}: {str(e).splitlines()[0]}") from None
        return cls.from_dict(d, base, source=f"search space {path}")

    @classmethod
    def from_dict(cls, d: Any, base: TrainConfig, source: str = "the search space") -> "Space":
        if not isinstance(d, dict) or not d:
            raise CnnkitError(f"{source} must map config fields to distributions, e.g. "
                              "lr: {log_uniform: [1e-4, 1e-1]}")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        dims = []
        for name, spec in d.items():
            where = f"{source}: {name}"
            if name not in known:
                raise CnnkitError(f"{where} is not a config field; tunable fields: "
                                  f"{', '.join(sorted(known - set(NOT_TUNABLE)))}")
            if name in NOT_TUNABLE:
                raise CnnkitError(f"{where} says where data and results go, not how the model learns: set it for "
                                  "every trial with --" + name.replace("_", "-"))
            dims.append(dimension(name, spec, where))
        space = cls(tuple(dims))
        space.check_against(base, source)
        return space

    def check_against(self, base: TrainConfig, source: str) -> None:
        """Every combination of the ends of the ranges and the choices, put in the base config, must pass the
        config's own checks (types, ranges, choices, and how fields go together: lookahead needs an ema), so no
        trial fails on values the space allowed; past COMBINATIONS, each value alone."""
        if base.lr_find and any(d.field == "lr" for d in self.dimensions):
            raise CnnkitError(f"{source}: lr: --lr auto finds the lr itself: leave lr out of the space, or drop "
                              "--lr auto")
        corners = [[(dim.field, v) for v in dim.values] for dim in self.dimensions]
        combos = (itertools.product(*corners) if math.prod(len(c) for c in corners) <= COMBINATIONS
                  else ([pair] for c in corners for pair in c))
        for combo in combos:
            try:
                dataclasses.replace(base, **dict(combo)).validate()
            except CnnkitError as e:
                shown = ", ".join(f"{k} {v!r}" for k, v in combo)
                raise CnnkitError(f"{source}: {shown} is not a setting the config takes ({e})") from None

    def suggest(self, trial) -> dict[str, Any]:
        return {dim.field: dim.suggest(trial) for dim in self.dimensions}

    def to_dict(self) -> dict:
        """The space as its YAML form: what a study records, so that every worker checks it tunes the same."""
        out = {}
        for dim in self.dimensions:
            out[dim.field] = {dim.kind: list(dim.values), **({"step": dim.step} if dim.step else {})}
        return out


def dimension(name: str, spec: Any, where: str) -> Dimension:
    """One field's distribution, its form and types checked (its values are checked by Space.check_against)."""
    example = f"e.g. {name}: {{uniform: [low, high]}} or {name}: {{choice: [a, b]}}"
    if not isinstance(spec, dict) or not (set(spec) & set(KINDS)):
        raise CnnkitError(f"{where} must be one of {', '.join(KINDS)} with its values, {example}")
    kinds = [k for k in spec if k in KINDS]
    extra = sorted(set(spec) - set(KINDS) - {"step"})
    if len(kinds) != 1 or extra:
        raise CnnkitError(f"{where} takes one distribution ({', '.join(KINDS)}) and, for int, a step; "
                          f"not {', '.join(map(str, kinds + extra))}")
    kind, values = kinds[0], spec[kinds[0]]
    field_type = FIELD_TYPES[name]
    if field_type in (int, float) and isinstance(values, list):
        values = [as_number(v) for v in values]
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise CnnkitError(f"{where}: choice takes a non-empty list of values, {example}")
        if len(set(map(repr, values))) != len(values):
            raise CnnkitError(f"{where}: choice lists a value twice")
        for v in values:
            if not type_fits(v, field_type, name):
                raise CnnkitError(f"{where}: choice {v!r} is not {TYPE_WORDS[field_type]}, as {name} is")
        return Dimension(name, kind, tuple(values))
    if name in CHOICES:  # a whole number with a few allowed values (channels: 1 or 3)
        raise CnnkitError(f"{where} takes one of {', '.join(map(str, CHOICES[name]))}: give them with choice")
    if field_type in (bool, str):
        sample = [c for c in CHOICES.get(name, ()) if c is not None] or ([True, False] if field_type is bool else "ab")
        raise CnnkitError(f"{where} is {TYPE_WORDS[field_type]}: give its values with choice, e.g. "
                          f"{name}: {{choice: [{', '.join(map(str, sample[:3]))}]}}")
    if not (isinstance(values, list) and len(values) == 2 and all(is_number(v) for v in values)):
        raise CnnkitError(f"{where}: {kind} takes [low, high], two numbers, not {values!r}")
    low, high = values
    if kind in ("int", "log_int"):
        if field_type is not int:
            raise CnnkitError(f"{where} is a number with a fraction: use uniform or log_uniform, not {kind}")
        if not all(float(v).is_integer() for v in values):
            raise CnnkitError(f"{where}: {kind} takes whole-number bounds, not {values!r}")
        low, high = int(low), int(high)
    elif field_type is int:
        raise CnnkitError(f"{where} is a whole number: use int or log_int, not {kind}")
    if not low < high:
        raise CnnkitError(f"{where}: the bounds [{low}, {high}] are inverted or equal: give [low, high] with "
                          "low < high (a fixed value goes in the config, not the space)")
    if kind.startswith("log") and low <= 0:
        raise CnnkitError(f"{where}: {kind} needs low > 0 (its logarithm is drawn), not {low}")
    step = spec.get("step")
    if step is not None:
        if kind != "int" or not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise CnnkitError(f"{where}: step is for int only and must be a whole number of at least 1")
        if (high - low) % step:
            raise CnnkitError(f"{where}: step {step} does not divide [{low}, {high}]")
    return Dimension(name, kind, (low, high), step)


TYPE_WORDS = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}


def as_number(v: Any) -> Any:
    """YAML 1.1 (PyYAML) reads 1e-4, without a dot, as text: such text is the number it spells."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def type_fits(v: Any, kind: type, name: str) -> bool:
    if v is None:
        return OPTIONAL[name]
    if kind is bool:
        return isinstance(v, bool)
    if kind is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if kind is float:
        return is_number(v)
    return isinstance(v, str)
