"""cnnkit evaluate: accuracy, per-class metrics, confusion matrix, mistakes and calibration of a model file."""
from __future__ import annotations

import json


def add(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy, per-class metrics, confusion matrix, mistakes, calibration")
    p.add_argument("model", help="model file or run folder")
    p.add_argument("--data", required=True, help="the dataset the model was trained on (name, folder or label file)")
    p.add_argument("--split", choices=["test", "val", "train"], default="test")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="output folder (default: RUN/evaluate-<split>)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average over flipped and shifted copies")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.evaluate import evaluate_model

    metrics, files, names = evaluate_model(args.model, args.data, args.split, args.data_dir, args.out, args.tta)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    if metrics.get("task") == "multi-label":
        return print_multi_label(args, metrics, files, names)
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
    if "binary" in metrics:  # one logit: the decision is the threshold's
        b = metrics["binary"]

        def area(v):
            return "n/a" if v is None else f"{v:.4f}"
        print(f"binary, {names[1]} positive: threshold {b['threshold']:.3f} (accuracy {b['accuracy_at_half']:.4f} at "
              f"0.5), ROC AUC {area(b['roc_auc'])}, average precision {area(b['average_precision'])}")
    if "conformal" in metrics:  # prediction sets at 0.90 / 0.95 / 0.99, calibrated on validation
        c = metrics["conformal"]
        levels = [f"{r['coverage']:g}: " + (r["note"] if "note" in r else
                                            f"held the true class {r['empirical_coverage']:.4f}, "
                                            f"{r['mean_set_size']:.2f} classes on average") for r in c["levels"]]
        print(f"prediction sets ({c['score']}, calibrated on {c['calibration_images']:,} validation images): "
              + "; ".join(levels))
    if metrics["most_confused"]:
        print("most confused: " + ", ".join(f"{m['true']}→{m['predicted']} ({m['count']})"
                                            for m in metrics["most_confused"][:5]))
    print(f"report: {files['report']} (confusion matrix, misclassified gallery and reliability diagram in "
          f"{files['report'].parent})")
    return 0


def print_multi_label(args, metrics: dict, files: dict, names: list[str]) -> int:
    print(f"{args.split} split of {args.data}: {metrics['n']} images, mAP {metrics['mean_average_precision']:.4f}, "
          f"subset accuracy {metrics['subset_accuracy']:.4f}, Hamming loss {metrics['hamming_loss']:.4f}, "
          f"macro F1 {metrics['macro']['f1']:.4f} at the model's thresholds ({metrics['at_half']['macro_f1']:.4f} "
          f"at 0.5), micro F1 {metrics['micro']['f1']:.4f}")
    width = max(max(len(n) for n in names), len("label")) + 2
    print(f"{'label':<{width}} threshold precision  recall      f1      AP  support")
    for row in metrics["per_label"]:
        ap = f"{row['average_precision']:7.4f}" if row["average_precision"] is not None else "      -"
        print(f"{row['label']:<{width}} {row['threshold']:9.3f} {row['precision']:9.4f} {row['recall']:7.4f} "
              f"{row['f1']:7.4f} {ap} {row['support']:8d}")
    print(f"metrics: {files['metrics']}; report: {files['report']} (PR curves, co-occurrence and the worst images "
          f"per label in {files['report'].parent})")
    return 0

