"""cnnkit augment-preview: training images beside their augmented versions."""
from __future__ import annotations

import json
from pathlib import Path

from .common import add_config_flags, config_from_args


def add(sub) -> None:
    p = sub.add_parser("augment-preview", help="a picture of training images beside their augmented versions",
                        description="Takes every `cnnkit train` option (so --augment, --aug-*, --augment-class, "
                                    "--recipe and --config work as in training) and draws what the network would see.")
    p.add_argument("--picture", metavar="FILE.png", default="augment-preview.png", help="where to write the picture")
    p.add_argument("--samples", type=int, default=8, help="training images shown (rows)")
    p.add_argument("--versions", type=int, default=6, help="augmented versions of each (columns after the original)")
    p.add_argument("--json", action="store_true")
    add_config_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.augment_preview import augment_preview

    cfg, _ = config_from_args(args)
    info = augment_preview(cfg.validate(), Path(args.picture), samples=args.samples, versions=args.versions)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{info['samples']} training images of {info['data']}, each beside {info['versions']} augmented "
              f"versions ({info['augmentation']}): {info['picture']}")
    return 0
