"""cnnkit tune: the search space's checks, a study's trials as run folders, pruning, the best config trained
again, a study resumed after a kill, and several workers sharing one study (SQLite here; PostgreSQL in
the last test). The database is read back with Optuna's own API, not through cnnkit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, assert_same_run, run_cli, run_main, shared

from cnnkit.config import TrainConfig
from cnnkit.errors import CnnkitError
from cnnkit.search_space import Space

SPACE = "lr: {log_uniform: [1.0e-3, 1.0e-1]}\nweight_decay: {uniform: [0.0, 1.0e-3]}\n" \
        "label_smoothing: {uniform: [0.0, 0.2]}\n"


def write_space(folder: Path, text: str = SPACE) -> Path:
    path = folder / "space.yaml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- the space
@pytest.mark.parametrize("space, message", [
    ({"lrr": {"uniform": [0, 1]}}, "lrr is not a config field"),
    ({"lr": {"log_uniform": [0.1, 1e-4]}}, "are inverted or equal"),
    ({"lr": {"uniform": [0.01, 0.01]}}, "are inverted or equal"),
    ({"batch_size": {"choice": [64, "big"]}}, "choice 'big' is not a whole number"),
    ({"batch_size": {"choice": [64, 12.5]}}, "choice 12.5 is not a whole number"),
    ({"optimizer": {"choice": ["adam", "rmsprop"]}}, "optimizer 'rmsprop' is not a setting the config takes"),
    ({"label_smoothing": {"uniform": [0.0, 1.5]}}, "label_smoothing 1.5 is not a setting the config takes"),
    ({"channels": {"int": [1, 3]}}, "channels takes one of None, 1, 3: give them with choice"),
    ({"lr": {"log_uniform": [0.0, 0.1]}}, "needs low > 0"),
    ({"epochs": {"uniform": [1, 5]}}, "is a whole number: use int or log_int"),
    ({"lr": {"int": [1, 5]}}, "is a number with a fraction"),
    ({"optimizer": {"uniform": [0, 1]}}, "give them with choice"),
    ({"pos_weight": {"uniform": [0, 1]}}, "give its values with choice"),
    ({"lr": {"normal": [0, 1]}}, "must be one of uniform, log_uniform"),
    ({"lr": {"uniform": [0.1]}}, "takes [low, high], two numbers"),
    ({"epochs": {"int": [1, 6], "step": 2}}, "step 2 does not divide"),
    ({"out": {"choice": ["a", "b"]}}, "says where data and results go"),
    ({"ema": {"choice": [0.0, True]}}, "choice True is not a number"),
    ([1, 2], "must map config fields to distributions"),
])
def test_bad_spaces_are_refused_in_one_line(space, message):
    with pytest.raises(CnnkitError) as e:
        Space.from_dict(space, TrainConfig())
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_space_checks_its_values_with_the_base_config():
    # lookahead needs an ema: a choice of ema 0 is refused with a lookahead base, allowed without
    with pytest.raises(CnnkitError, match="ema 0.0 is not a setting the config takes.*--lookahead"):
        Space.from_dict({"ema": {"choice": [0.0, 0.99]}}, TrainConfig(lookahead=True, ema=0.9))
    # ... and in combination: lookahead true with ema 0 is refused, though each value alone passes
    with pytest.raises(CnnkitError, match="lookahead True, ema 0.0 is not a setting"):
        Space.from_dict({"lookahead": {"choice": [False, True]}, "ema": {"choice": [0.0, 0.99]}}, TrainConfig())
    # and a space that tunes the lr is refused where --lr auto would replace every trial's
    with pytest.raises(CnnkitError, match="--lr auto finds the lr itself"):
        Space.from_dict({"lr": {"log_uniform": [1e-4, 1e-1]}}, TrainConfig(lr="auto"))
    space = Space.from_dict({"ema": {"choice": [0.0, 0.99]}}, TrainConfig())
    assert space.to_dict() == {"ema": {"choice": [0.0, 0.99]}}


def test_exponents_without_a_dot_are_numbers():
    # PyYAML reads 1e-4 as the text '1e-4' (YAML 1.1): the issue's own example is written so
    import yaml
    d = yaml.safe_load("lr: {log_uniform: [1e-4, 1e-1]}\nbatch_size: {choice: [64, 128]}")
    assert d["lr"]["log_uniform"] == ["1e-4", "1e-1"]
    assert Space.from_dict(d, TrainConfig()).to_dict()["lr"] == {"log_uniform": [1e-4, 1e-1]}


def test_suggestions_follow_the_space():
    import optuna
    space = Space.from_dict({"lr": {"log_uniform": [1e-4, 1e-1]}, "epochs": {"int": [2, 8], "step": 2},
                             "optimizer": {"choice": ["adam", "sgd"]}, "batch_size": {"log_int": [16, 256]}},
                            TrainConfig())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        values = space.suggest(study.ask())
        assert 1e-4 <= values["lr"] <= 1e-1 and values["epochs"] in (2, 4, 6, 8)
        assert values["optimizer"] in ("adam", "sgd") and 16 <= values["batch_size"] <= 256
        assert isinstance(values["batch_size"], int) and isinstance(values["lr"], float)


def test_a_bad_space_stops_the_command_before_any_trial(tmp_path):
    space = write_space(tmp_path, "lr: {log_uniform: [0.1, 0.0001]}\n")
    r = run_main("tune", "--space", str(space), "--trials", "2", "--out", str(tmp_path / "study"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "lr: the bounds [0.1, 0.0001] are inverted" in r.stderr
    assert not (tmp_path / "study").exists()  # no folder, no database: nothing started


def test_the_command_line_knows_the_job_defaults():
    from cnnkit.cli import tune as cli
    from cnnkit.jobs.tune import PRUNERS, TuneConfig
    assert (cli.TRIALS, cli.PRUNERS, cli.HEARTBEAT) == (TuneConfig.trials, PRUNERS, TuneConfig.heartbeat)


# ----------------------------------------------------------------------------- a study
def study_trials(out: Path, name: str | None = None, storage: str | None = None):
    import optuna
    storage = storage or f"sqlite:///{out / 'study.db'}"
    return optuna.load_study(study_name=name or out.name, storage=storage).get_trials()


def check_trials_are_runs(trials, n: int, workers: int = 1) -> None:
    """Every trial finished or failed (none left running), numbered once each, at least n finished (at most
    workers - 1 more), each complete trial's value its own run folder's validation accuracy."""
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and "WAITING" not in states, states
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert n <= len(finished) <= n + workers - 1, states
    folders = [t.user_attrs["run_dir"] for t in finished]
    assert len(set(folders)) == len(folders)  # no run folder serves two finished trials
    for t in finished:
        if t.state.name == "COMPLETE":
            metrics = json.loads((Path(t.user_attrs["run_dir"]) / "metrics.json").read_text())
            assert metrics["val_accuracy"] == pytest.approx(t.value, abs=1e-12)
        else:  # pruned: stopped after an epoch, before the test
            assert not (Path(t.user_attrs["run_dir"]) / "metrics.json").exists()
            assert len(t.intermediate_values) >= 1


@pytest.mark.slow
def test_a_small_study_writes_runs_best_config_and_page(tmp_path):
    out = tmp_path / "study"
    r = run_main("tune", "--space", str(write_space(tmp_path)), "--trials", "5", "--epochs", "2", "--no-report",
                 "--sampler-seed", "0", "--out", str(out), "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    trials = study_trials(out)
    check_trials_are_runs(trials, 5)
    best = max((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert result["best"]["trial"] == best.number and result["best"]["params"] == best.params
    assert (out / "trials.csv").read_text().count("\n") == len(trials) + 1
    page = (out / "tune.html").read_text()
    assert "Tuning study study" in page and page.count("<img") >= 3
    cfg = TrainConfig.from_file(out / "best.yaml")
    assert cfg.out is None and all(getattr(cfg, k) == v for k, v in best.params.items())


@pytest.mark.slow
@pytest.mark.heavy
def test_tune_fast_mnist_prunes_and_its_best_config_trains_the_same(tmp_path):
    """The issue's check: 12 trials of the fast MNIST recipe over lr, weight decay and label smoothing, 1 epoch
    each; some are pruned, and `cnnkit train --config best.yaml` gives the best trial's metrics again."""
    out = tmp_path / "study"
    mnist = str(shared("mnist"))
    r = run_cli("tune", "--space", str(write_space(tmp_path)), "--trials", "12", "--recipe", "fast", "--data",
                "mnist", "--data-dir", mnist, "--epochs", "1", "--no-report", "--sampler-seed", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    trials = study_trials(out)
    check_trials_are_runs(trials, 12)
    assert any(t.state.name == "PRUNED" for t in trials), [t.state.name for t in trials]
    best = json.loads((out / "tune.json").read_text())["best"]
    again = tmp_path / "again"
    r = run_main("train", "--config", str(out / "best.yaml"), "--out", str(again), "--quiet")
    assert r.returncode == 0, r.stderr
    assert_same_run(Path(best["run_dir"]), again)


def start_tune(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnnkit", "tune", "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def wait_for(out: Path, proc: subprocess.Popen, what, timeout: float = 300, **kw) -> None:
    """Poll the study until what(trials) holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the worker ended early: {proc.stdout.read()}")
        try:
            if what(study_trials(out, **kw)):
                return
        except Exception:  # the study is not created yet
            pass
        time.sleep(0.2)
    pytest.fail(f"the study did not get there in {timeout} s")


def training_a_trial_after(n: int):
    """n trials finished and another one's run under way (its run folder has its config): killed in the middle."""
    def what(trials) -> bool:
        running = [t for t in trials if t.state.name == "RUNNING" and "run_dir" in t.user_attrs]
        return (sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) >= n and len(running) == 1
                and (Path(running[0].user_attrs["run_dir"]) / "config.json").exists())
    return what


DIGITS = ("--epochs", "3", "--no-report", "--quiet", "--heartbeat", "2")


@pytest.mark.slow
@pytest.mark.heavy  # ~20-30 s: run by CI after the suite, which stays under 15 min
def test_a_killed_study_continues_its_count_and_retries_the_killed_trial(tmp_path):
    out, space = tmp_path / "study", str(write_space(tmp_path))
    proc = start_tune(out, "--space", space, "--trials", "7", *DIGITS)
    wait_for(out, proc, training_a_trial_after(2))
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up: its trial stays RUNNING in the database, its folder half-done
    proc.wait()
    killed = [t for t in study_trials(out) if t.state.name == "RUNNING"]
    # no waiting for missed heartbeats: the trial's process on this machine is gone, which the rerun sees
    r = run_cli("tune", "--out", str(out), "--space", space, "--trials", "7", *DIGITS)
    assert r.returncode == 0, r.stderr + r.stdout
    trials = study_trials(out)
    check_trials_are_runs(trials, 7)
    assert len(killed) == 1
    dead = trials[killed[0].number]  # failed for its silence, and run again under a new number, in its folder
    assert dead.state.name == "FAIL"
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].params == dead.params and retry[0].state.name in ("COMPLETE", "PRUNED")
    assert retry[0].user_attrs["run_dir"] == dead.user_attrs["run_dir"]  # resumed there


