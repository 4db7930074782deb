"""cnnkit lr-find: the learning-rate sweep (jobs/lr_find.py) and its suggested lr."""
from __future__ import annotations

from pathlib import Path

from .common import add_config_flags, config_from_args, print_json


# training.lr_find's START_LR, END_LR and STEPS (fastai's), written out: importing it would load torch for every
# command's --help (tests/test_lr_find.py checks they agree)
START_LR, END_LR, STEPS = 1e-7, 10.0, 100


def add(sub) -> None:
    p = sub.add_parser("lr-find", help="sweep the learning rate and suggest one (Smith 2015, fastai's lr_find)",
                       description="Trains the run that the `cnnkit train` options below describe for --steps steps, "
                                   "the learning rate rising exponentially from --start-lr to --end-lr, records the "
                                   "smoothed loss, restores the weights, and suggests an lr (the lowest loss's "
                                   "lr / 3; fastai's valley and steep beside it). --recipe and --config apply as in "
                                   "training; their lr is replaced by the sweep's. `cnnkit train --lr auto` runs "
                                   "the same sweep first.")
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps of the sweep (fastai: 100)")
    p.add_argument("--start-lr", type=float, default=START_LR, help="the first step's learning rate")
    p.add_argument("--end-lr", type=float, default=END_LR,
                   help="the last step's learning rate (the sweep stops sooner once the loss diverges)")
    p.add_argument("--picture", metavar="FILE.png", default="lr-find.png", help="where to draw the loss against the lr")
    p.add_argument("--json", action="store_true", help="print the suggestion and the curve as JSON")
    p.add_argument("--quiet", action="store_true", help="no download progress")
    add_config_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.lr_find import lr_find

    cfg, _ = config_from_args(args)
    result = lr_find(cfg.validate(), Path(args.picture), steps=args.steps, start_lr=args.start_lr,
                     end_lr=args.end_lr, quiet=args.quiet or args.json)
    if args.json:
        print_json({k: v for k, v in result.items() if k != "text_plot"})
        return 0
    r = result
    print(f"lr-find on {r['data']} with {r['model']} ({r['optimizer']}, batch {r['batch_size']}): "
          f"{r['steps_run']} of {r['steps']} steps in {r['seconds']:.1f} s (stopped: {r['stopped']})")
    print(result["text_plot"])
    print(f"suggested lr {result['suggestion']:.3g} ({result['method']}: the lowest loss's lr / 3; fastai's valley "
          f"{result['valley']:.3g} and steep {result['steep']:.3g}); picture {result['picture']}")
    print(f"train at it with the same options and --lr {result['suggestion']:.3g}, or --lr auto")
    return 0
