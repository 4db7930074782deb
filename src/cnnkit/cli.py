"""The command line: parse arguments, call the library, print. The only module that exits.

Every failure a user can cause ends in one line on stderr and a non-zero exit, never a traceback
(set CNNKIT_DEBUG=1 to see one)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import CnnkitError, TrainingInterrupted

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise CnnkitError(f"--input must look like CxHxW, e.g. 1x28x28, not {text!r}")
    return parts


def is_model_file(arg: str) -> bool:
    p = Path(arg)
    return p.is_dir() or p.suffix == ".safetensors" or (p.is_file() and p.suffix not in (".yaml", ".yml"))


def cmd_summary(args) -> int:
    from .models import build_model, get_spec, summary
    from .models.registry import default_input
    from .models.summary import format_summary

    if is_model_file(args.model):
        from .modelfile import load_model
        model, meta = load_model(args.model)
        title = f"model file {args.model} ({meta['architecture'].get('name')})"
    else:
        spec = get_spec(args.model)
        c, h, w = parse_shape(args.input) if args.input else (default_input(spec) or (1, 28, 28))
        model = build_model(spec, args.num_classes, in_channels=c, image_size=(h, w))
        title = f"model {spec.get('name')} on input {c}x{h}x{w}, {args.num_classes} classes"
    info = summary(model)
    print(json.dumps(info, indent=2) if args.json else format_summary(info, title))
    return 0


def cmd_models(args) -> int:
    from .models import list_models
    models = list_models()
    if args.json:
        print(json.dumps(models, indent=2))
    else:
        for m in models:
            shape = "x".join(map(str, m["input"])) if m["input"] else "any"
            print(f"{m['name']:<18} {shape:<9} {m['description']}")
    return 0


def cmd_train(args) -> int:
    from .config import TrainConfig
    from .train import train

    out = sys.stderr if args.json else sys.stdout  # with --json, stdout holds only the JSON
    echo = lambda msg: print(msg, file=out, flush=True)  # noqa: E731
    if args.resume:
        result = train(resume=args.resume, quiet=args.quiet, echo=echo)
    else:
        fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
        result = train(TrainConfig(**fields), quiet=args.quiet, echo=echo)
    if args.json:
        print(json.dumps({"run_dir": str(result.run_dir), "metrics": result.metrics, "history": result.history,
                          "skipped": [list(s) for s in result.dataset.skipped]}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(prog="cnnkit", description="Train, evaluate and use CNN image classifiers.")
    p.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on a dataset and write a run folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--data", default=d.data, help="mnist, fashion-mnist, cifar10, digits, or a folder of images")
    t.add_argument("--model", default=d.model, help="registered model name (see `cnnkit models`) or YAML spec file")
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (warmup, then linear decay)")
    t.add_argument("--optimizer", choices=["adam", "sgd"], default=d.optimizer)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--schedule", choices=["linear", "constant"], default=d.schedule)
    t.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    t.add_argument("--val-split", type=float, default=d.val_split, help="validation fraction when the data has none")
    t.add_argument("--test-split", type=float, default=d.test_split, help="test fraction when the data has no split")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--image-size", type=int, default=None, help="square side in pixels (default: the data's own)")
    t.add_argument("--channels", type=int, choices=[1, 3], default=None, help="convert images to 1 or 3 channels")
    t.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision)
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device)
    t.add_argument("--data-dir", default=None, help="folder holding dataset files already on disk")
    t.add_argument("--no-download", dest="download", action="store_false", default=None,
                   help="never download; fail if the files are not on disk")
    t.add_argument("--out", default=None, help="run folder (default runs/<data>-<model>-<time>)")
    t.add_argument("--resume", metavar="RUN", default=None, help="continue an interrupted run folder to its end")
    t.add_argument("--json", action="store_true", help="print the result as JSON on stdout (progress goes to stderr)")
    t.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("summary", help="layers, output shapes, parameter counts and multiply-adds of a model")
    s.add_argument("model", help="registered name, YAML spec, model file or run folder")
    s.add_argument("--input", default=None, help="input shape CxHxW, e.g. 1x28x28 (default: the spec's own)")
    s.add_argument("--num-classes", type=int, default=10)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_summary)

    m = sub.add_parser("models", help="list the registered models")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrainingInterrupted as e:
        print(f"cnnkit: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CnnkitError as e:
        print(f"cnnkit: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("cnnkit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug of ours: still one line, with the way to the full traceback
        if os.environ.get("CNNKIT_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"cnnkit: internal error: {type(e).__name__}: {msg} (set CNNKIT_DEBUG=1 for the traceback, "
              "and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
