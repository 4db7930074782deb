"""cnnkit summary: layers, output shapes, parameter counts and multiply-adds (with --formulas, the cheat sheet)."""
from __future__ import annotations

import json

from .common import parse_shape


def add(sub) -> None:
    p = sub.add_parser("summary", help="layers, output shapes, parameter counts and multiply-adds of a model")
    p.add_argument("model", help="registered name, YAML spec, model file or run folder")
    p.add_argument("--input", default=None, help="input shape CxHxW, e.g. 1x28x28 (default: the spec's own)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--formulas", action="store_true", help="show the cheat-sheet formula behind every count")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.summary import summarize
    from ..models.summary import format_summary

    info, title = summarize(args.model, parse_shape(args.input) if args.input else None, args.num_classes)
    print(json.dumps(info, indent=2) if args.json else format_summary(info, title, formulas=args.formulas))
    return 0
