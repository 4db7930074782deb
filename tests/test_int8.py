"""int8 ONNX export (`cnnkit export --int8`, quantize.py) and the int8 runtime: the proof it records is
what an independent run of the file measures, a plain onnxruntime script agrees with `cnnkit predict`,
and a model built to quantize badly is refused."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
from conftest import run_main

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
# every test here reads the session's fast MNIST run (about 10 s to train): out of the fast subset
pytestmark = pytest.mark.slow


def mnist_test_split(info):
    from cnnkit.evaluate import load_split_for
    split, _ = load_split_for(info, info.training["data"], "test")
    return split.images.permute(0, 2, 3, 1).contiguous().numpy(), split.labels.numpy()


@pytest.fixture(scope="module")
def int8_export(fast_mnist_run, tmp_path_factory):
    """(path, the export's JSON result) of `cnnkit export --int8` on the fast MNIST run."""
    out = tmp_path_factory.mktemp("int8") / "fast-mnist.int8.onnx"
    r = run_main("export", str(fast_mnist_run[0]), "--int8", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_int8_proof_is_what_the_file_does(int8_export, fast_mnist_run):
    import onnxruntime as ort
    from statsmodels.stats.contingency_tables import mcnemar
    path, result = int8_export
    proof = result["proof"]
    model, info = cnnkit.load_model(fast_mnist_run[0])
    images, labels = mnist_test_split(info)
    assert proof["n"] == len(labels) == 10_000 and proof["passed"] and result["fp32_parity"]["passed"]
    # the int8 file, run here independently, is right exactly where the proof says
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    int8_right = np.concatenate([session.run(None, {"images": images[i:i + 500]})[0].argmax(1)
                                 for i in range(0, len(images), 500)]) == labels
    assert proof["accuracy_int8"] == pytest.approx(int8_right.mean(), abs=0)
    # the float side is the model file's own answers (PyTorch fp32; the fp32 export equals it to 1e-4)
    float_right = cnnkit.probabilities(model, info, torch.from_numpy(images).permute(0, 3, 1, 2)).argmax(1) == labels
    assert abs(proof["accuracy_fp32"] - float_right.mean()) <= 2 / len(labels)
    assert proof["drop_points"] <= 0.5  # the bar for MNIST models
    b, c = int((int8_right & ~float_right).sum()), int((~int8_right & float_right).sum())
    assert abs(b - proof["only_int8_right"]) + abs(c - proof["only_fp32_right"]) <= 2
    reference = mcnemar([[0, proof["only_int8_right"]], [proof["only_fp32_right"], 0]], exact=True).pvalue
    assert proof["mcnemar_p_value"] == pytest.approx(reference, rel=1e-9)
    # the record travels in the file, with how it was quantized; the weights are int8
    meta = json.loads(session.get_modelmeta().custom_metadata_map["cnnkit"])
    assert meta["int8"]["proof"] == proof and meta["int8"]["format"] == "QDQ"
    graph = onnx.load(str(path)).graph
    assert any(n.op_type == "DequantizeLinear" for n in graph.node)
    sizes = {t.name: (t.data_type, int(np.prod(t.dims))) for t in graph.initializer}
    int8 = sum(n for kind, n in sizes.values() if kind == onnx.TensorProto.INT8)
    assert int8 >= 0.95 * sum(p.numel() for p in model.parameters())  # nearly every weight is stored in int8


PLAIN_CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np, onnxruntime as ort
    from PIL import Image
    session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["cnnkit"])
    h, w, c = meta["input"]["height"], meta["input"]["width"], meta["input"]["channels"]
    images = np.stack([np.asarray(Image.open(p).convert("L" if c == 1 else "RGB").resize((w, h))).reshape(h, w, c)
                       for p in sys.argv[2:]])
    probs = session.run(None, {session.get_inputs()[0].name: images})[0]
    print(json.dumps({"labels": [meta["class_names"][k] for k in probs.argmax(1)], "top": probs.max(1).tolist()}))
""")


def test_plain_onnxruntime_script_agrees_with_cnnkit_predict(int8_export, fast_mnist_run, tmp_path):
    path, _ = int8_export
    images, labels = mnist_test_split(cnnkit.read_info(fast_mnist_run[0]))
    files = []
    for i in range(24):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(images[i, :, :, 0]).save(files[-1])
    script = tmp_path / "client.py"
    script.write_text(PLAIN_CLIENT)
    plain = subprocess.run([sys.executable, str(script), str(path), *map(str, files)], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    assert "cnnkit" not in (tmp_path / "client.py").read_text().replace('"cnnkit"', "")  # no cnnkit import
    client = json.loads(plain.stdout)
    r = run_main("predict", str(path), *map(str, files), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["labels"][0] for row in rows] == client["labels"]
    assert np.allclose([row["probabilities"][0] for row in rows], client["top"], atol=1e-6)
    assert np.mean([lab == str(t) for lab, t in zip(client["labels"], labels[:24])]) >= 0.9


def test_int8_runtime_is_measured_and_forced(fast_mnist_run, tmp_path, monkeypatch):
    import cnnkit.jobs.predict as predict
    import cnnkit.runtimes as runtimes
    images, _ = mnist_test_split(cnnkit.read_info(fast_mnist_run[0]))
    files = []
    for i in range(4):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(images[i, :, :, 0]).save(files[-1])
    monkeypatch.setattr(runtimes, "MEASURE_FROM_FILES", 1)  # measure on this small job
    rows, how = predict.predict_files(fast_mnist_run[0], files)
    record = json.loads(next(runtimes.exports_dir().glob("*.runtime.json")).read_text())
    measured = set(record["images_per_second"])  # OpenVINO's two take part where the extra is installed
    assert {"torch", "onnx", "int8"} <= measured <= {"torch", "onnx", "int8", "openvino", "openvino-int8"}
    assert record["int8"] == "measured"
    assert how["runtime"] == max(record["images_per_second"], key=record["images_per_second"].get)
    forced, how = predict.predict_files(fast_mnist_run[0], files, runtime="int8")
    assert how["runtime"] == "int8" and [r["labels"] for r in forced] == [r["labels"] for r in rows]
    # prediction sets are calibrated on float probabilities: int8 left out of auto, refused when forced
    _, how = predict.predict_files(fast_mnist_run[0], files, coverage=0.95)
    assert "int8" not in how["runtime"]
    with pytest.raises(cnnkit.CnnkitError, match="calibrated"):
        predict.predict_files(fast_mnist_run[0], files, runtime="int8", coverage=0.95)
    int8_file = next(runtimes.exports_dir().glob("*.int8-ort*.onnx"))  # an int8 .onnx given as the model
    assert runtimes.choose_runtime(int8_file, None, "auto", False, False)[0].name == "int8"
    from cnnkit.cli.common import RUNTIMES
    assert RUNTIMES == runtimes.RUNTIMES  # the CLI's choices, written out there
    if runtimes.openvino_available():  # the optional extra (in the test set): fp32 as PyTorch's, int8 as ORT's
        torch_rows, _ = predict.predict_files(fast_mnist_run[0], files, runtime="torch")
        for name, reference, tolerance in (("openvino", torch_rows, 1e-4), ("openvino-int8", forced, 1e-3)):
            got, how = predict.predict_files(fast_mnist_run[0], files, runtime=name)
            assert how["runtime"] == name and [r["labels"][0] for r in got] == [r["labels"][0] for r in reference]
            assert np.allclose([r["probabilities"][0] for r in got], [r["probabilities"][0] for r in reference],
                               atol=tolerance)


def badly_quantizing(model: torch.nn.Module) -> torch.nn.Module:
    """The same function with one channel of the second conv's input 10,000x larger (its BatchNorm's
    scale and shift times 1e4, the conv's weights for it divided by 1e4): an outlier channel, which
    per-tensor activation ranges cannot hold together with the others."""
    layers = model.layers
    bn = next(m for m in layers if isinstance(m, torch.nn.BatchNorm2d))
    conv = next(m.conv for m in list(layers)[list(layers).index(bn):] if hasattr(m, "conv"))
    with torch.no_grad():
        bn.weight[0] *= 1e4
        bn.bias[0] *= 1e4
        conv.weight[:, 0] /= 1e4
    return model


def test_badly_quantizing_model_is_refused_and_no_file_kept(fast_mnist_run, tmp_path):
    model, info = cnnkit.load_model(fast_mnist_run[0])
    images, _ = mnist_test_split(info)
    x = torch.from_numpy(images[:2000]).permute(0, 3, 1, 2)
    before = cnnkit.probabilities(model, info, x)
    bad = badly_quantizing(model)
    assert (cnnkit.probabilities(bad, info, x).argmax(1) == before.argmax(1)).all()  # the same classifier in fp32
    cnnkit.save_model(tmp_path / "bad" / "model.safetensors", bad, info)
    out = tmp_path / "bad.int8.onnx"
    r = run_main("export", str(tmp_path / "bad"), "--int8", "--out", str(out))
    assert r.returncode == 2 and "int8 lost" in r.stderr and "--max-accuracy-drop" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    assert not [p for p in tmp_path.iterdir() if "int8" in p.name]  # no temporary (.bad.int8.*.tmp) left either
    # the int8 runtime builds the same export, refuses it in one line, and remembers the refusal
    import cnnkit.jobs.predict as predict
    import cnnkit.runtimes as runtimes
    Image.fromarray(images[0, :, :, 0]).save(tmp_path / "d.png")
    for _ in range(2):  # built and refused, then the refusal read back
        with pytest.raises(cnnkit.CnnkitError, match="int8 export was refused"):
            predict.predict_files(tmp_path / "bad", [str(tmp_path / "d.png")], runtime="int8")
        assert len(list(runtimes.exports_dir().glob("*-refused.txt"))) == 1
