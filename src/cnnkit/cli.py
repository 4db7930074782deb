"""The command line: parse arguments, call the library, print. The only module that exits.

Every failure a user can cause ends in one line on stderr and a non-zero exit, never a traceback
(set CNNKIT_DEBUG=1 to see one)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import CnnkitError, TrainingInterrupted, os_error_message

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
    print(json.dumps(info, indent=2) if args.json else format_summary(info, title, formulas=args.formulas))
    return 0


def load_model_arg(model: str, input_shape: tuple[int, ...] | None, num_classes: int):
    """A model from a registry name, YAML spec, model file or run folder, for the given (C, H, W)."""
    from .models import build_model, get_spec
    from .models.registry import default_input

    if is_model_file(model):
        from .modelfile import load_model
        return load_model(model)[0]
    spec = get_spec(model)
    c, h, w = input_shape or default_input(spec) or (1, 28, 28)
    return build_model(spec, num_classes, in_channels=c, image_size=(h, w))


def cmd_evaluate(args) -> int:
    from . import evaluate as ev
    from .modelfile import load_model, resolve_model_path
    from .run import evaluate_and_report

    model, meta = load_model(args.model)
    split, names = ev.load_split_for(meta, args.data, args.split, args.data_dir)
    out = Path(args.out) if args.out else resolve_model_path(args.model).parent / f"evaluate-{args.split}"
    metrics, files = evaluate_and_report(model, meta, split, out, data_name=args.data, split_name=args.split, tta=args.tta)
    metrics["files"] = {k: str(v) for k, v in files.items()}
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    top5 = f", top-5 {metrics['top5_accuracy']:.4f}" if "top5_accuracy" in metrics else ""
    tta = f" ({metrics['tta_accuracy']:.4f} with TTA)" if args.tta else ""
    print(f"{args.split} split of {args.data}: {metrics['n']} images, accuracy {metrics['accuracy']:.4f}{tta}{top5}, "
          f"loss {metrics['loss']:.4f}, ECE {metrics['ece']:.4f} at temperature {metrics['temperature']:.3f} "
          f"({metrics['ece_uncalibrated']:.4f} before)")
    width = max(max(len(n) for n in names), len("weighted avg")) + 2
    print(f"{'class':<{width}} precision  recall      f1  support")
    for c in metrics["per_class"]:
        print(f"{c['class']:<{width}} {c['precision']:9.4f} {c['recall']:7.4f} {c['f1']:7.4f} {c['support']:8d}")
    for avg, v in metrics["averages"].items():
        print(f"{avg + ' avg':<{width}} {v['precision']:9.4f} {v['recall']:7.4f} {v['f1']:7.4f} {metrics['n']:8d}")
    if metrics["most_confused"]:
        print("most confused: " + ", ".join(f"{m['true']}→{m['predicted']} ({m['count']})" for m in metrics["most_confused"][:5]))
    print(f"report: {files['report']} (confusion matrix, misclassified gallery and reliability diagram in {out})")
    return 0


def cmd_explain(args) -> int:
    from .modelfile import load_model
    from .run import explain_to_folder

    model, meta = load_model(args.model)
    out = Path(args.out) if args.out else Path(f"explain-{Path(args.image).stem}")
    info = explain_to_folder(model, meta, args.image, out, class_name=args.class_name)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['image']}: " + ", ".join(f"{t['label']} {t['probability']:.3f}" for t in info["top"][:3]))
    print(f"first-layer kernels {'x'.join(map(str, info['kernels_shape']))}: {info['files']['kernels']}")
    for layer in info["feature_maps"]:
        print(f"feature maps of {layer['name']} ({'x'.join(map(str, layer['shape']))}): {layer['file']}")
    print(f"Grad-CAM on {info['gradcam_layer']['name']} for {', '.join(info['gradcam_classes'])}: {info['files']['gradcam']}")
    return 0


def cmd_predict(args) -> int:
    from .predict import predict_files
    from .utils import progress, write_csv, write_text_atomic

    if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:  # nan fails both comparisons
        raise CnnkitError("--min-confidence must be a probability between 0 and 1")
    if args.top_k < 1:
        raise CnnkitError("--top-k must be at least 1")
    if args.workers is not None and args.workers < 0:
        raise CnnkitError("--workers must be 0 or more (0 or 1: decode in this process)")
    bar = progress(None, "predict", unit="img")
    with bar:
        rows, info = predict_files(args.model, args.paths, top_k=args.top_k, min_confidence=args.min_confidence,
                                   tta=args.tta, runtime=args.runtime, workers=args.workers, on_progress=bar.update)
    if not rows:
        raise CnnkitError(f"no files found in {' '.join(args.paths)}")
    k = max((len(r.get("labels", [])) for r in rows), default=0)
    if args.out:
        out = Path(args.out)
        if out.suffix == ".json":
            write_text_atomic(out, json.dumps(rows, indent=2))
        else:
            header = ["path"] + [f"{kind}_{i + 1}" for i in range(k) for kind in ("label", "probability")] + ["error"]
            write_csv(out, header, [[r["path"], *[v for lab, p in zip(r.get("labels", []), r.get("probabilities", []))
                                                  for v in (lab, f"{p:.6f}")], *([""] * 2 * (k - len(r.get("labels", [])))),
                                     r.get("error", "")] for r in rows])
        # With --out the rows are in the file: the terminal gets one line (or the JSON summary).
        summary = {**info, "out": str(out), "images_per_second": info["files"] / max(info["seconds"], 1e-9)}
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"{info['classified']:,} of {info['files']:,} file(s) classified in {info['seconds']:.1f} s "
                  f"({summary['images_per_second']:,.0f} images/s, runtime {info['runtime']}: {info['why']}) -> {out}")
    elif args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            if "error" in r:
                print(f"{r['path']}: error: {r['error']}")
            else:
                print(f"{r['path']}: " + ", ".join(f"{lab} {p:.3f}" for lab, p in zip(r["labels"], r["probabilities"])))
    bad = info["errors"]
    if bad:
        print(f"{bad} of {len(rows)} file(s) could not be read", file=sys.stderr)
    # A batch job that could read none of its inputs has failed; with some read, the error rows say
    # which were not, and the job succeeded.
    return EXIT_ERROR if bad == len(rows) else 0


def cmd_export(args) -> int:
    from .run import export_with_proof

    result = export_with_proof(args.model, args.format, args.out, args.images)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {result['out']} ({result['bytes'] / 1e6:.1f} MB, {args.format}): uint8 images (N, H, W, C) in, "
              "calibrated probabilities out")
        print(f"parity on {result['checked_on']}: top-1 agreement {result['agreement']:.2%}, largest probability "
              f"difference {result['max_abs_diff']:.2e} (allowed {result['max_allowed_diff']:g}): "
              f"{'passed' if result['passed'] else 'FAILED'}")
    if not result["passed"]:
        raise CnnkitError(f"the export disagrees with PyTorch (agreement {result['agreement']:.2%}, difference "
                          f"{result['max_abs_diff']:.2e}); {result['out']} is kept for inspection, but do not deploy it")
    return 0


def cmd_serve(args) -> int:
    from .serve import Limits, serve

    if not 0 < args.port < 65536:
        raise CnnkitError("--port must be between 1 and 65535")
    limits = Limits(max_body_bytes=int(args.max_upload_mb * 2**20), max_images=args.max_images,
                    max_pixels=args.max_pixels, timeout_seconds=args.timeout, max_connections=args.max_connections)
    token = args.token if args.token is not None else os.environ.get("CNNKIT_SERVE_TOKEN") or None

    def ready(model) -> None:
        print(f"serving {model.path} ({model.info()['architecture']}, {len(model.meta['class_names'])} classes, "
              f"runtime {model.runtime.name}: {model.runtime_why}) on http://{args.host}:{args.port}/ "
              f"(API: /predict, /model, /health, /openapi.json){'; a token is required' if token else ''}; "
              "Ctrl-C stops", file=sys.stderr, flush=True)

    serve(args.model, host=args.host, port=args.port, runtime=args.runtime, max_batch=args.max_batch,
          window_ms=args.batch_window_ms, limits=limits, on_ready=ready, token=token)
    return 0


def cmd_label_issues(args) -> int:
    from .labelissues import label_issues

    if args.data_positional:
        args.data = args.data_positional
    cfg, _ = config_from_args(args)
    echo = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else None
    result, files = label_issues(cfg.validate(), folds=args.folds, retrain=args.retrain, out=cfg.out, echo=echo)
    summary = {k: v for k, v in result.items() if k not in ("ranking", "flagged_mask")}
    if args.json:
        print(json.dumps({**summary, "files": {k: str(v) for k, v in files.items()}}, indent=2))
        return 0
    print(f"{summary['flagged']:,} of {summary['train_images']:,} training labels of {summary['data']} are likely wrong "
          f"(out-of-fold accuracy {summary['out_of_fold_accuracy']:.2%}); ranked in {files['csv']}, "
          f"the first {min(summary['flagged'], 48)} drawn in {files['gallery']}")
    if "retrain" in summary:
        r = summary["retrain"]
        print(f"test accuracy: {r['test_accuracy_with_flagged']:.2%} trained on all, "
              f"{r['test_accuracy_without_flagged']:.2%} without the flagged images ({r['test_images']:,} images)")
    return 0


def cmd_audit(args) -> int:
    from .run import audit_to_folder

    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise CnnkitError("--threshold is a cosine similarity in (0, 1]")
    result, files = audit_to_folder(args.data, out=args.out, data_dir=args.data_dir, image_size=args.image_size,
                                    channels=args.channels, threshold=args.threshold)
    if args.json:
        print(json.dumps({**result, "files": {k: str(v) for k, v in files.items()}}, indent=2))
        return 0
    print(f"{result['data']}: {result['images']:,} images, {result['exact_pairs']:,} exact and {result['near_pairs']:,} "
          f"near duplicate pairs ({result['label_conflicts']:,} with different labels), "
          f"{len(result['unreadable'])} unreadable file(s)")
    for name, leak in result["leakage"].items():
        print(f"  {name}: {leak['images']:,} images ({leak['share']:.2%}) have a copy")
    print(f"report: {files['report']}")
    return 0


def cmd_compare(args) -> int:
    from .run import compare_runs

    result, files = compare_runs(args.run_a, args.run_b, out=args.out, data=args.data, data_dir=args.data_dir)
    if args.json:
        print(json.dumps({**result, "files": {k: str(v) for k, v in files.items()}}, indent=2))
        return 0
    print(result["verdict"])
    print(f"on {result['n']:,} test images: only A right {result['only_a_right']}, only B right "
          f"{result['only_b_right']}, both right {result['both_right']}, both wrong {result['both_wrong']}")
    print(f"report: {files['report']}")
    return 0


def cmd_math(args) -> int:
    from . import teach

    if args.topic == "conv":
        padding = teach.parse_padding(args.padding)
        if args.input is not None or args.kernel is not None:
            if args.input is None or args.kernel is None:
                raise CnnkitError("give both --input and --kernel values (or --n and --m for sizes only)")
            result = teach.conv_steps(teach.parse_matrix(args.input, "input"), teach.parse_matrix(args.kernel, "kernel"),
                                      padding, args.stride, args.mode)
            if args.picture:
                from .report import draw_conv_steps
                result["picture"] = str(draw_conv_steps(result, args.picture))
            text = teach.format_conv_steps(result) + (f"\npicture: {result['picture']}" if args.picture else "")
        else:
            if args.n is None or args.m is None:
                raise CnnkitError("give --n (input size) and --m (kernel size), or --input and --kernel values")
            result = teach.conv_output(args.n, args.m, padding, args.stride)
            text = teach.format_conv_output(result)
    elif args.topic == "pool":
        x = teach.parse_matrix(args.input, "input") if args.input else None
        result = teach.pool_steps(x, args.n, args.size, args.stride, args.kind)
        text = teach.format_pool(result)
    elif args.topic == "shapes":
        shape = tuple(int(v) for v in args.input.lower().split("x")) if args.input else None
        if shape is not None and (len(shape) not in (3, 4) or min(shape) < 1):
            raise CnnkitError(f"--input must be NxCxHxW or CxHxW, e.g. 4x1x28x28, not {args.input!r}")
        if shape is not None and len(shape) == 3:
            shape = (1, *shape)
        model = load_model_arg(args.model, shape[1:] if shape else None, args.num_classes)
        result = teach.shapes(model, shape or (1, *model.input_shape))
        text = teach.format_shapes(result)
    elif args.topic == "params":
        result = teach.param_comparison(parse_shape(args.input), args.filters, args.kernel,
                                        teach.parse_padding(args.padding), args.stride)
        text = teach.format_params(result)
    else:  # loss
        result = teach.loss_example(args.logits, args.target)
        text = teach.format_loss(result)
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else text)
    return 0


def cmd_models(args) -> int:
    from .models import list_models
    models = list_models()
    if args.json:
        print(json.dumps(models, indent=2))
    else:
        print(f"{'name':<18} {'input':<9} {'parameters':>12}  {'pretrained weights':<14}  description")
        for m in models:
            shape = "x".join(map(str, m["input"])) if m["input"] else "any"
            pretrained = {"installed": "installed", "no": "-"}.get(m["pretrained"], "file")
            print(f"{m['name']:<18} {shape:<9} {m['params']:>12,}  {pretrained:<14}  {m['description']}")
        print("parameters: PyTorch's count at the default input, 1000 classes for the classic networks, 10 for the "
              "specs; pretrained 'file': --pretrained PATH takes a state dict in torchvision's layout")
    return 0


def config_from_args(args):
    """The TrainConfig a command's flags describe: lowest to highest precedence, the recipe, the
    --config file, the flags typed (their defaults are SUPPRESSed, so only typed ones are here)."""
    import dataclasses

    from .config import TrainConfig, recipe_choice

    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    base = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    if args.recipe:
        data = given.get("data") or base.get("data") or TrainConfig().data
        path, why = recipe_choice(args.recipe, data)
        if why:  # chosen by looking at the folder: say what and why
            print(f"recipe fast for {data}: {why} ({path.name})", file=sys.stderr)
        base = {**TrainConfig.from_file(path).to_dict(), **base}
    return TrainConfig.from_dict({**base, **given}, source=f"config file {args.config}" if args.config else "the flags"), given


def cmd_train(args) -> int:
    from .run import train

    out = sys.stderr if args.json else sys.stdout  # with --json, stdout holds only the JSON
    echo = lambda msg: print(msg, file=out, flush=True)  # noqa: E731
    cfg, given = config_from_args(args)
    if args.resume:
        if given or args.config or args.recipe:
            flags = ", ".join("--" + k.replace("_", "-") for k in given) or ("--config" if args.config else "--recipe")
            raise CnnkitError(f"--resume continues a run with its own config.json; drop {flags}")
        result = train(resume=args.resume, quiet=args.quiet, echo=echo)
    else:
        result = train(cfg, quiet=args.quiet, echo=echo)
    if args.json and result.primary:  # in a torchrun job, rank 0 alone speaks
        print(json.dumps({"run_dir": str(result.run_dir), "metrics": result.metrics, "history": result.history,
                          "skipped": [list(s) for s in result.dataset.skipped]}, indent=2))
    return 0


def cmd_augment_preview(args) -> int:
    from .run import augment_preview

    cfg, _ = config_from_args(args)
    info = augment_preview(cfg.validate(), Path(args.picture), samples=args.samples, versions=args.versions)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{info['samples']} training images of {info['data']}, each beside {info['versions']} augmented "
              f"versions ({info['augmentation']}): {info['picture']}")
    return 0


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--config and --recipe, then one flag per TrainConfig field, its help text the field's
    comment: the config is the one place an option is defined. Defaults are SUPPRESSed, so
    config_from_args sees only the flags a user typed and a --config file keeps every value they do
    not override."""
    import dataclasses

    from .config import CHOICES, FIELD_TYPES, PER_DATASET_RECIPES, TrainConfig, field_help, recipe_names

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
            parser.add_argument(flag, type=kind, choices=choices, default=argparse.SUPPRESS,
                                metavar=None if choices else f.name.upper(), help=text)


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    p = argparse.ArgumentParser(prog="cnnkit", description="Train, evaluate and use CNN image classifiers.")
    p.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on a dataset and write a run folder",
                       description="Every option below is a TrainConfig field; --config FILE.yaml sets any of them "
                                   "and the flags typed override it. A run's own config.json re-runs it.")
    add_config_flags(t)
    t.add_argument("--resume", metavar="RUN", default=None, help="continue an interrupted run folder to its end")
    t.add_argument("--json", action="store_true", help="print the result as JSON on stdout (progress goes to stderr)")
    t.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("summary", help="layers, output shapes, parameter counts and multiply-adds of a model")
    s.add_argument("model", help="registered name, YAML spec, model file or run folder")
    s.add_argument("--input", default=None, help="input shape CxHxW, e.g. 1x28x28 (default: the spec's own)")
    s.add_argument("--num-classes", type=int, default=10)
    s.add_argument("--formulas", action="store_true", help="show the cheat-sheet formula behind every count")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_summary)

    mp = sub.add_parser("math", help="the lecture notes' math, step by step (conv, pool, shapes, params, loss)")
    topics = mp.add_subparsers(dest="topic", required=True)
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
    mp.set_defaults(func=cmd_math)

    ev = sub.add_parser("evaluate", help="accuracy, per-class metrics, confusion matrix, mistakes, calibration")
    ev.add_argument("model", help="model file or run folder")
    ev.add_argument("--data", required=True, help="the dataset the model was trained on (name or folder)")
    ev.add_argument("--split", choices=["test", "val", "train"], default="test")
    ev.add_argument("--data-dir", default=None)
    ev.add_argument("--out", default=None, help="output folder (default: RUN/evaluate-<split>)")
    ev.add_argument("--tta", action="store_true", help="test-time augmentation: average over flipped and shifted copies")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="classify image files and folders (recursively)")
    pr.add_argument("model", help="model file or run folder")
    pr.add_argument("paths", nargs="+", metavar="PATH")
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("--min-confidence", type=float, default=None, help="label top predictions below this 'unknown'")
    pr.add_argument("--out", default=None, help="FILE.csv or FILE.json")
    pr.add_argument("--tta", action="store_true", help="test-time augmentation (runs in PyTorch)")
    pr.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto",
                    help="auto: the runtime measured fastest for this model on this machine (measured once, on the "
                         "first job of 2,000+ files; smaller jobs use torch until then)")
    pr.add_argument("--workers", type=int, default=None, help="decoding processes (default: one per core)")
    pr.add_argument("--json", action="store_true", help="rows as JSON; with --out, a JSON summary")
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", help="export to ONNX or torch.export, with preprocessing inside, and prove parity",
                        description="The export takes uint8 images (N, H, W, C) and returns calibrated probabilities. "
                                    "After writing it, validation images run through PyTorch and the export; "
                                    "the command fails unless top-1 agreement is 100% and probabilities differ by "
                                    "at most 1e-4.")
    ex.add_argument("model", help="model file or run folder")
    ex.add_argument("--format", choices=["onnx", "torch-export"], default="onnx")
    ex.add_argument("--out", default=None, help="output file (default: beside the model, .onnx or .pt2)")
    ex.add_argument("--images", nargs="+", default=None, metavar="PATH",
                    help="image files or folders to check parity on (default: the model's validation split)")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser("serve", help="serve a model over HTTP: a JSON API and a page to drop or draw images on",
                        description="An ASGI app (FastAPI on uvicorn). POST /predict takes one image (multipart or "
                                    "raw body) or several (multipart); GET / is a page for people; GET /model, "
                                    "/health, /openapi.json. Concurrent requests are batched.")
    sv.add_argument("model", help="model file or run folder")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                        "0.0.0.0 exposes the server to the network)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto",
                    help="auto: the runtime measured fastest for this model on this machine")
    sv.add_argument("--max-batch", type=int, default=32, help="images per forward pass at most (1: no batching)")
    sv.add_argument("--batch-window-ms", type=float, default=0.0,
                    help="how long the first waiting image waits for others to join its batch, in milliseconds "
                         "(default 0: a batch is whatever arrived while the previous one ran)")
    sv.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body, in MiB (413 beyond)")
    sv.add_argument("--max-images", type=int, default=64, help="images per request at most")
    sv.add_argument("--max-pixels", type=int, default=40_000_000,
                    help="largest width x height an image may claim (413 beyond, checked before decoding)")
    sv.add_argument("--timeout", type=float, default=10.0,
                    help="seconds a request may take (504 beyond), and to send it (408 and closed beyond)")
    sv.add_argument("--max-connections", type=int, default=512, help="open connections at most (503 beyond)")
    sv.add_argument("--token", default=None,
                    help="require 'Authorization: Bearer TOKEN' on every route but /health (the page: /?token=TOKEN); "
                         "$CNNKIT_SERVE_TOKEN sets it without showing it in the process list")
    sv.set_defaults(func=cmd_serve)

    au = sub.add_parser("audit", help="duplicates within and across splits, leakage, class balance, sizes, unreadable files",
                        description="Exact duplicates (same pixels) and near duplicates (resized, re-encoded or "
                                    "slightly cropped copies: cosine similarity of 32x32 grey thumbnails at or above "
                                    "--threshold), leakage per pair of splits, class balance, file sizes and modes, "
                                    "unreadable files. Writes audit.json, duplicates.csv, duplicates.png, audit.html.")
    au.add_argument("data", help="mnist, fashion-mnist, cifar10, digits, or a folder")
    au.add_argument("--data-dir", default=None)
    au.add_argument("--image-size", type=int, default=None, help="decode folders at this size (default 64)")
    au.add_argument("--channels", type=int, choices=[1, 3], default=None)
    au.add_argument("--threshold", type=float, default=None, help="near-duplicate similarity (default 0.995)")
    au.add_argument("--out", default=None, help="output folder (default: audit-<data>)")
    au.add_argument("--json", action="store_true")
    au.set_defaults(func=cmd_audit)

    cp = sub.add_parser("compare", help="two runs on the same test images: accuracy difference, McNemar's test, curves",
                        description="Evaluates both models on the same test images and reports the accuracy "
                                    "difference with a 95%% interval, McNemar's exact test (p-value, and the images "
                                    "only A or only B gets right), recall per class and both runs' curves "
                                    "(compare.json, compare.html).")
    cp.add_argument("run_a", metavar="RUN_A", help="model file or run folder")
    cp.add_argument("run_b", metavar="RUN_B", help="model file or run folder")
    cp.add_argument("--data", default=None, help="the dataset (default: the one RUN_A was trained on)")
    cp.add_argument("--data-dir", default=None)
    cp.add_argument("--out", default=None, help="output folder (default: compare-<A>-<B>)")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(func=cmd_compare)

    li = sub.add_parser("label-issues", help="rank training images whose labels are probably wrong (k-fold + cleanlab)",
                        description="Trains --folds models with the chosen recipe, each on all folds but one, and "
                                    "ranks every training image by the probability its held-out model gives its "
                                    "label (cleanlab's confident learning flags the likely errors). Writes "
                                    "label_issues.csv, label_issues.png and label_issues.json. Takes every "
                                    "`cnnkit train` option (--model, --recipe, --epochs, ...).")
    li.add_argument("data_positional", metavar="DATA", nargs="?", default=None,
                    help="the dataset (name or folder); the same as --data")
    li.add_argument("--folds", type=int, default=3, help="cross-validation folds (each trains one model)")
    li.add_argument("--retrain", action="store_true",
                    help="also train on all images and without the flagged ones, and report both test accuracies")
    li.add_argument("--json", action="store_true")
    li.add_argument("--quiet", action="store_true", help="no progress lines")
    add_config_flags(li)
    li.set_defaults(func=cmd_label_issues)

    xp = sub.add_parser("explain", help="first-layer kernels, feature maps and a Grad-CAM heatmap for one image")
    xp.add_argument("model", help="model file or run folder")
    xp.add_argument("image", help="an image file")
    xp.add_argument("--out", default=None, help="output folder (default: explain-<image name>)")
    xp.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                    help="also draw the heatmap for this class (default: the predicted class only)")
    xp.add_argument("--json", action="store_true")
    xp.set_defaults(func=cmd_explain)

    ap = sub.add_parser("augment-preview", help="a picture of training images beside their augmented versions",
                        description="Takes every `cnnkit train` option (so --augment, --aug-*, --augment-class, "
                                    "--recipe and --config work as in training) and draws what the network would see.")
    ap.add_argument("--picture", metavar="FILE.png", default="augment-preview.png", help="where to write the picture")
    ap.add_argument("--samples", type=int, default=8, help="training images shown (rows)")
    ap.add_argument("--versions", type=int, default=6, help="augmented versions of each (columns after the original)")
    ap.add_argument("--json", action="store_true")
    add_config_flags(ap)
    ap.set_defaults(func=cmd_augment_preview)

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
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except OSError as e:  # a full disk, a read-only or missing folder: the user's to fix, in one line
        msg = os_error_message(e)
        if msg is None or os.environ.get("CNNKIT_DEBUG"):
            return internal_error(e)
        if e.filename and in_cache(e.filename):
            msg += " (it is cnnkit's cache: set CNNKIT_DATA to a folder on a writable disk)"
        print(f"cnnkit: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # a bug of ours: still one line, with the way to the full traceback
        return internal_error(e)


def in_cache(path) -> bool:
    from .utils import cache_dir
    try:
        return Path(os.path.abspath(path)).is_relative_to(Path(os.path.abspath(cache_dir())))
    except (TypeError, ValueError):
        return False


def internal_error(e: Exception) -> int:
    if os.environ.get("CNNKIT_DEBUG"):
        raise e
    msg = str(e).splitlines()[0] if str(e) else ""
    print(f"cnnkit: internal error: {type(e).__name__}: {msg} (set CNNKIT_DEBUG=1 for the traceback, "
          "and please report it)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
