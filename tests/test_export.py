"""export: ONNX and torch.export with preprocessing inside, checked against PyTorch; predict on every
runtime; an ONNX file used from a script that has only onnxruntime, NumPy and Pillow."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit.export import Deployable, export, parity
from cnnkit.models.registry import architecture_record, build_model, get_spec
from conftest import run_main, shared

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def model_file(tmp_path, name: str, channels: int, size: int, data: str | None, seed: int = 0):
    """A model file of `name` with seeded random weights, BatchNorm statistics made non-trivial
    (one training-mode pass) and a calibration temperature, as a trained run would leave it."""
    torch.manual_seed(seed)
    model = build_model(get_spec(name), 10, in_channels=channels, image_size=(size, size))
    with torch.no_grad():  # running statistics that differ from the defaults, so the export must carry them
        model.train()(torch.randn(16, channels, size, size) * 0.5)
    meta = {"class_names": [str(i) for i in range(10)] if channels == 1 else CIFAR_CLASSES,
            "input": {"channels": channels, "height": size, "width": size},
            "preprocessing": {"mean": [0.13] * channels, "std": [0.31] * channels, "scale": 255,
                              "resize": "shorter-side-center-crop"},
            "architecture": architecture_record(model), "calibration": {"temperature": 1.7}}
    if data:
        meta["data"] = {"name": data}
        meta["training"] = {"data_dir": str(shared())}
    return cnnkit.save_model(tmp_path / f"{name}.safetensors", model, meta)


@pytest.mark.slow
@pytest.mark.parametrize("name,channels,size,data", [
    ("seed-mnist-torch", 1, 28, "mnist"), ("seed-mnist-keras", 1, 28, "mnist"), ("seed-cifar10", 3, 32, None),
    ("seed-patch64", 3, 64, None), ("resnet18", 3, 32, None), ("efficientnet_lite0", 3, 64, None)])
def test_exports_pass_the_parity_check(tmp_path, name, channels, size, data):
    path = model_file(tmp_path, name, channels, size, data)
    images = [] if data else ["--images", str(shared("cifar10-jpeg", "test", "cat")),
                              str(shared("cifar10-jpeg", "test", "ship"))]
    for fmt, suffix in (("onnx", ".onnx"), ("torch-export", ".pt2")):
        r = run_main("export", str(path), "--format", fmt, "--json", *images)
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        assert result["passed"] and result["agreement"] == 1.0 and result["max_abs_diff"] <= 1e-4
        assert result["n"] == 256 and result["out"].endswith(suffix)
        assert ("validation images of mnist" in result["checked_on"]) == bool(data)


def test_export_holds_preprocessing_calibration_and_metadata(tmp_path):
    import onnxruntime as ort

    path = model_file(tmp_path, "seed-mnist-keras", 1, 28, None)
    model, meta = cnnkit.load_model(path)
    out = export(model, meta, "onnx", tmp_path / "m.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    info = json.loads(session.get_modelmeta().custom_metadata_map["cnnkit"])
    assert info["class_names"] == meta.class_names and info["input"]["layout"] == "NHWC"
    assert info["calibration"]["temperature"] == 1.7 and info["preprocessing"]["mean"] == [0.13]
    # The graph maps raw pixels to softmax(model((x/255 - mean)/std) / T), for any batch size.
    pixels = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = torch.softmax(model(((pixels.float() / 255 - 0.13) / 0.31)) / 1.7, 1).numpy()
    got = session.run(None, {"images": pixels.permute(0, 2, 3, 1).numpy()})[0]
    assert got.shape == (5, 10) and np.abs(got - expected).max() < 1e-5
    # The check is a real one: another model's weights against this export fail it.
    other, _ = cnnkit.load_model(model_file(tmp_path / "b", "seed-mnist-keras", 1, 28, None, seed=1))
    assert not parity(other, meta, out, "onnx", pixels)["passed"]
    assert parity(model, meta, out, "onnx", pixels)["passed"]


def test_export_needs_images_when_the_dataset_is_unknown(tmp_path):
    path = model_file(tmp_path, "seed-mnist-keras", 1, 28, None)
    r = run_main("export", str(path))
    assert r.returncode == 2 and "--images" in r.stderr and "Traceback" not in r.stderr
    r = run_main("export", str(path), "--images", str(tmp_path / "nothing-here.png"))
    assert r.returncode == 2 and "could be decoded" in r.stderr


STANDALONE = ('''
import json, sys
import numpy as np, onnxruntime as ort
from PIL import Image
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
info = json.loads(session.get_modelmeta().custom_metadata_map["cnnkit"])
pixels = np.asarray(Image.open(sys.argv[2]).convert("L" if info["input"]["channels"] == 1 else "RGB"), dtype=np.uint8)
pixels = pixels.reshape(1, pixels.shape[0], pixels.shape[1], -1)  # (1, H, W, C), as decoded
probabilities = session.run(None, {session.get_inputs()[0].name: pixels})[0][0]
print(json.dumps({"label": info["class_names"][int(probabilities.argmax())], '''
              '''"probability": float(probabilities.max())}))
''')


def test_onnx_file_alone_gives_the_label_cnnkit_predict_gives(tmp_path):
    run = cnnkit.train(cnnkit.TrainConfig(data="digits", model="seed-digits", epochs=8, out=str(tmp_path / "run"),
                                          report=False), quiet=True)
    ds = run.dataset
    r = run_main("export", str(run.run_dir), "--out", str(tmp_path / "digits.onnx"))
    assert r.returncode == 0 and "passed" in r.stdout, r.stderr
    script = tmp_path / "client.py"
    script.write_text(STANDALONE)
    right = 0
    for i in range(8):
        png = tmp_path / f"digit{i}.png"
        Image.fromarray(ds.test.images[i, 0].numpy()).save(png)
        out = subprocess.run([sys.executable, str(script), str(tmp_path / "digits.onnx"), str(png)],
                             capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        theirs = json.loads(out.stdout)
        ours = json.loads(run_main("predict", str(run.run_dir), str(png), "--json", "--runtime", "torch").stdout)[0]
        assert (theirs["label"] == ours["labels"][0]
                and theirs["probability"] == pytest.approx(ours["probabilities"][0], abs=1e-5))
        right += theirs["label"] == str(int(ds.test.labels[i]))
    assert right >= 7  # and the labels are digits' labels, not noise
    assert "import cnnkit" not in STANDALONE and "from cnnkit" not in STANDALONE


def test_predict_runtimes_agree_and_out_prints_one_line(tmp_path):
    path = model_file(tmp_path, "seed-patch64", 3, 32, None)
    folder = shared("cifar10-jpeg", "test", "cat")  # 1,000 files: the decoding pool runs
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "truncated.jpg").write_bytes((folder / "0001.jpg").read_bytes()[:200])
    rows = {}
    for runtime in ("torch", "onnx"):
        out = tmp_path / f"{runtime}.csv"
        r = run_main("predict", str(path), str(folder), str(tmp_path / "bad"), "--runtime", runtime, "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert len(r.stdout.strip().splitlines()) == 1 and "1,000 of 1,001 file(s) classified" in r.stdout
        assert f"runtime {runtime}" in r.stdout and "1 of 1001 file(s) could not be read" in r.stderr
        rows[runtime] = list(csv.DictReader(out.open()))
    assert len(rows["torch"]) == len(rows["onnx"]) == 1001
    for a, b in zip(rows["torch"], rows["onnx"]):
        assert a["path"] == b["path"] and a["label_1"] == b["label_1"] and a["error"] == b["error"]
        if not a["error"]:
            assert abs(float(a["probability_1"]) - float(b["probability_1"])) < 1e-5
    assert sum(bool(a["error"]) for a in rows["torch"]) == 1
    # The ONNX file itself is a model argument too.
    model, meta = cnnkit.load_model(path)
    export(model, meta, "onnx", tmp_path / "m.onnx")
    r = run_main("predict", str(tmp_path / "m.onnx"), str(folder / "0001.jpg"), "--json")
    assert json.loads(r.stdout)[0]["labels"][0] == rows["torch"][1]["label_1"]


def test_predict_with_onnx_never_imports_torch(tmp_path):
    path = model_file(tmp_path, "seed-patch64", 3, 32, None)
    model, meta = cnnkit.load_model(path)
    export(model, meta, "onnx", tmp_path / "m.onnx")
    code = ("import sys; from cnnkit.cli import main; "
            f"code = main(['predict', {str(tmp_path / 'm.onnx')!r}, "
            f"{str(shared('cifar10-jpeg', 'test', 'cat', '0001.jpg'))!r}]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "0001.jpg" in r.stdout


def test_deployable_matches_the_inference_layer():
    torch.manual_seed(0)
    model = build_model(get_spec("seed-cifar10"), 10, in_channels=3, image_size=(32, 32)).eval()
    meta = cnnkit.ModelInfo.from_dict({
        "preprocessing": {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}, "calibration": {"temperature": 2.0},
        "input": {"channels": 3, "height": 32, "width": 32}, "class_names": [str(i) for i in range(10)],
        "architecture": {}})
    pixels = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    expected = cnnkit.probabilities(model, meta, pixels)
    with torch.no_grad():
        got = Deployable(model, meta)(pixels.permute(0, 2, 3, 1)).numpy()
    assert np.abs(got - expected).max() < 1e-6


def test_auto_runtime_measures_once_and_falls_back_when_export_fails(tmp_path, monkeypatch):
    import cnnkit.export
    import cnnkit.jobs.predict as predict
    import cnnkit.runtimes as runtimes
    monkeypatch.setattr(runtimes, "MEASURE_FROM_FILES", 1)  # measure on this small job
    path = model_file(tmp_path, "seed-mnist-keras", 1, 28, None)
    png = tmp_path / "d.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    rows, info = predict.predict_files(path, [str(png)])
    assert info["why"].startswith("measured now") and info["runtime"] in ("onnx", "torch")
    record = json.loads(next((runtimes.exports_dir()).glob("*.runtime.json")).read_text())
    assert set(record["images_per_second"]) == {"onnx", "torch"} and record["runtime"] == info["runtime"]
    rows2, info2 = predict.predict_files(path, [str(png)])
    assert info2["why"].startswith("measured before") and rows2 == rows

    def broken(*args, **kwargs):
        raise cnnkit.CnnkitError("onnx export failed: an op it cannot write")
    monkeypatch.setattr(cnnkit.export, "export", broken)
    other = model_file(tmp_path / "o", "seed-mnist-keras", 1, 28, None, seed=3)
    rows3, info3 = predict.predict_files(other, [str(png)])
    assert info3["runtime"] == "torch" and "no ONNX export" in info3["why"] and "labels" in rows3[0]
