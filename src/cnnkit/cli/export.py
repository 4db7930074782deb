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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.export import export_with_proof

    result = export_with_proof(args.model, args.format, args.out, args.images)
    if args.json:
        print(json.dumps(result, indent=2))
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
