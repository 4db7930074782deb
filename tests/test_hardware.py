"""The precision rule: bf16 only where this machine runs it faster, decided by the CPU's flags where
they settle it and by a cached probe elsewhere. $CNNKIT_CPU_FLAGS stands in for another CPU."""
from __future__ import annotations

import ast
import json

import pytest
import torch

from cnnkit import hardware
from conftest import run_main

# Flag sets of the project's three kinds of CPU, cut to what bears on bf16.
ICE_LAKE = "avx2 avx512f avx512bw avx512_vnni"  # AVX-512 without BF16: bf16 is emulated
EPYC = "avx2 avx512f avx512bw avx512_vnni avx512_bf16"
SAPPHIRE_RAPIDS = "avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile"
SMALL = ["--data", "digits", "--model", "seed-digits", "--image-size", "16", "--batch-size", "64", "--quiet",
         "--epochs", "1", "--no-report"]


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """An empty machine cache, and flags(...) to pretend to be another CPU; counts real probes."""
    monkeypatch.setenv("CNNKIT_MACHINE_CACHE", str(tmp_path / "machine"))
    monkeypatch.setattr(hardware, "_onednn_has_bf16", lambda: True)
    probes = []

    def flags(value: str, probe: dict | None = None) -> None:
        monkeypatch.setenv("CNNKIT_CPU_FLAGS", value)
        if probe is not None:  # seconds per step to report instead of measuring
            monkeypatch.setattr(hardware, "_probe_step_seconds", lambda: probes.append(1) or probe)

    flags.probes = probes
    flags.cache = tmp_path / "machine" / "precision.json"
    return flags


def test_no_native_bf16_means_fp32_without_a_probe(machine):
    machine(ICE_LAKE, probe={"fp32": 1.0, "bf16": 0.1})  # a probe would say bf16: it must not run
    precision, why = hardware.precision_choice("auto", "cpu")
    assert precision == "fp32" and "emulated" in why
    assert machine.probes == [] and not machine.cache.exists()


def test_amx_means_bf16(machine):
    machine(SAPPHIRE_RAPIDS, probe={"fp32": 0.1, "bf16": 1.0})
    assert hardware.precision_choice("auto", "cpu") == ("bf16", "auto: the CPU has AMX-BF16")
    assert machine.probes == []


@pytest.mark.parametrize("fp32,bf16,expected", [(2.0, 1.0, "bf16"), (1.0, 2.0, "fp32"),
                                                (1.05, 1.0, "fp32")])  # 5% faster is inside the margin
def test_avx512_bf16_is_decided_by_the_probe(machine, fp32, bf16, expected):
    machine(EPYC, probe={"fp32": fp32, "bf16": bf16})
    precision, why = hardware.precision_choice("auto", "cpu")
    assert precision == expected and why.startswith("auto: a probe measured")
    assert machine.probes == [1]


def test_the_probe_runs_once_per_machine_and_is_cached(machine):
    machine(EPYC, probe={"fp32": 2.0, "bf16": 1.0})
    first = hardware.precision_choice("auto", "cpu")
    second = hardware.precision_choice("auto", "cpu")
    assert first[0] == second[0] == "bf16" and second[1].startswith("auto: a cached probe")
    assert machine.probes == [1]  # the second run read the cache
    entries = json.loads(machine.cache.read_text())
    key = hardware.probe_key(hardware.cpu())
    assert list(entries) == [key] and "torch " + torch.__version__ in key and "avx512_bf16" in key
    assert entries[key]["precision"] == "bf16" and entries[key]["fp32_ms"] == 2000.0
    # Another CPU (here: other flags) is another key, probed on its own.
    machine(EPYC + " avx_vnni", probe={"fp32": 1.0, "bf16": 2.0})
    assert hardware.precision_choice("auto", "cpu")[0] == "fp32"
    assert machine.probes == [1, 1] and len(json.loads(machine.cache.read_text())) == 2


@pytest.mark.parametrize("damage", [b"{not json", b"\x00\xff" * 10, b"[1, 2]", b"",
                                    b'{"KEY": {"precision": "fp16", "fp32_ms": 1, "bf16_ms": 1}}',
                                    b'{"KEY": {"precision": "bf16", "fp32_ms": -1, "bf16_ms": 0}}'])
