"""`cnnkit math` and `summary --formulas` reproduce the notes' worked examples, in text and JSON."""
from __future__ import annotations

import json

import pytest

from conftest import run_main as run_cli
from test_reference import MAXPOOLED, X1, X2


def math_json(*args):
    r = run_cli("math", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("n,m,p,s,o", [(10, 5, 2, 1, 10), (10, 3, 2, 2, 6)])
def test_output_size_with_formula(n, m, p, s, o):
    r = run_cli("math", "conv", "--n", str(n), "--m", str(m), "--padding", str(p), "--stride", str(s))
    assert f"⌊({n} + 2·{p} − {m}) / {s}⌋ + 1 = {o}" in r.stdout
    assert math_json("conv", "--n", str(n), "--m", str(m), "--padding", str(p), "--stride", str(s))["output_size"] == o


def test_padding_table():
    t = math_json("conv", "--n", "7", "--m", "3")["stride1_table"]
    assert t == {"valid": 7 - 3 + 1, "same": 7, "full": 7 + 3 - 1}
    assert math_json("conv", "--n", "7", "--m", "3", "--padding", "full")["output_size"] == 9


def test_convolution_step_by_step_and_picture(tmp_path):
    picture = tmp_path / "steps.png"
    r = math_json("conv", "--input", "1 2 3; 4 5 6; 7 8 9", "--kernel", "1 0; 0 -1", "--mode", "convolution",
                  "--padding", "full", "--picture", str(picture))
    assert r["kernel_used"] == [[-1, 0], [0, 1]]  # rotated by 180°
    import numpy as np
    import scipy.signal
    expected = scipy.signal.convolve2d(np.arange(1, 10).reshape(3, 3), [[1, 0], [0, -1]], "full")
    assert r["output_shape"] == [4, 4] and r["output"] == expected.tolist()
    assert len(r["steps"]) == 16 and picture.read_bytes()[:4] == b"\x89PNG"
    text = run_cli("math", "conv", "--input", "1 2 3; 4 5 6; 7 8 9", "--kernel", "1 0; 0 -1").stdout
    assert "out[0,0] = 1·1 + 2·0 + 4·0 + 5·(-1) = -4" in text


def test_max_pool_worked_example():
    for x in (X1, X2):
        values = "; ".join(" ".join(str(v) for v in row) for row in x)
        assert math_json("pool", "--input", values, "--size", "2")["output"] == MAXPOOLED.tolist()
    assert math_json("pool", "--n", "6", "--size", "3", "--stride", "1")["output_size"] == 4  # overlapping


def test_shapes_of_the_pytorch_mnist_network():
    r = math_json("shapes", "seed-mnist-torch", "--input", "4x1x28x28")
    shapes = [l["shape"] for l in r["layers"]]
    assert [4, 64, 7, 7] in shapes and [4, 3136] in shapes and shapes[-1] == [4, 10]
    assert "[4, 64, 7, 7] → [4, 3136]" in r["chain"]


def test_conv_against_dense_parameter_comparison():
    r = math_json("params", "--input", "3x32x32", "--filters", "64", "--kernel", "5")
    assert r["conv_weights"] == 4_800 and r["conv_biases"] == 64 and r["output"] == [64, 28, 28]
    assert r["dense_weights"] == 3_072 * 50_176 and round(r["dense_weights"] / 1e6) == 154


def test_cross_entropy_examples_both_ways():
    b = math_json("loss", "--logits", "0.8", "--target", "1")
    assert round(b["from_probabilities"], 4) == round(b["from_logits"], 4) == 0.3711
    c = math_json("loss", "--logits", "1.5", "0.8", "2.1", "--target", "2")
    assert round(c["from_probabilities"], 4) == round(c["from_logits"], 4) == 0.5996


def test_summary_formulas():
    r = run_cli("summary", "seed-cifar10", "--formulas")
    assert "F·(kh·kw·d_in + 1) = 32·(3·3·3 + 1) = 896" in r.stdout
    assert "4·d_in = 4·32 = 128 (64 trainable)" in r.stdout
    assert "d_out·(d_in + 1) = 1024·(2048 + 1) = 2,098,176" in r.stdout
    layers = json.loads(run_cli("summary", "seed-cifar10", "--json").stdout)["layers"]
    assert all("formula" in l for l in layers)


@pytest.mark.parametrize("args,msg", [
    (["conv", "--n", "3", "--m", "5"], "does not fit"),
    (["conv", "--input", "1 2; 3", "--kernel", "1"], "same number of values"),
    (["conv", "--n", "5", "--m", "3", "--padding", "wide"], "padding"),
    (["loss", "--logits", "1", "2", "--target", "5"], "class index"),
    (["shapes", "seed-mnist-keras", "--input", "4x1x8x8"], "layer 4 (maxpool)"),
])
def test_math_errors_are_one_line(args, msg):
    r = run_cli("math", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and msg in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
