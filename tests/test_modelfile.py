"""The model file: round trip, and refusal of anything tampered with, without executing it."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from cnnkit import CnnkitError, build_model, load_model, read_info, save_model
from cnnkit.models.registry import architecture_record
from conftest import CodePayload, run_main

META = {"class_names": [str(i) for i in range(10)], "input": {"channels": 1, "height": 28, "width": 28},
        "preprocessing": {"mean": [0.13], "std": [0.31], "scale": 255, "resize": "shorter-side-center-crop"}}


def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model("seed-mnist-keras", 10)
    path = save_model(tmp_path / "m.safetensors", model, {**META, "architecture": architecture_record(model)})
    return model, path


def test_round_trip_gives_identical_outputs(tmp_path):
    model, path = saved(tmp_path)
    loaded, meta = load_model(path)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model.eval()(x), loaded(x))
    assert meta.class_names == META["class_names"] and meta.architecture["spec"]["name"] == "seed-mnist-keras"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # written via a temporary name, renamed




def test_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(CodePayload(marker)))
    torch_file = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, torch_file)  # a zip of pickles, as torch.save writes
    for f in (evil, torch_file):
        r = run_main("summary", str(f))
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert "not a cnnkit model file" in r.stderr or "not a valid safetensors" in r.stderr
    with pytest.raises(CnnkitError, match="not a cnnkit model file"):
        load_model(evil)
    assert not marker.exists()


def test_broken_metadata_is_refused(tmp_path):
    model, path = saved(tmp_path)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    bad_json = tmp_path / "bad.safetensors"
    save_file(tensors, bad_json, metadata={"cnnkit": '{"format": "cnnkit-model", '})
    with pytest.raises(CnnkitError, match="invalid JSON"):
        load_model(bad_json)
    missing = tmp_path / "missing.safetensors"
    save_file(tensors, missing, metadata={"cnnkit": json.dumps({"format": "cnnkit-model", "format_version": 1})})
    with pytest.raises(CnnkitError, match="missing architecture"):
        read_info(missing)
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, plain)
    with pytest.raises(CnnkitError, match="without cnnkit metadata"):
        load_model(plain)


def test_weights_that_do_not_fit_the_architecture_are_refused(tmp_path):
    model, path = saved(tmp_path)
    meta = read_info(path)
    other = build_model("seed-mnist-torch", 10)
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, wrong,
              metadata={"cnnkit": json.dumps({"format": "cnnkit-model", **meta.to_dict()})})
    with pytest.raises(CnnkitError, match="do not match"):
        load_model(wrong)


def test_architectures_load_at_their_smallest_inputs(tmp_path):
    """The loader's checks run the model on the meta device in inference mode: BatchNorm on 1x1
    maps (GoogLeNet's last inception at 32 px, ResNet-18 and MobileNetV2 at 8 px) or after a dense
    layer takes a batch of one there, as it does in predict."""
    spec = {"name": "bn-after-dense", "layers": ["flatten", {"dense": 16}, "batchnorm", {"dense": "num_classes"}]}
    cases = [("googlenet", 3, 32), ("resnet18", 3, 8), ("mobilenet_v2", 3, 8), (spec, 1, 8)]
    for name, c, side in cases:
        torch.manual_seed(0)
        model = build_model(name, 10, in_channels=c, image_size=side).eval()
        meta = {**META, "input": {"channels": c, "height": side, "width": side},
                "preprocessing": {**META["preprocessing"], "mean": [0.5] * c, "std": [0.25] * c},
                "architecture": architecture_record(model)}
        path = save_model(tmp_path / "m.safetensors", model, meta)
        loaded, _ = load_model(path)
        x = torch.randn(2, c, side, side)
        assert torch.equal(model(x), loaded(x)), name
