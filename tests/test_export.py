"""export: ONNX and torch.export with preprocessing inside, checked against PyTorch; predict on every
runtime; an ONNX file used from a script that has only onnxruntime, NumPy and Pillow."""
from __future__ import annotations

import csv
import functools
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
    assert info["why"].startswith("measured now") and info["runtime"] in ("onnx", "torch", "openvino")
    record = json.loads(next((runtimes.exports_dir()).glob("*.runtime.json")).read_text())
    # int8 needs the model's data (none here: refused and said); OpenVINO takes part where installed
    assert {"onnx", "torch"} <= set(record["images_per_second"]) <= {"onnx", "torch", "openvino"}
    assert record["runtime"] == info["runtime"] and record["int8"].startswith("int8 not used")
    rows2, info2 = predict.predict_files(path, [str(png)])
    assert info2["why"].startswith("measured before") and rows2 == rows

    def broken(*args, **kwargs):
        raise cnnkit.CnnkitError("onnx export failed: an op it cannot write")
    monkeypatch.setattr(cnnkit.export, "export", broken)
    other = model_file(tmp_path / "o", "seed-mnist-keras", 1, 28, None, seed=3)
    rows3, info3 = predict.predict_files(other, [str(png)])
    assert info3["runtime"] == "torch" and "no ONNX export" in info3["why"] and "labels" in rows3[0]


# ----------------------------------------------------------------------------- multi-label models
@functools.lru_cache(maxsize=1)  # decoding the label file takes seconds; the tests only read what it returns
def multi_label_test_split(run_folder, labels):
    """(model, info, test split) of the multi_label_run fixture: uint8 images (N, 1, 56, 56), truth (N, K)."""
    from cnnkit.evaluate import load_split_for
    model, info = cnnkit.load_model(run_folder)
    split, _ = load_split_for(info, str(labels), "test")
    return model, info, split


