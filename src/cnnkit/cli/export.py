"""cnnkit export: ONNX or torch.export with preprocessing inside, and the parity proof."""
from __future__ import annotations

import json

from ..errors import CnnkitError


def add(sub) -> None:
    p = sub.add_parser("export", help="export to ONNX or torch.export, with preprocessing inside, and prove parity",
                        description="The export takes uint8 images (N, H, W, C) and returns calibrated probabilities; "
                                    "a multi-label model's returns one sigmoid per label and its decisions (labels, "
                                    "bool: probabilities >= the model file's thresholds); a binary model's returns "
                                    "(1 - p, p) and the class its threshold decides (labels, bool, N x 2). After "
                                    "writing it, validation images run through PyTorch and the export; the command "
                                    "fails unless agreement (top-1, the whole label set, or the decided class) is "
                                    "100% and probabilities differ by at most 1e-4.")
    p.add_argument("model", help="model file or run folder")
    p.add_argument("--format", choices=["onnx", "torch-export"], default="onnx")
    p.add_argument("--out", default=None, help="output file (default: beside the model, .onnx or .pt2)")
    p.add_argument("--images", nargs="+", default=None, metavar="PATH",
                    help="image files or folders to check parity on (default: the model's validation split)")
    q = p.add_argument_group("int8 (ONNX only)", "static post-training quantization with ONNX Runtime's tools; both "
                             "files then run on the test split, and the export is refused (no file kept) when accuracy "
                             "drops by more than --max-accuracy-drop points")
    q.add_argument("--int8", action="store_true",
                   help="write an int8 ONNX file (default name: beside the model, .int8.onnx) instead of fp32")
    q.add_argument("--max-accuracy-drop", type=float, default=None, metavar="POINTS",
                   help="the most test accuracy (percentage points) int8 may lose before the export is refused "
                        "(default 1)")
    q.add_argument("--calibration-images", type=int, default=None, metavar="N",
                   help="training images (picked with the run's seed) whose activations set the int8 ranges "
                        "(default 256)")
    q.add_argument("--keep-float", nargs="+", choices=["first", "last", "none"], default=None, metavar="LAYER",
                   help="the quantizable layers left in fp32: first (the stem conv), last (the classifier), or none "
                        "(default: none, and first too where quantizing everything loses over 0.5 points)")
    p.add_argument("--json", action="store_true", help="print the result (and the int8 proof) as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.export import export_with_proof

    keep = None if args.keep_float is None else tuple(k for k in args.keep_float if k != "none")
    given = {"max_drop": args.max_accuracy_drop, "calibration_images": args.calibration_images, "keep_float": keep}
    given = {k: v for k, v in given.items() if v is not None}  # quantize.py's defaults for the rest
    if given and not args.int8:
        raise CnnkitError("--max-accuracy-drop, --calibration-images and --keep-float go with --int8")
    int8 = given if args.int8 else None
    result = export_with_proof(args.model, args.format, args.out, args.images, int8)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.int8:
        print_int8(result)
        return 0
    else:
        outputs = {"multi-label": "label probabilities and labels (at the model file's thresholds) out",
                   "binary": "calibrated probabilities and the decided class (at the model file's threshold) out"}
        print(f"wrote {result['out']} ({result['bytes'] / 1e6:.1f} MB, {args.format}): uint8 images (N, H, W, C) in, "
              + outputs.get(result["task"], "calibrated probabilities out"))
        print(f"parity on {result['checked_on']}: {result['agreement_on']} agreement {result['agreement']:.2%}, "
              f"largest probability difference {result['max_abs_diff']:.2e} (allowed {result['max_allowed_diff']:g}): "
              f"{'passed' if result['passed'] else 'FAILED'}")
        if result.get("edge_decisions"):
            print(f"  {result['edge_decisions']} label decision(s) differ on a threshold's edge (probability within "
                  f"{result['max_allowed_diff']:g} of it): counted as agreeing")
    if not result["passed"]:
        raise CnnkitError(f"the export disagrees with PyTorch (agreement {result['agreement']:.2%}, difference "
                          f"{result['max_abs_diff']:.2e}); {result['out']} is kept for inspection, "
                          "but do not deploy it")
    return 0


def print_int8(result: dict) -> None:
    proof, parity = result["proof"], result["fp32_parity"]
    print(f"wrote {result['out']} ({result['bytes'] / 1e6:.2f} MB, int8 ONNX; fp32 "
          f"{result['fp32_bytes'] / 1e6:.2f} MB): "
          f"{result['int8']['layers_quantized']} layers quantized, ranges from "
          f"{result['int8']['calibration']['images']} training images")
    print(f"fp32 export parity with PyTorch on {result['checked_on']}: {parity['agreement']:.2%} agreement, "
          f"largest difference {parity['max_abs_diff']:.2e}")
    print(f"int8 against fp32 on {proof['n']:,} {proof['split']} images of {proof['data']}: {proof['measure']} "
          f"{100 * proof['accuracy_fp32']:.2f}% -> {100 * proof['accuracy_int8']:.2f}% "
          f"({0.0 - proof['drop_points']:+.2f} points, allowed -{proof['max_drop_points']:g}); same answer on "
          f"{proof['agreement']:.2%}; only int8 right on {proof['only_int8_right']}, only fp32 on "
          f"{proof['only_fp32_right']} (McNemar p = {proof['mcnemar_p_value']:.2g}): passed")
