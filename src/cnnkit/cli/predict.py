"""cnnkit predict: classify image files and folders; one row per file, bad files reported and skipped."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import CnnkitError
from .common import EXIT_ERROR, RUNTIMES


def add(sub) -> None:
    p = sub.add_parser("predict", help="classify image files and folders (recursively)")
    p.add_argument("model", help="model file or run folder")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--min-confidence", type=float, default=None, help="label top predictions below this 'unknown'")
    p.add_argument("--out", default=None, help="FILE.csv or FILE.json")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (runs in PyTorch)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                    help="auto: the runtime measured fastest for this model on this machine (measured once, on the "
                         "first job of 2,000+ files; smaller jobs use torch until then); int8 and openvino-int8 run "
                         "the model's int8 export, allowed where it lost at most 1 point of test accuracy; openvino "
                         "needs pip install 'cnnkit[openvino]'")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: one per core)")
    p.add_argument("--coverage", type=float, default=None, metavar="C",
                   help="also give each image its prediction set: the classes that hold the true one with "
                        "probability C (e.g. 0.95; conformal, calibrated on the validation split)")
    p.add_argument("--json", action="store_true", help="rows as JSON; with --out, a JSON summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.predict import predict_files
    from ..utils import progress, write_csv, write_text_atomic

    if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:  # nan fails both comparisons
        raise CnnkitError("--min-confidence must be a probability between 0 and 1")
    if args.top_k < 1:
        raise CnnkitError("--top-k must be at least 1")
    if args.workers is not None and args.workers < 0:
        raise CnnkitError("--workers must be 0 or more (0 or 1: decode in this process)")
    bar = progress(None, "predict", unit="img")
    with bar:
        rows, info = predict_files(args.model, args.paths, top_k=args.top_k, min_confidence=args.min_confidence,
                                   tta=args.tta, runtime=args.runtime, workers=args.workers, on_progress=bar.update,
                                   coverage=args.coverage)
    if not rows:
        raise CnnkitError(f"no files found in {' '.join(args.paths)}")
    if info.get("conformal", {}).get("source", "").startswith("conformal calibration computed"):
        print(f"note: {info['conformal']['source']}", file=sys.stderr)  # an older model file: say where sets came from
    k = max((len(r.get("labels", [])) for r in rows), default=0)
    if args.out:
        out = Path(args.out)
        if out.suffix == ".json":
            write_text_atomic(out, json.dumps(rows, indent=2))
        elif any("label_probabilities" in r for r in rows):  # multi-label: the label set, each label's probability
            names = next(list(r["label_probabilities"]) for r in rows if "label_probabilities" in r)
            write_csv(out, ["path", "labels", *[f"p_{n}" for n in names], "error"],
                      [[r["path"], ";".join(r.get("labels", [])),
                        *[f"{r['label_probabilities'][n]:.6f}" if "label_probabilities" in r else "" for n in names],
                        r.get("error", "")] for r in rows])
        else:
            write_single_label_csv(out, rows, k, sets="conformal" in info)
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
                found = ", ".join(f"{lab} {p:.3f}" for lab, p in zip(r["labels"], r["probabilities"]))
                at = f"; set at {args.coverage:g}: {', '.join(r['set'])}" if "set" in r else ""
                print(f"{r['path']}: " + (found or "no label reaches its threshold") + at)
    bad = info["errors"]
    if bad:
        print(f"{bad} of {len(rows)} file(s) could not be read", file=sys.stderr)
    # A batch job that could read none of its inputs has failed; with some read, the error rows say
    # which were not, and the job succeeded.
    return EXIT_ERROR if bad == len(rows) else 0


def write_single_label_csv(out: Path, rows: list[dict], k: int, sets: bool) -> None:
    """label_1, probability_1, ... label_k, probability_k per file; with --coverage, `set`: the
    prediction set's class names joined by ';', most probable first."""
    from ..utils import write_csv
    header = ["path"] + [f"{kind}_{i + 1}" for i in range(k) for kind in ("label", "probability")]
    write_csv(out, [*header, *(["set"] if sets else []), "error"],
              [[r["path"], *[v for lab, p in zip(r.get("labels", []), r.get("probabilities", []))
                             for v in (lab, f"{p:.6f}")],
                *([""] * 2 * (k - len(r.get("labels", [])))), *([";".join(r.get("set", []))] if sets else []),
                r.get("error", "")] for r in rows])
