"""`cnnkit tune`: a hyperparameter search on Optuna. Each trial is a `cnnkit train` run (a normal run folder,
OUT/trial-NNNN) of the base config with the trial's values of the search space (search_space.py); Optuna's TPE
sampler proposes them and a pruner stops a trial after any epoch whose validation accuracy is poor against the
other trials' at that epoch (median or successive halving). The objective is the best validation accuracy: the
test split stays unseen by the search.

The study lives in a database: SQLite at OUT/study.db by default, so a Ctrl-C or a kill loses at most the trial
in progress and the same command continues the count; `--storage postgresql://...` lets several `cnnkit tune`
processes, on several machines, share one study (Optuna's RDB storage). Each worker beats a heartbeat into the
database, so the trial of a worker that was killed is marked failed once it misses two beats, and run again
(resuming its run folder where that folder is on this machine).

    tune(base, TuneConfig(...)) -> (result, files)     OUT/best.yaml (a config `cnnkit train --config` runs),
                                                       OUT/trials.csv, OUT/tune.json, OUT/tune.html
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import socket
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from ..config import TrainConfig
from ..distributed import World
from ..errors import CnnkitError, TrainingInterrupted
from ..runfolder import RunFolder
from ..search_space import Space
from ..training.callbacks import Callback
from ..utils import redact, write_csv, write_text_atomic
from .train import train  # a trial is a train run (pyproject's layer contract allows this one import)


@dataclass
class TuneConfig:
    """How the search runs; the trials' own settings are the base TrainConfig's and the space's."""
    space: str  # the search space, a YAML file (search_space.py)
    trials: int = 20  # finished trials (complete or pruned) the study should hold, counted over every worker
    timeout: float | None = None  # seconds after which this worker starts no new trial; None: no limit
    out: str | None = None  # the study's folder; None: runs/tune-<data>-<model>-<time stamp>
    storage: str | None = None  # database URL (sqlite:///..., postgresql://user@host/db); None: OUT/study.db
    study_name: str | None = None  # the study's name in the database; None: the folder's name
    pruner: str = "median"  # median (a trial below the median of earlier trials at the same epoch stops) |
                            # halving (successive halving, reduction factor 3) | none
    heartbeat: int = 30  # seconds between a worker's heartbeats; a trial silent for 2 of them is failed and retried
    sampler_seed: int | None = None  # seeds TPE's proposals (one worker); None: fresh in every worker

    def validate(self) -> "TuneConfig":
        if self.trials < 1:
            raise CnnkitError(f"--trials must be at least 1, not {self.trials}")
        if self.timeout is not None and self.timeout <= 0:
            raise CnnkitError(f"--timeout is in seconds and must be above 0, not {self.timeout}")
        if self.pruner not in PRUNERS:
            raise CnnkitError(f"--pruner must be one of {', '.join(PRUNERS)}, not {self.pruner!r}")
        if self.heartbeat < 1:
            raise CnnkitError(f"--heartbeat is in whole seconds, at least 1, not {self.heartbeat}")
        return self


PRUNERS = ("median", "halving", "none")
MAX_RETRIES = 2  # times a trial whose worker died is queued again
GIVE_UP = 3  # trials in a row that fail for their own values before a worker stops asking for more
OPEN_TRIES = 4  # tries to open a study whose tables another worker is creating at that moment
STARTUP_TRIALS = 5  # trials the median pruner and TPE's random start wait for before they act (at most)


