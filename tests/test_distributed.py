"""Data-parallel training started by torchrun, on this machine's CPU cores with gloo over 127.0.0.1:
disjoint shards, one writer, the same accuracy as one process, two "nodes", and a killed process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, shared

pytestmark = pytest.mark.slow  # each test starts several Python processes that train MNIST

MNIST_TRAIN = 54_001  # MNIST's 60,000 training images less the stratified 10% validation split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, launch: tuple[str, ...] | None = None, env: dict | None = None,
             wait: bool = True):
    """`torchrun --nproc-per-node N -m cnnkit ARGS` (one node, rendezvous on 127.0.0.1 unless launch says)."""
    launch = launch or ("--standalone",)
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc-per-node", str(nproc), "-m", "cnnkit", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def mnist(*extra: str) -> list[str]:
    return ["train", "--recipe", "fast", "--data", "mnist", "--data-dir", str(shared("mnist")), "--no-report", *extra]


def shards(folder: Path, rank: int, epoch: int) -> list[int]:
    return [int(line) for line in (folder / f"rank{rank}-epoch{epoch}.txt").read_text().split()]


def test_two_processes_train_disjoint_shards_with_one_writer_and_one_process_accuracy(tmp_path):
    record = tmp_path / "shards"
    r = torchrun(*mnist("--epochs", "2", "--out", str(tmp_path / "ddp")), env={"CNNKIT_RECORD_SHARDS": str(record)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for epoch in (1, 2):
        zero, one = shards(record, 0, epoch), shards(record, 1, epoch)
        assert len(zero) == len(one) == MNIST_TRAIN // 2  # equal halves: one image of the odd 54,001 dropped
        assert not set(zero) & set(one)  # disjoint
        together = set(zero) | set(one)  # the whole training split but that one image
        assert together <= set(range(MNIST_TRAIN)) and len(together) == MNIST_TRAIN - 1
    assert shards(record, 0, 1) != shards(record, 0, 2)  # a new permutation each epoch
    # one writer: each epoch logged once, history with one row per epoch
    log = (tmp_path / "ddp" / "train.log").read_text()
    assert log.count("epoch 1/2:") == 1 and log.count("epoch 2/2:") == 1 and "data-parallel: 2 processes" in log
    assert r.stdout.count("epoch 2/2:") == 1  # rank 1 printed nothing
    assert len((tmp_path / "ddp" / "history.csv").read_text().splitlines()) == 3
    one_process = run_cli(*mnist("--epochs", "2", "--out", str(tmp_path / "one")), env={"OMP_NUM_THREADS": "1"})
    assert one_process.returncode == 0, one_process.stderr
    ddp_acc = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["test_accuracy"]
    one_acc = json.loads((tmp_path / "one" / "metrics.json").read_text())["test_accuracy"]
    assert abs(ddp_acc - one_acc) <= 0.003, (ddp_acc, one_acc)


def test_two_nodes_on_one_machine_give_a_model_file_evaluate_accepts(tmp_path):
    port, out = str(free_port()), tmp_path / "run"
    launch = lambda rank: ("--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",  # noqa: E731
                           "--master-port", port)
    nodes = [torchrun(*mnist("--epochs", "1", "--out", str(out)), nproc=1, launch=launch(rank), wait=False)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert "data-parallel: 2 processes" in (out / "train.log").read_text()
    r = run_cli("evaluate", str(out), "--data", "mnist", "--data-dir", str(shared("mnist")), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] > 0.97


def workers_of(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of a torchrun launcher's worker processes, read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher.pid:
            for item in env:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(entry.name)
    return found


def wait_for_epoch(run: Path, epoch: int, launcher: subprocess.Popen, timeout: float = 300) -> None:
    """Until the checkpoint holds at least `epoch` finished epochs."""
    from cnnkit.runfolder import RunFolder
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.communicate()[0][-3000:]
        try:
            if RunFolder(run).has_checkpoint() and RunFolder(run).checkpoint_epoch() >= epoch:
                return
        except Exception:  # the checkpoint is being renamed into place
            pass
        time.sleep(0.2)
    pytest.fail(f"no checkpoint after epoch {epoch} within {timeout} s")


def kill_rank_one(launcher: subprocess.Popen) -> str:
    time.sleep(1.0)  # into the next epoch
    workers = workers_of(launcher)
    assert set(workers) == {0, 1}, workers
    os.kill(workers[1], signal.SIGKILL)
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode != 0
    return output


def test_a_killed_process_ends_the_job_clearly_and_resume_continues_with_two_then_one(tmp_path):
    run = tmp_path / "run"
    launcher = torchrun(*mnist("--epochs", "4", "--batch-size", "64", "--out", str(run)), wait=False)
    wait_for_epoch(run, 1, launcher)
    output = kill_rank_one(launcher)
    assert "checkpoint after epoch" in output and f"--resume {run}" in output, output[-3000:]
    lines = output.splitlines()
    # rank 0 learns of it from gloo (a broken connection) or, outside a collective, from torchrun's SIGTERM
    said = [i for i, line in enumerate(lines) if line.startswith(("cnnkit: another process of the job stopped",
                                                                   "cnnkit: interrupted during epoch"))]
    assert said, output[-3000:]
    # no traceback from cnnkit: the only one is torchrun's own report of the failed process, after ours
    assert not any(line.startswith("Traceback") for line in lines[:said[0]])
    assert output.count("Traceback (most recent call last)") <= 1 and "ChildFailedError" in output
    # resume with two processes, and kill again
    launcher = torchrun("train", "--resume", str(run), wait=False)
    wait_for_epoch(run, 2, launcher)
    kill_rank_one(launcher)
    # and finish in one process
    r = run_cli("train", "--resume", str(run), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    history = (run / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2", "3", "4"][:len(history) - 1]
    assert len(history) == 5 and (run / "metrics.json").is_file()
    assert json.loads((run / "metrics.json").read_text())["test_accuracy"] > 0.98