@pytest.mark.slow
@pytest.mark.heavy  # ~20-30 s: run by CI after the suite, which stays under 15 min
def test_two_workers_share_one_sqlite_study(tmp_path):
    out, space = tmp_path / "study", str(write_space(tmp_path))
    workers = [start_tune(out, "--space", space, "--trials", "6", *DIGITS) for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), logs
    check_trials_are_runs(study_trials(out), 6, workers=2)


@pytest.mark.slow
@pytest.mark.heavy  # ~10-20 s: run by CI after the suite, which stays under 15 min
def test_two_workers_share_a_postgresql_study_and_a_killed_ones_trial_runs_again(tmp_path, postgres_url):
    """Two `cnnkit tune` processes, each with its own folder as on two machines, one study in a real PostgreSQL
    server; one is killed in the middle of a trial: the other fails that trial once it misses two heartbeats,
    runs it again, and finishes the study."""
    common = ("--space", str(write_space(tmp_path)), "--trials", "8", "--storage", postgres_url,
              "--study-name", "shared", *DIGITS)
    first, second = start_tune(tmp_path / "first", *common), start_tune(tmp_path / "second", *common)
    where = {"name": "shared", "storage": postgres_url}

    def first_is_training(trials) -> bool:
        running = [t for t in trials if t.state.name == "RUNNING"
                   and t.user_attrs.get("run_dir", "").startswith(str(tmp_path / "first"))]
        return len(running) == 1 and (Path(running[0].user_attrs["run_dir"]) / "config.json").exists()

    wait_for(tmp_path / "first", first, first_is_training, **where)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    killed = [t for t in study_trials(tmp_path, **where)
              if t.state.name == "RUNNING" and t.user_attrs.get("run_dir", "").startswith(str(tmp_path / "first"))]
    log = second.communicate(timeout=600)[0]
    assert second.returncode == 0, log
    trials = study_trials(tmp_path, **where)
    check_trials_are_runs(trials, 8, workers=2)
    dead = trials[killed[0].number]
    assert dead.state.name == "FAIL"
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].params == dead.params and retry[0].state.name in ("COMPLETE", "PRUNED")


