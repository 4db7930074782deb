"""cnnkit tune: a hyperparameter search on Optuna (jobs/tune.py), each trial a train run."""
from __future__ import annotations

import sys

from .common import add_config_flags, config_from_args, print_json

# jobs.tune.TuneConfig's defaults and PRUNERS, written out: importing it would load torch for every command's
# --help (tests/test_tune.py checks they agree)
TRIALS, PRUNERS, HEARTBEAT = 20, ("median", "halving", "none"), 30


def add(sub) -> None:
    p = sub.add_parser("tune", help="search hyperparameters (Optuna's TPE, pruning after each epoch)",
                       description="Trains --trials runs of the config that the `cnnkit train` options below "
                                   "describe, each with values drawn from --space (a YAML file: lr: {log_uniform: "
                                   "[1e-4, 1e-1]}, batch_size: {choice: [64, 128]}, ...), into OUT/trial-NNNN; "
                                   "stops poor trials early; writes OUT/best.yaml (cnnkit train --config runs it), "
                                   "OUT/tune.html and OUT/trials.csv. The study lives in OUT/study.db (run the same "
                                   "command again to continue it) or in --storage, which several workers share.")
    p.add_argument("--space", metavar="SPACE.yaml", required=True, help="the search space (docs/tune.md)")
    p.add_argument("--trials", type=int, default=TRIALS,
                   help="finished trials (complete or pruned) the study should hold, counted over every worker")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="start no new trial after this many seconds (this worker)")
    p.add_argument("--storage", metavar="URL", default=None,
                   help="the study's database: sqlite:///FILE.db or postgresql://USER@HOST/DB (default: OUT/study.db)")
    p.add_argument("--study-name", metavar="NAME", default=None, help="the study's name there (default: OUT's name)")
    p.add_argument("--pruner", choices=PRUNERS, default="median",
                   help="median: stop a trial below the median of the earlier trials at the same epoch; halving: "
                        "successive halving; none")
    p.add_argument("--heartbeat", type=int, default=HEARTBEAT, metavar="SECONDS",
                   help="seconds between a worker's heartbeats; a trial silent for two is failed and run again")
    p.add_argument("--sampler-seed", type=int, default=None, help="seed TPE's proposals (default: fresh)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (progress on stderr)")
    p.add_argument("--quiet", action="store_true", help="no line per trial")
    add_config_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..jobs.tune import TuneConfig, tune

    cfg, _ = config_from_args(args)
    out = sys.stderr if args.json else sys.stdout
    echo = None if args.quiet else (lambda msg: print(msg, file=out, flush=True))
    tc = TuneConfig(space=args.space, trials=args.trials, timeout=args.timeout, out=cfg.out, storage=args.storage,
                    study_name=args.study_name, pruner=args.pruner, heartbeat=args.heartbeat,
                    sampler_seed=args.sampler_seed)
    result, files = tune(cfg, tc, quiet=args.quiet, echo=echo)
    if args.json:
        print_json(result, files)
        return 0
    s, best = result["states"], result["best"]
    print(f"study {result['study']}: {s.get('complete', 0)} complete, {s.get('pruned', 0)} pruned, "
          f"{s.get('fail', 0)} failed")
    if best:
        tuned = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in best["params"].items())
        print(f"best: trial {best['trial']} ({tuned}), val acc {best['val_accuracy']:.4f}, in {best['run_dir']}")
        print(f"train it again: cnnkit train --config {files['best_yaml']}")
    print(f"trials: {files['tune_html']} and {files['trials_csv']}")
    return 0