def multi_label_outputs(path, fmt: str, nhwc: torch.Tensor) -> tuple[list[np.ndarray], dict]:
    """Every output of an export on uint8 (N, H, W, C), read by what a client would use, and its metadata."""
    if fmt == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        assert names == ["probabilities", "labels"]
        return session.run(None, {"images": nhwc.numpy()}), json.loads(
            session.get_modelmeta().custom_metadata_map["cnnkit"])
    from cnnkit.export import load_torch_export
    module, meta = load_torch_export(path)
    with torch.no_grad():
        return [t.numpy() for t in module(nhwc)], meta


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_a_multi_label_export_gives_sigmoids_and_decides_at_the_model_files_thresholds(multi_label_run, tmp_path,
                                                                                      fmt):
    import dataclasses

    from cnnkit.preprocess import Preprocess
    run_folder, labels = multi_label_run
    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt2")
    r = run_main("export", str(run_folder), "--format", fmt, "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)  # parity on the validation split: the same label set for every image
    assert result["passed"] and result["task"] == "multi-label" and result["agreement_on"] == "label set"
    assert result["agreement"] == 1.0 and result["max_abs_diff"] <= 1e-4 and "validation images" in result["checked_on"]
    model, info, split = multi_label_test_split(run_folder, labels)
    images = split.images[:128]  # uint8 (128, 1, 56, 56)
    (probs, decided), meta = multi_label_outputs(out, fmt, images.permute(0, 2, 3, 1).contiguous())
    with torch.no_grad():  # the reference: the model file in PyTorch eager, one sigmoid per label
        expected = torch.sigmoid(model(Preprocess.from_info(info)(images))).numpy()
    assert probs.dtype == np.float32 and probs.shape == (128, 10) and np.abs(probs - expected).max() < 1e-4
    assert decided.dtype == np.bool_ and np.array_equal(decided, probs >= np.array(info.thresholds))
    assert 0 < decided.sum() < decided.size and decided.any(1).mean() > 0.9  # decisions, not all-on or all-off
    assert (decided == split.labels[:128].numpy().astype(bool)).mean() > 0.9  # and mostly the truth
    assert meta["task"] == "multi-label" and meta["thresholds"] == info.thresholds
    assert meta["outputs"] == {"probabilities": "float32", "labels": "bool"}
    back = cnnkit.ModelInfo.from_export(meta, where=str(out))
    assert back.task == "multi-label" and back.thresholds == info.thresholds and back.class_names == info.class_names
    # The proof checks decisions too: thresholds other than the export's change label sets, not probabilities.
    other = dataclasses.replace(info, thresholds=[min(1.0, t + 0.2) for t in info.thresholds])
    check = parity(model, other, out, fmt, images)
    assert not check["passed"] and check["agreement"] < 1 and check["max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_predict_on_the_onnx_runtime_gives_torchs_label_sets(multi_label_run, tmp_path, monkeypatch):
    import cnnkit.runtimes as runtimes
    run_folder, labels = multi_label_run
    model, info, split = multi_label_test_split(run_folder, labels)
    paths = split.paths[:16]
    rows = {}
    for runtime in ("torch", "onnx", "auto"):
        if runtime == "auto":
            monkeypatch.setattr(runtimes, "MEASURE_FROM_FILES", 1)  # measure on this small job, with the cached export

            def no_int8(*args, **kwargs):  # the float runtimes' parity is what this test is about (int8: test_int8.py)
                raise cnnkit.CnnkitError("int8 left out of this test")
            monkeypatch.setattr(runtimes, "cached_int8", no_int8)
        r = run_main("predict", str(run_folder), *paths, "--runtime", runtime, "--json")
        assert r.returncode == 0, r.stderr
        rows[runtime] = json.loads(r.stdout)
    onnx_file = next(p for p in runtimes.exports_dir().glob("*.onnx") if ".int8" not in p.name)  # export.export's
    r = run_main("predict", str(onnx_file), *paths, "--json")  # the file itself: its thresholds from its metadata
    assert r.returncode == 0, r.stderr
    rows["file"] = json.loads(r.stdout)
    thresholds = np.array(info.thresholds)
    checked = 0
    for i, ours in enumerate(rows["torch"]):
        p = np.array([ours["label_probabilities"][n] for n in info.class_names])
        for other in ("onnx", "auto", "file"):
            theirs = rows[other][i]
            assert theirs["path"] == ours["path"]
            assert [theirs["label_probabilities"][n] for n in info.class_names] == pytest.approx(p.tolist(), abs=1e-5)
            if np.abs(p - thresholds).min() > 1e-4:  # no label on the edge of its threshold
                assert theirs["labels"] == ours["labels"] and theirs["probabilities"] == pytest.approx(
                    ours["probabilities"], abs=1e-5)
                checked += other == "onnx"
    assert checked >= 14 and sum(len(row["labels"]) for row in rows["torch"]) >= 16  # 1-3 digits an image


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_a_binary_export_gives_calibrated_probabilities_and_the_decided_class(binary_run, tmp_path, fmt):
    """A binary model's graph: (1 - p, p) with p = sigmoid(z / T) from its one logit z, and the class
    its threshold decides; the parity proof compares those decisions; ONNX predict decides alike."""
    from cnnkit.evaluate import load_split_for
    from cnnkit.preprocess import Preprocess
    run_folder, labels = binary_run
    out = tmp_path / ("b.onnx" if fmt == "onnx" else "b.pt2")
    r = run_main("export", str(run_folder), "--format", fmt, "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["passed"] and result["task"] == "binary" and result["agreement_on"] == "decided class"
    model, info = cnnkit.load_model(run_folder)
    split, _ = load_split_for(info, str(labels), "test")
    pick = torch.arange(0, len(split), 3)[:128]  # both classes: the split is in class order, as a folder's
    images = split.images[pick]
    (probs, decided), meta = multi_label_outputs(out, fmt, images.permute(0, 2, 3, 1).contiguous())
    with torch.no_grad():
        p = torch.sigmoid(model(Preprocess.from_info(info)(images))[:, 0] / info.temperature).numpy()
    assert probs.shape == (128, 2) and np.abs(probs[:, 1] - p).max() < 1e-4 and np.abs(probs.sum(1) - 1).max() < 1e-5
    second = p >= info.thresholds[0]
    assert decided.dtype == np.bool_ and np.array_equal(decided, np.stack([~second, second], 1))
    assert 0.3 < second.mean() < 0.7  # both classes decided: 4s and 9s
    assert meta["task"] == "binary" and meta["thresholds"] == info.thresholds
    if fmt == "onnx":
        r = run_main("predict", str(out), *[split.paths[i] for i in pick[:16]], "--json")
        assert r.returncode == 0, r.stderr
        assert [row["labels"][0] for row in json.loads(r.stdout)] == [
            info.class_names[int(d)] for d in second[:16]]


def test_the_graphs_float32_thresholds_decide_as_the_model_files_float64_ones():
    from cnnkit.export import decision_thresholds
    from cnnkit.modelfile import InputShape, ModelInfo, Preprocessing
    t64 = np.concatenate([[0.7, 0.3, 0.5], np.random.default_rng(0).random(61)])  # 0.7's nearest float32 lies below
    info = ModelInfo(architecture={}, class_names=[str(k) for k in range(64)], input=InputShape(1, 8, 8),
                     preprocessing=Preprocessing(mean=[0.5], std=[0.2]), task="multi-label", thresholds=t64.tolist())
    t32 = decision_thresholds(info)
    assert t32.dtype == np.float32 and float(np.float32(0.7)) < 0.7 < float(t32[0])
    p = t64.astype(np.float32)[None, :] + np.arange(-3, 4)[:, None] * np.spacing(t64.astype(np.float32))  # (7, 64)
    p = p.astype(np.float32)  # the float32 probabilities around each threshold, the nearest one included
    assert np.array_equal(p >= t32, p.astype(np.float64) >= t64)
    assert not np.array_equal(p >= t64.astype(np.float32), p.astype(np.float64) >= t64)  # plain rounding would not
