"""Specs, shapes and parameter counts against the notes' published figures and PyTorch itself."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnkit import CnnkitError, build_model, list_models, summary
from cnnkit.models.layers import Pool
from conftest import run_main

SEEDS = {  # name: (input, classes, published total parameters)
    "seed-mnist-keras": ("1x28x28", 10, 93_322),
    "seed-mnist-torch": ("1x28x28", 10, 3_274_634),
    "seed-cifar10": ("3x32x32", 10, 2_397_226),
    "seed-patch64": ("3x64x64", 5, 30_485),
    "mnist-examples": ("1x28x28", 10, 1_199_882),  # pytorch/examples mnist/main.py's Net
}


@pytest.mark.parametrize("name", SEEDS)
def test_summary_json_totals_equal_the_notes(name):
    shape, k, expected = SEEDS[name]
    r = run_main("summary", name, "--input", shape, "--num-classes", str(k), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["total_params"] == expected
    assert sum(layer["params"] for layer in info["layers"]) == expected


def test_cheat_sheet_formulas_per_layer():
    info = summary(build_model("seed-cifar10", 10))
    layers = {l["index"]: l for l in info["layers"]}
    assert layers[1]["params"] == 32 * (3 * 3 * 3 + 1)  # conv F(kw kh d_in + 1)
    assert layers[2]["params"] == 4 * 32 and layers[2]["trainable_params"] == 2 * 32  # batchnorm
    assert layers[5]["params"] == 0  # pooling
    assert layers[18]["params"] == 1024 * (2048 + 1)  # dense d_out (d_in + 1)
    assert layers[1]["macs"] == 32 * 32 * 32 * 27  # H W F (kh kw d_in)
    assert info["trainable_params"] == 2_397_226 - 2 * (32 + 32 + 64 + 64 + 128 + 128)


def test_shapes_follow_the_output_size_formula():
    info = summary(build_model("seed-mnist-torch", 10))
    shapes = [tuple(l["output_shape"]) for l in info["layers"]]
    assert shapes[:5] == [(32, 28, 28), (32, 14, 14), (64, 14, 14), (64, 7, 7), (3136,)]


def test_spec_that_does_not_fit_is_refused_with_layer_and_shape():
    r = run_main("summary", "seed-mnist-keras", "--input", "1x8x8")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "layer 4 (maxpool) on input 64x1x1" in r.stderr


def custom_spec(tmp_path, layers: str) -> str:
    p = tmp_path / "net.yaml"
    p.write_text("input: [1, 12, 12]\nlayers:\n" + layers)
    return str(p)


def test_user_yaml_with_full_same_stride_l2pool_and_overlapping_pools(tmp_path):
    spec = custom_spec(tmp_path, """
  - conv: {filters: 4, kernel: 3, padding: full}      # 12 + 3 - 1 = 14
  - conv: {filters: 4, kernel: 4, stride: 2, padding: same}   # ceil(14 / 2) = 7
  - l2pool: {size: 3, stride: 1}                      # overlapping: 7 - 3 + 1 = 5
  - maxpool: {size: 3, stride: 2}                     # (5 - 3) / 2 + 1 = 2
  - flatten
  - dense: {units: num_classes, activation: softmax}  # softmax on the last layer is dropped: logits out
""")
    model = build_model(spec, 3)
    info = summary(model)
    assert ([tuple(l["output_shape"]) for l in info["layers"]]
            == [(4, 14, 14), (4, 7, 7), (4, 5, 5), (4, 2, 2), (16,), (3,)])
    out = model(torch.randn(5, 1, 12, 12))
    assert out.shape == (5, 3) and not torch.allclose(out.exp().sum(1), torch.ones(5))  # logits, not probabilities


def test_same_padding_with_stride_matches_tensorflow_rule():
    # TensorFlow pads (k - 1 - (n - 1) % s) split with the extra pixel after; n=7, k=4, s=2 -> 1 before, 2 after
    from cnnkit.models.layers import same_padding
    assert same_padding(7, 4, 2) == (1, 2)
    assert same_padding(28, 3, 1) == (1, 1)
    assert same_padding(8, 2, 2) == (0, 0)


def test_l2_pool_matches_direct_formula_and_has_finite_gradients():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    x[0, 0] = 0  # an all-zero window: nn.LPPool2d gives NaN gradients here
    x.requires_grad_(True)
    pool = Pool("l2", 2, 1, (0, 0), (0, 0))
    y = pool(x)
    ref = torch.sqrt(F.avg_pool2d(x.detach() ** 2, 2, 1) * 4)
    assert torch.allclose(y, ref, atol=1e-12)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_relu_after_max_pooling_is_the_same_function_as_before_it(tmp_path):
    """fast-mnist pools before its ReLUs (a quarter of the values to rectify): max pooling and ReLU
    commute, so with the same weights both orders give the same logits and the same gradients."""
    after = build_model(custom_spec(tmp_path, """
  - conv: {filters: 4, kernel: 3, padding: same, activation: none}
  - maxpool: 2
  - activation: relu
  - batchnorm
  - flatten
  - dense: {units: num_classes}
"""), 3).double()
    (tmp_path / "net.yaml").unlink()
    before = build_model(custom_spec(tmp_path, """
  - conv: {filters: 4, kernel: 3, padding: same}
  - maxpool: 2
  - batchnorm
  - flatten
  - dense: {units: num_classes}
"""), 3).double()
    assert len(after.layers) == len(before.layers) + 1
    for a, b in zip(after.parameters(), before.parameters()):  # the same shapes in the same order
        a.data.copy_(b.data)
    x = torch.randn(6, 1, 12, 12, dtype=torch.float64)
    out_a, out_b = after(x), before(x)
    assert torch.allclose(out_a, out_b, atol=1e-12)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    for a, b in zip(after.parameters(), before.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)


@pytest.mark.parametrize("bad,match", [
    ("  - conv: {filters: 4, kernel: 3, padding: wide}\n  - flatten\n  - dense: {units: num_classes}\n", "padding"),
    ("  - convolution: 4\n", "unknown layer type"),
    ("  - conv: {filters: 4, size: 3}\n", "unknown parameter"),
    ("  - dense: 10\n", "flat input"),
    ("  - flatten\n  - dense: {units: 7}\n", "classes"),
    ("  - conv: {filters: 4, activation: swishy}\n", "activation"),
    ("  - activation: softmax\n  - flatten\n  - dense: {units: 3}\n", "activation"),
])
def test_bad_specs_are_refused_clearly(tmp_path, bad, match):
    with pytest.raises(CnnkitError, match=match):
        build_model(custom_spec(tmp_path, bad), 3)


@pytest.mark.slow  # over 7 s: the fast subset (-m 'not slow') stays under 3 minutes
def test_every_registered_model_trains_one_step():
    for entry in list_models():
        c, h, w = entry["input"] or (1, 28, 28)
        model = build_model(entry["name"], 10, in_channels=c, image_size=(h, w))
        x = torch.randn(4, c, h, w)
        loss = F.cross_entropy(model(x), torch.arange(4))
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]  # speedrun freezes some
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), entry["name"]


def test_model_is_plain_module_returning_logits():
    model = build_model("seed-mnist-keras", 10)
    assert isinstance(model, nn.Module)
    assert not any(isinstance(m, (nn.Softmax, nn.LogSoftmax)) for m in model.modules())
