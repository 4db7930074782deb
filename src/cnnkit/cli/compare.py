"""cnnkit compare: two runs on the same test images."""
from __future__ import annotations
from .common import print_json


def add(sub) -> None:
    p = sub.add_parser("compare", help="two runs on the same test images: accuracy difference, McNemar's test, curves",
                        description="Evaluates both models on the same test images and reports the accuracy "
                                    "difference with a 95% interval, McNemar's exact test (p-value, and the images "
                                    "only A or only B gets right), recall per class and both runs' curves "
                                    "(compare.json, compare.html). Binary models: each decided at its own "
                                    "threshold. Multi-label models: right means the exact label set at each "
                                    "model's thresholds (subset accuracy), with F1 per label and each "
                                    "model's mAP. Both models must be of the same task (a binary one may face "
                                    "a two-class single-label one).")
    p.add_argument("run_a", metavar="RUN_A", help="model file or run folder")
    p.add_argument("run_b", metavar="RUN_B", help="model file or run folder")
    p.add_argument("--data", default=None, help="the dataset (default: the one RUN_A was trained on)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="output folder (default: compare-<A>-<B>)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.compare import compare_runs

    result, files = compare_runs(args.run_a, args.run_b, out=args.out, data=args.data, data_dir=args.data_dir)
    if args.json:
        print_json(result, files)
        return 0
    print(result["verdict"])
    what = "label sets" if result["task"] == "multi-label" else ""
    print(f"on {result['n']:,} test images{f' ({what} right)' if what else ''}: only A right "
          f"{result['only_a_right']}, only B right {result['only_b_right']}, both right {result['both_right']}, "
          f"both wrong {result['both_wrong']}")
    if result["task"] == "multi-label":
        maps = (result[f"mean_average_precision_{k}"] for k in "ab")
        print("mAP: " + ", ".join(f"{k} {'-' if m is None else f'{m:.4f}'}" for k, m in zip("AB", maps)))
    print(f"report: {files['report']}")
    return 0