def tune(base: TrainConfig, tc: TuneConfig, *, quiet: bool = False,
         echo: Callable[[str], None] | None = print) -> tuple[dict, dict[str, Path]]:
    """Run trials until the study holds tc.trials finished ones (or tc.timeout passes), then write the results."""
    tc.validate()
    say = echo or (lambda _msg: None)
    if World.from_env().active:
        raise CnnkitError("cnnkit tune runs each trial in one process: start it without torchrun (several workers "
                          "share a study through --storage instead)")
    base = base.validate()
    space = Space.from_file(tc.space, base)  # every bad space is refused here, before a folder or a trial
    optuna = import_optuna()
    check_trackers(base)
    out = Path(tc.out or base.out or default_tune_dir(base))
    base = dataclasses.replace(base, out=None)
    out.mkdir(parents=True, exist_ok=True)
    url = tc.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    name = tc.study_name or out.resolve().name
    study = open_study(optuna, url, name, tc, base, space)
    reclaim(optuna, study)
    say(f"study {name} in {redact(url)}: {finished(study)} of {tc.trials} trials finished; searching "
        + "; ".join(d.describe() for d in space.dimensions))
    parent = parent_run(study, base, space)
    objective = Objective(space, base, out, study, say, parent, quiet)
    deadline = None if tc.timeout is None else time.monotonic() + tc.timeout
    try:
        # Again after optimize returns: a trial that went stale meanwhile is queued, and runs here
        while (work_left(study, tc.trials) and not objective.gave_up
               and (deadline is None or time.monotonic() < deadline)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat, retry callback
                study.optimize(objective, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()),
                               catch=(TrialFailed,), callbacks=[StopAt(tc.trials, objective)], gc_after_trial=True)
            reclaim(optuna, study)
    except (KeyboardInterrupt, TrainingInterrupted):
        end_parent_run(base, parent, {}, "KILLED")
        raise
    result, files = write_results(study, out, url, tc, space)
    end_parent_run(base, parent, {"best_val_accuracy": (result["best"] or {}).get("val_accuracy"),
                                  **{f"trials_{k}": v for k, v in result["states"].items()}})
    if objective.gave_up and result["best"] is None:
        raise CnnkitError(f"{GIVE_UP} trials in a row failed and none has finished; the last: {objective.last_error}")
    return result, files


def work_left(study, n: int) -> bool:
    s = states(study)
    return finished(study) < n or bool(s.get("waiting"))


def check_trackers(base: TrainConfig) -> None:
    """--track's packages, before the study exists (each trial would otherwise fail on them)."""
    from ..tracking import require
    wanted = [] if base.track == "none" else base.track.split(",")
    if "tensorboard" in wanted:
        require("tensorboard", "tensorboard", "torch.utils.tensorboard")
    if "mlflow" in wanted:
        require("mlflow", "mlflow-skinny", "mlflow")


