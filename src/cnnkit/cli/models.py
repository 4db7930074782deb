"""cnnkit models: the registered models, their inputs, parameter counts and weights."""
from __future__ import annotations

import json


def add(sub) -> None:
    p = sub.add_parser("models", help="list the registered models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..models import list_models
    models = list_models()
    if args.json:
        print(json.dumps(models, indent=2))
    else:
        print(f"{'name':<18} {'input':<9} {'parameters':>12}  {'pretrained weights':<14}  description")
        for m in models:
            shape = "x".join(map(str, m["input"])) if m["input"] else "any"
            pretrained = {"installed": "installed", "no": "-"}.get(m["pretrained"], "file")
            print(f"{m['name']:<18} {shape:<9} {m['params']:>12,}  {pretrained:<14}  {m['description']}")
        print("parameters: PyTorch's count at the default input, 1000 classes for the classic networks, 10 for the "
              "specs; pretrained 'file': --pretrained PATH takes a state dict in torchvision's layout")
    return 0
