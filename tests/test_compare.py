"""cnnkit compare: paired statistics against statsmodels, and real runs compared on MNIST."""
from __future__ import annotations

import json

import numpy as np
import pytest

import cnnkit
from cnnkit.compare import paired_comparison
from cnnkit.config import recipe_file
from conftest import run_main, shared


@pytest.mark.parametrize("only_a,only_b,both,neither", [(30, 12, 900, 58), (5, 5, 80, 10), (0, 7, 50, 3),
                                                        (0, 0, 10, 2), (120, 80, 9700, 100)])
def test_mcnemar_and_interval_match_statsmodels(only_a, only_b, both, neither):
    from statsmodels.stats.contingency_tables import mcnemar
    a = np.array([1] * only_a + [0] * only_b + [1] * both + [0] * neither, bool)
    b = np.array([0] * only_a + [1] * only_b + [1] * both + [0] * neither, bool)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(a))  # the order of images must not matter
    result = paired_comparison(a[order], b[order])
    table = [[both, only_a], [only_b, neither]]
    assert result["mcnemar_p_value"] == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-9, abs=1e-12)
    assert (result["only_a_right"], result["only_b_right"], result["both_right"], result["both_wrong"]) == (
        only_a, only_b, both, neither)
    n = len(a)
    assert result["difference"] == pytest.approx(a.mean() - b.mean())
    # The paired Wald interval from first principles: the variance of the per-image differences d_i / n.
    d = a.astype(float) - b.astype(float)
    half = 1.959963984540054 * np.sqrt(d.var() / n)
    assert result["difference_ci95"] == pytest.approx([d.mean() - half, d.mean() + half], abs=1e-12)


def train_fast_mnist(tmp_path, name: str, seed: int, model: str | None = None):
    """The MNIST fast recipe as shipped (3 epochs: after 1, seeds 0 and 1 differed at p = 0.02, the
    networks still far from where the recipe takes them), or `model` for one epoch."""
    cfg = cnnkit.TrainConfig.from_file(recipe_file("fast", "mnist")).to_dict()
    cfg.update({"data_dir": str(shared()), "seed": seed, "out": str(tmp_path / name), "report": False})
    if model:
        cfg.update({"model": model, "lr": 0.003, "epochs": 1})
    return cnnkit.train(cnnkit.TrainConfig.from_dict(cfg), quiet=True).run_dir


@pytest.mark.slow
def test_two_seeds_are_not_different_and_a_weak_model_is(tmp_path, fast_mnist_run):
    a, b = fast_mnist_run[0], train_fast_mnist(tmp_path, "seed1", 1)  # seed 0: the shared run, trained alike
    r = run_main("compare", str(a), str(b), "--json", "--out", str(tmp_path / "cmp"))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["n"] == 10_000 and not result["significant"] and result["mcnemar_p_value"] > 0.05
    assert result["difference_ci95"][0] < 0 < result["difference_ci95"][1]
    assert "not significantly different" in result["verdict"]
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert "McNemar" in html and "data:image/png;base64" in html  # the curves are in the page
    weak = train_fast_mnist(tmp_path, "linear", 0, model="linear")  # ~92% against ~99%
    result = json.loads(run_main("compare", str(a), str(weak), "--json", "--out", str(tmp_path / "cmp2")).stdout)
    assert result["significant"] and result["mcnemar_p_value"] < 1e-10 and result["difference"] > 0.03
    assert result["only_a_right"] > 10 * result["only_b_right"]


def test_compare_refuses_runs_with_different_held_out_images(tmp_path):
    runs = [cnnkit.train(cnnkit.TrainConfig(data="digits", model="linear", epochs=1, seed=s,
                                            out=str(tmp_path / f"r{s}"), report=False), quiet=True).run_dir
            for s in (0, 1)]
    r = run_main("compare", str(runs[0]), str(runs[1]))
    assert r.returncode == 2 and "different test images" in r.stderr and "Traceback" not in r.stderr