def reclaim(optuna, study) -> None:
    """Fail the running trials whose workers are gone, and queue them again (RetryHeartbeatStaleTrialCallback):
    a trial of this machine whose process has ended at once, any other once it misses two heartbeats."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES,
                                                                 inherit_intermediate_values=True)
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None or process_alive(pid):
            continue
        try:  # Optuna has no public call to fail a trial it did not hand out; fail_stale_trials does the same
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker got there first
            continue
        retry(study, study._storage.get_trial(t._trial_id))


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process of that number
        return True
    return True


def parent_run(study, base: TrainConfig, space: Space) -> str | None:
    """--track mlflow: the study's MLflow run, which each trial's run is nested in; made by the first worker and
    found in the study by the others. None without MLflow."""
    if "mlflow" not in base.track.split(","):
        return None
    from ..tracking import start_parent_run
    if "mlflow_parent_run" not in study.user_attrs:
        study.set_user_attr("mlflow_parent_run", start_parent_run(base, study.study_name, {
            "space": json.dumps(space.to_dict()), **base.to_dict()}))
    return study.user_attrs["mlflow_parent_run"]  # read back: of two workers starting at once, the last one's


def end_parent_run(base: TrainConfig, run_id: str | None, metrics: dict, status: str = "FINISHED") -> None:
    if run_id is not None:
        from ..tracking import end_parent_run as end
        end(base, run_id, {k: v for k, v in metrics.items() if v is not None}, status)


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise CnnkitError("cnnkit tune needs Optuna: pip install 'cnnkit[tune]'") from None
    # cnnkit says what each trial did, once; Optuna's own warning of a failed trial comes with a traceback
    optuna.logging.set_verbosity(logging.ERROR)
    return optuna


def default_tune_dir(cfg: TrainConfig) -> Path:
    data = Path(cfg.data).name if Path(cfg.data).exists() else cfg.data
    return Path("runs") / f"tune-{data}-{Path(cfg.model).stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def open_study(optuna, url: str, name: str, tc: TuneConfig, base: TrainConfig, space: Space):
    """The study, created or loaded (load_if_exists: another worker, or a resume); refused when it was made with
    another space, base config or heartbeat, which would mix two searches in one or fail live trials."""
    n_startup = min(STARTUP_TRIALS, max(2, tc.trials // 4))
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=n_startup, n_warmup_steps=0),
              "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
              "none": optuna.pruners.NopPruner}[tc.pruner]()
    sampler = optuna.samplers.TPESampler(n_startup_trials=n_startup, seed=tc.sampler_seed)
    for attempt in range(OPEN_TRIES):
        try:
            study = optuna.create_study(storage=storage(optuna, url, tc), study_name=name, direction="maximize",
                                        sampler=sampler, pruner=pruner, load_if_exists=True)
            break
        except ImportError as e:  # postgresql:// without a driver
            raise CnnkitError(f"cannot open {redact(url)}: {e} (pip install 'cnnkit[tune]' brings psycopg2 for "
                              "PostgreSQL)") from None
        except Exception as e:  # sqlalchemy's errors: a bad URL, no server; or two workers creating the tables at once
            if attempt == OPEN_TRIES - 1 or "already exists" not in str(e) and "UNIQUE" not in str(e).upper():
                raise CnnkitError(f"cannot open the study database {redact(url)}: {str(e).splitlines()[0]}") from None
            time.sleep(random.uniform(0.2, 1.0))  # optuna/optuna#1092: the other worker's tables are there now
    mine = {"space": space.to_dict(), "base": comparable(base), "heartbeat": tc.heartbeat,
            "objective": "best validation accuracy"}
    if "identity" not in study.user_attrs:  # one attribute, written at once: a second worker never sees half of it
        study.set_user_attr("identity", mine)
    theirs = study.user_attrs["identity"]
    if json.dumps(theirs, sort_keys=True) != json.dumps(mine, sort_keys=True):
        what = [k for k in mine if json.dumps(theirs.get(k), sort_keys=True) != json.dumps(mine[k], sort_keys=True)]
        raise CnnkitError(f"study {name} in {redact(url)} was started with another {' and '.join(what)}: give the "
                          "same space, flags and --heartbeat to continue it, or another --study-name and --out")
    return study


def storage(optuna, url: str, tc: TuneConfig):
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat's
        return optuna.storages.RDBStorage(
            url, engine_kwargs=kwargs, heartbeat_interval=tc.heartbeat, grace_period=2 * tc.heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=MAX_RETRIES, inherit_intermediate_values=True))


# Fields that may differ between the machines of one study: where each finds its data, runs and logs
MACHINE_FIELDS = ("data_dir", "download", "device", "mlflow_uri", "out")


def comparable(base: TrainConfig) -> dict:
    """The base config as workers compare it: no machine fields, numbers of float fields as floats (0 == 0.0)."""
    from ..config import FIELD_TYPES
    return {k: float(v) if FIELD_TYPES[k] is float and isinstance(v, int) else v
            for k, v in base.to_dict().items() if k not in MACHINE_FIELDS}


class TrialFailed(Exception):
    """A trial whose run failed for its own values (it diverged, or the config refused them together): recorded
    as failed, and the study goes on."""


def states(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


def finished(study) -> int:
    s = states(study)
    return s.get("complete", 0) + s.get("pruned", 0)


class StopAt:
    """Stop this worker once the study holds n finished trials, whoever finished them, and no queued trial waits
    (a killed worker's, which was started within the budget); or after GIVE_UP of its trials in a row failed for
    their own values. Two workers that start their last trials together may both run one: the study then holds up
    to (workers - 1) more than n."""
    def __init__(self, n: int, objective: "Objective"):
        self.n, self.objective = n, objective

    def __call__(self, study, trial) -> None:
        if not work_left(study, self.n) or self.objective.gave_up:
            study.stop()


class Pruning(Callback):
    """Reports each epoch's validation accuracy to the trial and stops the run when the pruner says so. A resumed
    run reports its earlier epochs first, from its history.csv (a step reported twice is ignored by Optuna)."""
    def __init__(self, trial):
        self.trial = trial

    def on_train_start(self, cfg, run, first_epoch: int) -> None:
        for row in run.read_history():
            if row["epoch"] < first_epoch:
                self.report(int(row["epoch"]), row["val_acc"])

    def report(self, epoch: int, val_acc: float) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the reported value is ignored because this step is already reported"
            self.trial.report(val_acc, epoch)

    def on_epoch_end(self, epoch: int, row: dict[str, float]) -> None:
        import optuna
        self.report(epoch, row["val_acc"])
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {row['val_acc']:.4f} at epoch {epoch}")


class Objective:
    """One trial: its values, its run folder (a fresh one, or the folder of the trial it retries), a train run
    with the pruner watching, and the best validation accuracy."""
    def __init__(self, space: Space, base: TrainConfig, out: Path, study, say: Callable[[str], None],
                 parent: str | None, quiet: bool):
        self.space, self.base, self.out, self.study, self.say = space, base, out, study, say
        self.parent, self.quiet = parent, quiet  # quiet: no progress bars of the trials' epochs
        self.failures, self.last_error = 0, ""  # trials in a row of this worker that failed for their own values

    @property
    def gave_up(self) -> bool:
        return self.failures >= GIVE_UP

    def __call__(self, trial) -> float:
        import optuna
        trial.set_user_attr("host", socket.gethostname())  # so a resumed study on this machine sees it died
        trial.set_user_attr("pid", os.getpid())
        params = self.space.suggest(trial)
        retried = self.retried_folder(trial, params)
        folder = retried or self.out / f"trial-{trial.number:04d}"
        taken = RunFolder(folder, echo=None, quiet=True)
        if retried is None and (taken.has_checkpoint() or taken.is_complete()):
            raise CnnkitError(f"{folder} holds a run that is not trial {trial.number} of this study (another study "
                              "used this folder): give another --out")
        cfg = dataclasses.replace(self.base, **params, out=str(folder))
        trial.set_user_attr("run_dir", str(folder))
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())
        try:
            cfg.validate()
            metrics = self.run(cfg, folder, trial, retried is not None)
        except optuna.TrialPruned as e:
            self.failures = 0
            self.say(f"trial {trial.number} ({shown}): pruned, {e}")
            raise
        except (TrainingInterrupted, KeyboardInterrupt):
            # Ctrl-C: this trial is recorded as failed; its values are queued, so the same command runs them first,
            # resuming the folder
            self.study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
            raise TrainingInterrupted(f"interrupted during trial {trial.number}, whose run is kept in {folder}; the "
                                      "same cnnkit tune command continues the study, resuming that run first") from None
        except optuna.exceptions.UpdateFinishedTrialError:
            raise CnnkitError(f"trial {trial.number} was failed by another worker, which took it for dead: give "
                              "every worker of a study the same --heartbeat") from None
        except CnnkitError as e:  # it diverged, or its values do not go together: this trial's, not the study's
            self.failures, self.last_error = self.failures + 1, str(e)
            trial.set_user_attr("error", str(e))
            self.say(f"trial {trial.number} ({shown}): failed, {str(e).split(';')[0]}")
            raise TrialFailed(str(e)) from None
        self.failures = 0
        for key in ("test_accuracy", "best_epoch", "train_seconds"):
            if metrics.get(key) is not None:
                trial.set_user_attr(key, metrics[key])
        # its config, for best.yaml: the run folder may be on another machine than the worker writing the results
        trial.set_user_attr("config", RunFolder(folder, echo=None, quiet=True).read_config().to_dict())
        value = float(metrics["val_accuracy"])
        best = max([value] + [t.value for t in self.study.get_trials(deepcopy=False, states=(
            optuna.trial.TrialState.COMPLETE,)) if t.value is not None])
        self.say(f"trial {trial.number} ({shown}): val acc {value:.4f} (best so far {best:.4f})")
        return value

    def retried_folder(self, trial, params: dict) -> Path | None:
        """The run folder of the trial this one retries (a killed worker's, or one stopped by Ctrl-C), when it is on
        this machine and was started with these values: resumed from its checkpoint, read if it finished, or
        started again there."""
        trials = self.study.get_trials(deepcopy=False)  # ordered by number
        old = trial.user_attrs.get("retry_of", trials[trial.number].system_attrs.get("failed_trial"))
        folder = trials[old].user_attrs.get("run_dir") if old is not None else None
        if not folder or not Path(folder).is_dir():
            return None
        run = RunFolder(folder, echo=None, quiet=True)
        if run.config_file.is_file():
            theirs = run.read_config()
            if any(getattr(theirs, k) != v for k, v in params.items()):
                return None
        return Path(folder)

    def run(self, cfg: TrainConfig, folder: Path, trial, retried: bool) -> dict:
        run = RunFolder(folder, echo=None, quiet=True)
        pruning = Pruning(trial)
        if retried and run.is_complete():  # killed after its test, before the database heard
            pruning.on_train_start(cfg, run, first_epoch=10**9)
            return json.loads(run.metrics_file.read_text())
        if retried and run.has_checkpoint():
            result = train(resume=folder, quiet=self.quiet, echo=None, callbacks=[pruning], track_parent=self.parent)
        else:
            result = train(cfg, quiet=self.quiet, echo=None, callbacks=[pruning], track_parent=self.parent)
        return result.metrics


# ----------------------------------------------------------------------------- results
def write_results(study, out: Path, url: str, tc: TuneConfig, space: Space) -> tuple[dict, dict[str, Path]]:
    """OUT/trials.csv (one row per trial), OUT/best.yaml, OUT/tune.json and OUT/tune.html."""
    trials = study.get_trials(deepcopy=False)
    fields = [d.field for d in space.dimensions]
    rows = [[t.number, t.state.name.lower(), t.value, len(t.intermediate_values),
             *[t.params.get(f) for f in fields], t.user_attrs.get("test_accuracy"), t.user_attrs.get("run_dir")]
            for t in trials]
    files = {"trials_csv": out / "trials.csv", "tune_json": out / "tune.json"}
    write_csv(files["trials_csv"], ["trial", "state", "val_accuracy", "epochs", *fields, "test_accuracy", "run_dir"],
              rows)
    best = best_trial(study)
    result = {"study": study.study_name, "storage": redact(url), "out": str(out), "trials_wanted": tc.trials,
              "states": states(study), "space": space.to_dict(), "best": None}
    if best is not None:
        files["best_yaml"] = out / "best.yaml"
        write_best_config(best, files["best_yaml"], study.study_name)
        result["best"] = {"trial": best.number, "val_accuracy": best.value, "params": best.params,
                          "test_accuracy": best.user_attrs.get("test_accuracy"), "run_dir": best.user_attrs["run_dir"]}
        result["importances"] = importances(study)
    write_text_atomic(files["tune_json"], json.dumps(result, indent=2, default=str))
    from ..report_tune import write_tune_page
    files["tune_html"] = write_tune_page(out / "tune.html", study, result, fields)
    return result, files


def best_trial(study):
    import optuna
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def write_best_config(trial, path: Path, study_name: str) -> None:
    """The best trial's own config (its config.json, kept in the study) as YAML, with no --out, so
    `cnnkit train --config best.yaml` trains it again (the same seed gives the same run on a CPU)."""
    import yaml
    fields = {**trial.user_attrs["config"], "out": None}
    header = (f"# cnnkit tune: the best trial ({trial.number}) of study {study_name}, validation accuracy "
              f"{trial.value:.4f}; its run: {trial.user_attrs['run_dir']}\n"
              f"#   cnnkit train --config {path}\n"
              f"# tuned: {', '.join(f'{k}={v}' for k, v in trial.params.items())}\n")
    write_text_atomic(path, header + yaml.safe_dump(fields, sort_keys=False))


def importances(study) -> dict[str, float] | None:
    """Optuna's fANOVA importance of each parameter for the validation accuracy; None with too few trials."""
    import optuna
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):  # fewer than two complete trials, or a parameter that never varied
        return None
