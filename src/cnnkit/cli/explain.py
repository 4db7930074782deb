"""cnnkit explain: first-layer kernels, feature maps and Grad-CAM for one image."""
from __future__ import annotations

import json


def add(sub) -> None:
    p = sub.add_parser("explain", help="first-layer kernels, feature maps and a Grad-CAM heatmap for one image")
    p.add_argument("model", help="model file or run folder")
    p.add_argument("image", help="an image file")
    p.add_argument("--out", default=None, help="output folder (default: explain-<image name>)")
    p.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                    help="also draw the heatmap for this class (default: the predicted class only); for a "
                         "multi-label model, this label's instead of each label present")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.explain import explain

    info = explain(args.model, args.image, args.out, class_name=args.class_name)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if info["task"] == "multi-label":
        present = ", ".join(f"{n} {p:.3f}" for n, p in zip(info["labels"], info["probabilities"]))
        print(f"{info['image']}: labels present: {present or 'none at their thresholds'}")
    else:
        print(f"{info['image']}: " + ", ".join(f"{t['label']} {t['probability']:.3f}" for t in info["top"][:3]))
    print(f"first-layer kernels {'x'.join(map(str, info['kernels_shape']))}: {info['files']['kernels']}")
    for layer in info["feature_maps"]:
        print(f"feature maps of {layer['name']} ({'x'.join(map(str, layer['shape']))}): {layer['file']}")
    print(f"Grad-CAM on {info['gradcam_layer']['name']} for {', '.join(info['gradcam_classes'])}: "
          f"{info['files']['gradcam']}")
    return 0
