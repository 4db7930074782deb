"""cnnkit math: the lecture notes' arithmetic step by step (conv, pool, shapes, params, loss)."""
from __future__ import annotations

import json

from ..errors import CnnkitError
from .common import parse_shape


def add(sub) -> None:
    p = sub.add_parser("math", help="the lecture notes' math, step by step (conv, pool, shapes, params, loss)")
    topics = p.add_subparsers(dest="topic", required=True)
    c = topics.add_parser("conv", help="output size o = ⌊(n + 2p − m)/s⌋ + 1, or a convolution step by step")
    c.add_argument("--n", type=int, help="input size")
    c.add_argument("--m", type=int, help="kernel size")
    c.add_argument("--padding", default="0", help="valid, same, full or a number (default 0)")
    c.add_argument("--stride", type=int, default=1)
    c.add_argument("--input", help="input values, rows separated by ';', e.g. '1 2 3; 4 5 6; 7 8 9'")
    c.add_argument("--kernel", help="kernel values, e.g. '1 0; 0 -1'")
    c.add_argument("--mode", choices=["cross_correlation", "convolution"], default="cross_correlation")
    c.add_argument("--picture", metavar="FILE.png", help="draw the sliding window at every step")
    c.add_argument("--json", action="store_true")
    pl = topics.add_parser("pool", help="pooling output size, or max/avg/L2 pooling step by step")
    pl.add_argument("--n", type=int, help="input size")
    pl.add_argument("--size", type=int, default=2)
    pl.add_argument("--stride", type=int, default=None, help="default: the window size (no overlap)")
    pl.add_argument("--kind", choices=["max", "avg", "l2"], default="max")
    pl.add_argument("--input", help="input values, rows separated by ';'")
    pl.add_argument("--json", action="store_true")
    sh = topics.add_parser("shapes", help="the tensor shape after every layer, e.g. [4, 1, 28, 28] → [4, 10]")
    sh.add_argument("model", help="registered name, YAML spec, model file or run folder")
    sh.add_argument("--input", help="NxCxHxW, e.g. 4x1x28x28 (default: 1 x the model's input)")
    sh.add_argument("--num-classes", type=int, default=10)
    sh.add_argument("--json", action="store_true")
    pa = topics.add_parser("params", help="a conv layer's parameters against a dense layer to the same output")
    pa.add_argument("--input", required=True, help="CxHxW, e.g. 3x32x32")
    pa.add_argument("--filters", type=int, required=True)
    pa.add_argument("--kernel", type=int, required=True)
    pa.add_argument("--padding", default="valid")
    pa.add_argument("--stride", type=int, default=1)
    pa.add_argument("--json", action="store_true")
    lo = topics.add_parser("loss", help="cross-entropy from probabilities and from logits")
    lo.add_argument("--logits", type=float, nargs="+", required=True, help="one logit: binary; several: categorical")
    lo.add_argument("--target", type=int, required=True, help="1/0 (binary) or the class index")
    lo.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import teach
    from ..jobs import math

    if args.topic == "conv":
        result = math.conv(args.n, args.m, args.padding, args.stride, args.input, args.kernel, args.mode, args.picture)
        if "steps" in result:  # values given: the steps (and the picture, if drawn)
            text = teach.format_conv_steps(result) + (f"\npicture: {result['picture']}" if "picture" in result else "")
        else:
            text = teach.format_conv_output(result)
    elif args.topic == "pool":
        result = math.pool(args.n, args.size, args.stride, args.kind, args.input)
        text = teach.format_pool(result)
    elif args.topic == "shapes":
        result = math.shapes(args.model, parse_batch_shape(args.input) if args.input else None, args.num_classes)
        text = teach.format_shapes(result)
    elif args.topic == "params":
        result = math.params(parse_shape(args.input), args.filters, args.kernel, args.padding, args.stride)
        text = teach.format_params(result)
    else:  # loss
        result = math.loss(args.logits, args.target)
        text = teach.format_loss(result)
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else text)
    return 0


def parse_batch_shape(text: str) -> tuple[int, int, int, int]:
    """NxCxHxW, or CxHxW for a batch of one."""
    try:
        shape = tuple(int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        shape = ()
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise CnnkitError(f"--input must be NxCxHxW or CxHxW, e.g. 4x1x28x28, not {text!r}")
    return shape if len(shape) == 4 else (1, *shape)