def test_a_damaged_cache_is_ignored_and_probed_again(machine, damage):
    machine(EPYC, probe={"fp32": 2.0, "bf16": 1.0})
    machine.cache.parent.mkdir(parents=True)
    machine.cache.write_bytes(damage.replace(b"KEY", hardware.probe_key(hardware.cpu()).encode()))
    assert hardware.precision_choice("auto", "cpu")[0] == "bf16"
    assert machine.probes == [1]
    assert json.loads(machine.cache.read_text())[hardware.probe_key(hardware.cpu())]["precision"] == "bf16"


def test_an_unwritable_cache_still_chooses(machine, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CNNKIT_MACHINE_CACHE", str(blocker / "machine"))  # below a file: cannot be made
    machine(EPYC, probe={"fp32": 2.0, "bf16": 1.0})
    assert hardware.precision_choice("auto", "cpu")[0] == "bf16"


def test_forcing_either_precision_is_obeyed(machine):
    machine(ICE_LAKE, probe={"fp32": 1.0, "bf16": 1.0})
    assert hardware.precision_choice("bf16", "cpu") == ("bf16", "--precision bf16")
    machine(SAPPHIRE_RAPIDS)
    assert hardware.precision_choice("fp32", "cpu") == ("fp32", "--precision fp32")
    with pytest.raises(hardware.CnnkitError, match="auto, bf16 or fp32"):
        hardware.precision_choice("fp16", "cpu")


def test_the_real_probe_measures_and_leaves_the_seeded_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    seconds = hardware._probe_step_seconds()
    assert torch.equal(torch.get_rng_state(), state)  # a seeded run is the same, probed or not
    assert set(seconds) == {"fp32", "bf16"} and all(0 < s < float("inf") for s in seconds.values())


def test_the_machine_line_names_cpu_flags_torch_and_choice(machine):
    machine(ICE_LAKE)
    line = hardware.machine_line()
    assert line.startswith(f"machine: {hardware.cpu().model}, ") and f"torch {torch.__version__}" in line
    assert "avx512_vnni" in line and "avx512_bf16" not in line and "auto precision fp32" in line


def test_train_prints_and_records_the_choice(machine, tmp_path):
    machine(ICE_LAKE)
    r = run_main("train", *SMALL, "--out", str(tmp_path / "auto"))
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "auto" / "train.log").read_text()
    assert "precision fp32 (auto: the CPU has neither AVX512-BF16 nor AMX" in log
    metrics = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert metrics["precision"] == "fp32" and "emulated" in metrics["precision_reason"]
    # Forcing bf16 on the same CPU still works, and says it was asked for.
    r = run_main("train", *SMALL, "--precision", "bf16", "--out", str(tmp_path / "bf16"))
    assert r.returncode == 0, r.stderr
    assert "precision bf16 (--precision bf16)" in (tmp_path / "bf16" / "train.log").read_text()
    assert json.loads((tmp_path / "bf16" / "metrics.json").read_text())["precision"] == "bf16"


def test_every_benchmark_names_its_machine_first(monkeypatch, capsys):
    """Every script in benchmarks/<group>/ prints machine_line() before anything else it prints: its
    `__main__` block starts with benchmarks.common.machine_header(), which prints that line and nothing else."""
    from benchmarks import common
    from conftest import ROOT
    bench = ROOT / "benchmarks"
    groups = sorted(p.parent.name for p in bench.glob("*/__init__.py"))
    assert groups == ["data", "inference", "serving", "training"]
    assert sorted(p.name for p in bench.glob("*.py")) == ["__init__.py", "common.py"]  # scripts live in a group
    scripts = sorted(p for group in groups for p in (bench / group).glob("*.py") if p.name != "__init__.py")
    assert len(scripts) >= 20 and all(any(p.parent.name == g for p in scripts) for g in groups)
    for path in scripts:
        name = path.relative_to(bench).as_posix()
        tree = ast.parse(path.read_text())
        assert any(isinstance(node, ast.ImportFrom) and node.module == "benchmarks.common"
                   and "machine_header" in [a.name for a in node.names] for node in tree.body), name
        mains = [node for node in tree.body
                 if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"]
        assert len(mains) == 1, name
        assert ast.unparse(mains[0].body[0]) == "machine_header()", name
    assert common.machine_line is hardware.machine_line
    monkeypatch.setattr(common, "machine_line", lambda: "machine: this one")
    common.machine_header()
    assert capsys.readouterr().out == "machine: this one\n"
