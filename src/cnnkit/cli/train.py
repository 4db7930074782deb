"""cnnkit train: a model on a dataset, written as a run folder (jobs/train.py)."""
from __future__ import annotations

import json
import sys

from ..errors import CnnkitError
from .common import add_config_flags, config_from_args


def add(sub) -> None:
    p = sub.add_parser("train", help="train a model on a dataset and write a run folder",
                       description="Every option below is a TrainConfig field; --config FILE.yaml sets any of them "
                                   "and the flags typed override it. A run's own config.json re-runs it.")
    add_config_flags(p)
    p.add_argument("--resume", metavar="RUN", default=None, help="continue an interrupted run folder to its end")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (progress goes to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.add_argument("--dry-run", action="store_true",
                   help="one batch through the whole pipeline (data, model, a step, validation, calibration, test, "
                        "model file, report) in a temporary folder: checks a config in seconds, writes nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.train import dry_run, train

    out = sys.stderr if args.json else sys.stdout  # with --json, stdout holds only the JSON
    echo = lambda msg: print(msg, file=out, flush=True)  # noqa: E731
    cfg, given = config_from_args(args)
    if args.dry_run:
        if args.resume:
            raise CnnkitError("--dry-run checks a new run's config; a resumed run has already passed it")
        result = dry_run(cfg, quiet=args.quiet, echo=echo)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            losses = ", ".join(f"{v:.4f}" for v in result["train_loss"])
            sizes = " / ".join(f"{n} {split}" for split, n in result["images"].items())
            print(f"dry run of {result['model']} on {result['data']} ({sizes} images, {result['steps']} "
                  f"step(s), loss {losses}, precision {result['precision']}) in {result['seconds']:.1f} s: the config "
                  f"works; a run would write {', '.join(result['would_write'])}. Nothing was written.")
        return 0
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
