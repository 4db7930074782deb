"""cnnkit label-issues: rank training images whose labels are probably wrong."""
from __future__ import annotations

import sys

from .common import print_json, add_config_flags, config_from_args


def add(sub) -> None:
    p = sub.add_parser("label-issues", help="rank training images whose labels are probably wrong (k-fold + cleanlab)",
                        description="Trains --folds models with the chosen recipe, each on all folds but one, and "
                                    "ranks every training image by the probability its held-out model gives its "
                                    "label (cleanlab's confident learning flags the likely errors). Writes "
                                    "label_issues.csv, label_issues.png and label_issues.json. Takes every "
                                    "`cnnkit train` option (--model, --recipe, --epochs, ...).")
    p.add_argument("data_positional", metavar="DATA", nargs="?", default=None,
                    help="the dataset (name or folder); the same as --data")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds (each trains one model)")
    p.add_argument("--retrain", action="store_true",
                    help="also train on all images and without the flagged ones, and report both test accuracies")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_config_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.label_issues import label_issues

    if args.data_positional:
        args.data = args.data_positional
    cfg, _ = config_from_args(args)
    echo = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else None
    result, files = label_issues(cfg.validate(), folds=args.folds, retrain=args.retrain, out=cfg.out, echo=echo)
    summary = {k: v for k, v in result.items() if k not in ("ranking", "flagged_mask", "probabilities")}
    if args.json:
        print_json(summary, files)
        return 0
    what = "training labels" if summary["task"] != "multi-label" else "training images' label sets"
    print(f"{summary['flagged']:,} of {summary['train_images']:,} {what} of {summary['data']} are likely "
          f"wrong (out-of-fold {'subset ' if summary['task'] == 'multi-label' else ''}accuracy "
          f"{summary['out_of_fold_accuracy']:.2%}); ranked in {files['csv']}, "
          f"the first {min(summary['flagged'], 48)} drawn in {files['gallery']}")
    if summary["task"] == "multi-label":
        print(f"per label: {summary['likely_extra']:,} given labels likely extra, {summary['likely_missing']:,} "
              "likely missing (the likely_extra and likely_missing columns)")
    if "retrain" in summary:
        r = summary["retrain"]
        figure = "mean_average_precision" if summary["task"] == "multi-label" else "accuracy"
        name = "mAP" if summary["task"] == "multi-label" else "accuracy"
        print(f"test {name}: {r[f'test_{figure}_with_flagged']:.2%} trained on all, "
              f"{r[f'test_{figure}_without_flagged']:.2%} without the flagged images ({r['test_images']:,} images)")
    return 0