def test_without_optuna_the_message_names_the_extra(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_optuna(name, *args, **kwargs):
        if name == "optuna" or name.startswith("optuna."):
            raise ImportError("No module named 'optuna'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_optuna)
    r = run_main("tune", "--space", str(write_space(tmp_path)), "--out", str(tmp_path / "study"))
    assert r.returncode == 2 and "pip install 'cnnkit[tune]'" in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.slow
def test_a_timeout_stops_starting_trials(tmp_path):
    out = tmp_path / "study"
    r = run_main("tune", "--space", str(write_space(tmp_path)), "--trials", "50", "--timeout", "0.5", "--epochs", "1",
                 "--no-report", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    trials = study_trials(out)
    assert len(trials) == 1 and trials[0].state.name == "COMPLETE"  # the first trial outlasts 0.5 s


@pytest.mark.slow
@pytest.mark.heavy  # ~10-20 s: run by CI after the suite, which stays under 15 min
def test_with_mlflow_each_trial_is_a_run_nested_in_the_study_run(tmp_path):
    from mlflow import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "study"
    r = run_main("tune", "--space", str(write_space(tmp_path)), "--trials", "3", "--epochs", "2", "--no-report",
                 "--track", "mlflow", "--mlflow-uri", uri, "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    trials = study_trials(out)
    import optuna
    parent_id = optuna.load_study(study_name="study", storage=f"sqlite:///{out / 'study.db'}").user_attrs[
        "mlflow_parent_run"]
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.params["space"]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == len(trials) == 3
    for t in trials:  # each trial's run: its own lr, and its epochs' validation accuracy as the study saw them
        run_id = json.loads((Path(t.user_attrs["run_dir"]) / "mlflow-run.json").read_text())["run_id"]
        child = client.get_run(run_id)
        assert child.data.tags["mlflow.parentRunId"] == parent_id
        assert float(child.data.params["lr"]) == pytest.approx(t.params["lr"], rel=1e-6)
        logged = {m.step: m.value for m in client.get_metric_history(run_id, "val_acc")}
        assert logged == pytest.approx(t.intermediate_values, rel=1e-5)


def test_a_folder_holding_another_studys_trial_is_refused(tmp_path):
    out = tmp_path / "study"
    (out / "trial-0000").mkdir(parents=True)
    (out / "trial-0000" / "metrics.json").write_text("{}")  # a finished run of some earlier study
    r = run_main("tune", "--space", str(write_space(tmp_path)), "--trials", "2", "--out", str(out), "--quiet")
    assert r.returncode == 2 and "holds a run that is not trial 0 of this study" in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.heavy  # ~10-20 s: run by CI after the suite, which stays under 15 min
def test_trials_that_all_diverge_stop_the_worker_with_one_line(tmp_path):
    space = write_space(tmp_path, "lr: {log_uniform: [1.0e+4, 1.0e+5]}\n")  # SGD at such a rate diverges at once
    out = tmp_path / "study"
    r = run_main("tune", "--space", str(space), "--trials", "20", "--optimizer", "sgd", "--epochs", "2",
                 "--no-report", "--out", str(out), "--quiet")
    assert r.returncode == 2 and "3 trials in a row failed and none has finished" in r.stderr, r.stderr
    trials = study_trials(out)
    assert [t.state.name for t in trials] == ["FAIL"] * 3 and all("diverged" in t.user_attrs["error"] for t in trials)
