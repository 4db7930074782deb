"""The layering is checked, not just drawn: the import-linter contract in pyproject.toml, no import
cycle anywhere in the package (imports inside functions count), a light inference layer, and the
model contract every registered model keeps."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cnnkit
from cnnkit.models.base import unwrap
from cnnkit.models.registry import architecture_record, build_from_record, spec_names
from conftest import ROOT


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(lint), "--no-cache"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 kept, 0 broken" in r.stdout


def test_the_import_graph_has_no_cycle():
    import grimp
    graph = grimp.build_graph("cnnkit", cache_dir=None)  # every import statement, inside functions too
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in edges.get(m, ()):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2
    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert "cnnkit.training" in edges and "cnnkit.inference" in edges  # the graph is the real one


def imported_modules(statement: str) -> set[str]:
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}


def test_the_inference_layer_imports_no_training_reporting_or_matplotlib():
    mods = imported_modules("import cnnkit.inference, cnnkit.preprocess, cnnkit.modelfile")
    assert "cnnkit.inference" in mods and "cnnkit.modelfile" in mods
    for forbidden in ("cnnkit.training", "cnnkit.jobs", "cnnkit.evaluate", "cnnkit.report", "cnnkit.report_html",
                      "cnnkit.explain", "matplotlib"):
        assert forbidden not in mods, forbidden


def test_training_imports_no_evaluation_or_reporting():
    mods = imported_modules("import cnnkit.training")
    for forbidden in ("cnnkit.evaluate", "cnnkit.report", "cnnkit.explain", "cnnkit.jobs", "matplotlib"):
        assert forbidden not in mods, forbidden


@pytest.mark.parametrize("name", spec_names())
def test_every_registered_model_keeps_the_contract_from_construction(name):
    small = {"alexnet": 63, "nin": 67, "lenet5": 28}.get(name, 32)
    with torch.device("meta"):
        model = cnnkit.build_model(name, 7, in_channels=3, image_size=small)
    assert model.num_classes == 7 and model.input_shape == (3, small, small)
    assert isinstance(model.head, torch.nn.Linear) or any(isinstance(m, torch.nn.Conv2d) for m in model.head.modules())
    record = architecture_record(model)
    assert record["num_classes"] == 7 and record["in_channels"] == 3 and record["image_size"] == [small, small]
    with torch.device("meta"):
        rebuilt = build_from_record(record)
    assert type(rebuilt) is type(model) and architecture_record(rebuilt) == record
    assert list(rebuilt.state_dict()) == list(model.state_dict())


def test_wrapped_models_save_plain_keys(tmp_path):
    model = cnnkit.build_model("seed-digits", 10)
    plain = list(model.state_dict())
    for wrapped in (torch.compile(model), torch.nn.DataParallel(model), torch.nn.DataParallel(torch.compile(model))):
        assert list(wrapped.state_dict()) != plain  # the wrappers do add prefixes
        assert unwrap(wrapped) is model
        meta = {"architecture": architecture_record(wrapped), "class_names": [str(i) for i in range(10)],
                "input": {"channels": 1, "height": 8, "width": 8}, "preprocessing": {"mean": [0.5], "std": [0.25]}}
        cnnkit.save_model(tmp_path / "m.safetensors", wrapped, meta)
        loaded, _ = cnnkit.load_model(tmp_path / "m.safetensors")
        assert list(loaded.state_dict()) == plain


def test_ruff_finds_nothing():
    """The linter, with the rules chosen in pyproject.toml ([tool.ruff]), over the package, the tests and the
    benchmarks."""
    ruff = Path(sys.executable).parent / "ruff"
    r = subprocess.run([str(ruff), "check", "--no-cache", "src", "tests", "benchmarks"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
