"""cnnkit embed: the penultimate features of image files and folders, L2-normalised, as an .npy file."""
from __future__ import annotations

import sys

from ..errors import CnnkitError
from .common import print_json


def add(sub) -> None:
    p = sub.add_parser("embed", help="penultimate features of image files and folders, L2-normalised, as .npy")
    p.add_argument("model", help="model file or run folder, or efficientnet_lite0 (the pretrained ImageNet network)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (searched recursively)")
    p.add_argument("--out", required=True, metavar="FILE.npy",
                   help="the features (N, D) float32; the row order goes beside it in FILE.json")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: one per core)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if present")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.embed import embed_files
    from ..utils import progress

    if args.workers is not None and args.workers < 0:
        raise CnnkitError("--workers must be 0 or more (0 or 1: decode in this process)")
    with progress(None, "embed", unit="img", disable=args.quiet) as bar:
        summary = embed_files(args.model, args.paths, args.out, workers=args.workers, device=args.device,
                              on_progress=bar.update)
    for path, reason in summary["skipped"]:
        print(f"{path}: skipped: {reason}", file=sys.stderr)
    if args.json:
        print_json(summary)
    else:
        print(f"{summary['embedded']:,} of {summary['files']:,} file(s) embedded by {summary['network']} "
              f"({summary['dim']} features a file, L2-normalised) in {summary['seconds']:.1f} s -> {summary['out']}; "
              f"row order in {summary['paths_file']}")
    return 0
