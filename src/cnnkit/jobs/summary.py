"""`cnnkit summary`: layers, output shapes, parameter counts and multiply-adds of a model."""
from __future__ import annotations

from ..modelfile import model_from_argument
from ..models import summary


def summarize(model: str, input_shape: tuple[int, int, int] | None = None, num_classes: int = 10) -> tuple[dict, str]:
    """(models.summary's dict, a title naming what was summarized) for a registered name, a YAML
    spec, a model file or a run folder."""
    built, info, name = model_from_argument(model, input_shape, num_classes)
    if info is not None:
        return summary(built), f"model file {model} ({info.name})"
    c, h, w = built.input_shape
    return summary(built), f"model {name} on input {c}x{h}x{w}, {num_classes} classes"
