"""`cnnkit math`: the lecture notes' arithmetic, step by step (teach.py), one function per topic.
Each returns teach's result dict; cli/math.py prints it with teach's formatter."""
from __future__ import annotations

from .. import teach
from ..errors import CnnkitError


def conv(n: int | None, m: int | None, padding: str, stride: int, values: str | None = None,
         kernel: str | None = None, mode: str = "cross_correlation", picture: str | None = None) -> dict:
    """The output size o = (n + 2p - m)/s + 1 from sizes, or the convolution step by step from values
    (drawn into `picture` if given)."""
    pad = teach.parse_padding(padding)
    if values is not None or kernel is not None:
        if values is None or kernel is None:
            raise CnnkitError("give both --input and --kernel values (or --n and --m for sizes only)")
        result = teach.conv_steps(teach.parse_matrix(values, "input"), teach.parse_matrix(kernel, "kernel"),
                                  pad, stride, mode)
        if picture:
            from ..report import draw_conv_steps
            result["picture"] = str(draw_conv_steps(result, picture))
        return result
    if n is None or m is None:
        raise CnnkitError("give --n (input size) and --m (kernel size), or --input and --kernel values")
    return teach.conv_output(n, m, pad, stride)


def pool(n: int | None, size: int, stride: int | None, kind: str, values: str | None = None) -> dict:
    x = teach.parse_matrix(values, "input") if values else None
    return teach.pool_steps(x, n, size, stride, kind)


def shapes(model: str, shape: tuple[int, ...] | None, num_classes: int) -> dict:
    """The tensor shape after every layer for input (N, C, H, W) (default: 1 x the model's input)."""
    from ..modelfile import model_from_argument
    built, _, _ = model_from_argument(model, shape[1:] if shape else None, num_classes)
    return teach.shapes(built, shape or (1, *built.input_shape))


def params(shape: tuple[int, int, int], filters: int, kernel: int, padding: str, stride: int) -> dict:
    return teach.param_comparison(shape, filters, kernel, teach.parse_padding(padding), stride)


def loss(logits: list[float], target: int) -> dict:
    return teach.loss_example(logits, target)
