"""int8 ONNX: static post-training quantization of an fp32 export (`cnnkit export --int8`), and the
evidence of what it did to accuracy.

The quantizer is ONNX Runtime's own (onnxruntime.quantization.quantize_static): QDQ format (every
quantized tensor is a QuantizeLinear -> DequantizeLinear pair in the graph, which the runtime fuses
into integer kernels, VNNI on x86), weights int8 per output channel, activations uint8 per tensor
with ranges from a few hundred calibration images (MinMax). The export's preprocessing, temperature
and softmax stay in the graph, so the int8 file takes the same uint8 (N, H, W, C) pixels and returns
the same outputs as the fp32 one.

Quantization changes answers, so there is no parity to prove, only a difference to measure: both
files run on the test split, and what changed is the accuracy difference with McNemar's exact test
on the images where exactly one is right (compare.paired_comparison). export_int8 does it all:
`cnnkit export --int8` (jobs/export.py) and the int8 runtime (runtimes.py) call it.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .compare import paired_comparison
from .errors import CnnkitError
from .evaluate import load_model_split
from .export import PARITY_MAX_DIFF, export, parity
from .modelfile import ModelInfo
from .onnxrun import OnnxRunner
from .utils import atomic_path

CALIBRATION_IMAGES = 256  # training images whose activations set the ranges (ORT's examples use a few hundred)
MAX_ACCURACY_DROP = 1.0  # points of test accuracy the int8 file may lose before the export is refused
PROOF_MAX_IMAGES = 10_000  # test images both files run on (a seeded subset beyond this)
# The ops given integer kernels. Conv, MatMul and Gemm hold nearly all multiply-adds; quantizing the
# rest too (pooling, Relu, Add, ...) measured no faster on 2 EPYC cores and changes more answers
# (benchmarks/inference/int8.py, benchmarks/NOTES.md).
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# Which layers stay fp32, chosen per model (keep_float=None): every layer quantized first, and where that
# loses more than RETRY_DROP points, the first quantizable layer (the stem conv, on normalised pixels) kept
# in fp32 too, the version with the smaller drop kept. Measured on 2 EPYC cores (benchmarks/NOTES.md):
# quantizing the stem cost 15.4 points of subset accuracy on the multi-MNIST model (88.20% -> 72.75%; 87.80%
# with it in fp32) and 3.3 points on EfficientNet-Lite0 on hymenoptera (94.77% -> 91.50%; 95.42%), and
# nothing on the seed MNIST and CIFAR-10 networks, where keeping it in fp32 cut OpenVINO int8's speed-up
# (seed-mnist-torch 2.33x -> 1.85x of onnxruntime fp32, seed-cifar10 2.47x -> 1.71x, fast-mnist 1.50x -> 1.05x).
RETRY_DROP = 0.5
KEEP_FLOAT_TRIES = ((), ("first",))


class Int8Refused(CnnkitError):
    """The int8 file lost more accuracy than allowed (runtimes.py remembers these, not other failures)."""


def onnx_quantization():
    """ONNX Runtime's quantization module (part of the onnxruntime wheel), or a one-line error."""
    try:
        from onnxruntime import quantization
    except ImportError:
        raise CnnkitError("--int8 needs onnxruntime: pip install 'cnnkit[export]'") from None
    return quantization


@contextlib.contextmanager
def quiet():
    """The quantizer logs and warns per tensor; keep that off the terminal (failures raise)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def calibration_indices(n: int, count: int, seed: int, split: str = "training") -> np.ndarray:
    """`count` distinct indices into a split of n images, sorted (disk-backed splits read in runs)."""
    if n == 0:
        raise CnnkitError(f"the {split} split is empty: no images to quantize with or to test int8 on")
    return np.sort(np.random.default_rng(seed).choice(n, size=min(count, n), replace=False))


def quantizable_nodes(path: Path) -> list[str]:
    """Names of the nodes of QUANTIZED_OPS in graph order (first: the stem conv, last: the classifier)."""
    import onnx

    return [node.name for node in onnx.load(str(path)).graph.node if node.op_type in QUANTIZED_OPS]


def quantize_onnx(fp32_path: Path, out: Path, calibration: np.ndarray, keep_float: tuple[str, ...] = ()) -> dict:
    """Write the int8 version of the fp32 export `fp32_path` to `out` (via a temporary name).

    calibration: uint8 (N, H, W, C), what the export takes. keep_float: "first" and/or "last" to
    leave the first and last quantizable layers in fp32 (what accuracy-sensitive recipes do).
    Returns the record of how it was quantized; the export's cnnkit metadata is carried over."""
    q = onnx_quantization()
    import onnx

    source = onnx.load(str(fp32_path))
    input_name = source.graph.input[0].name
    batches = [{input_name: calibration[i:i + 64]} for i in range(0, len(calibration), 64)]

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="cnnkit-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            with quiet():
                # ONNX shape inference and ORT's basic graph optimizations (Conv+BatchNorm folded, constants
                # folded) before the ranges are measured: a folded BatchNorm is one integer conv, not three ops.
                q.shape_inference.quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
                nodes = quantizable_nodes(prepared)
                excluded = ([nodes[0]] if "first" in keep_float and nodes else []) + \
                           ([nodes[-1]] if "last" in keep_float and len(nodes) > 1 else [])
                quantized = Path(tmp) / "int8.onnx"
                q.quantize_static(str(prepared), str(quantized), Reader(), quant_format=q.QuantFormat.QDQ,
                                  per_channel=True, activation_type=q.QuantType.QUInt8,
                                  weight_type=q.QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
                                  nodes_to_exclude=excluded, calibrate_method=q.CalibrationMethod.MinMax)
        except CnnkitError:
            raise
        except Exception as e:  # the quantizer's own failure: one line
            raise CnnkitError(f"int8 quantization failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") \
                from None
        model = onnx.load(str(quantized))
    record = {"format": "QDQ", "weights": "int8, per output channel", "activations": "uint8, per tensor",
              "calibration": {"method": "MinMax", "images": int(len(calibration))},
              "quantized_ops": list(QUANTIZED_OPS), "layers_quantized": len(nodes) - len(excluded),
              "kept_float": list(keep_float), "quantizer": f"onnxruntime {q_version()}"}
    meta = {p.key: p.value for p in source.metadata_props}
    if "cnnkit" in meta:  # the fp32 export's record, with how the weights were quantized
        meta["cnnkit"] = json.dumps({**json.loads(meta["cnnkit"]), "int8": record})
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = (source.doc_string + " (int8: weights and activations quantized, QDQ)").strip()
    with atomic_path(out) as tmp_out:
        onnx.save(model, str(tmp_out))
    return record


def q_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def set_record(path: Path, values: dict, out: Path) -> None:
    """The ONNX file at `path` with `values` added to its cnnkit record's int8 part, written to `out`
    (via a temporary name)."""
    import onnx

    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "cnnkit":
            record = json.loads(prop.value)
            record.setdefault("int8", {}).update(values)
            prop.value = json.dumps(record)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))


# ----------------------------------------------------------------------------- what changed
def correct(info: ModelInfo, outputs: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """(N,) bool: whether an export's outputs are right for each image. Single-label: the most
    probable class; binary: the decided class (its `labels` output); multi-label: the whole label set."""
    if info.task == "multi-label":
        return (outputs[1].astype(bool) == labels.astype(bool)).all(1)
    if info.task == "binary":
        return outputs[1][:, 1].astype(bool) == labels.astype(bool)
    return outputs[0].argmax(1) == labels


def run_both(info: ModelInfo, fp32: list[np.ndarray], int8_path: Path, images: np.ndarray, labels: np.ndarray
             ) -> dict:
    """The int8 export on uint8 images (N, H, W, C) beside the fp32 export's outputs on them (`fp32`,
    computed once for every try): {correct_fp32, correct_int8 (N,) bool, agreement: the share of
    images whose answer (top-1, decided class or label set) is the same}."""
    int8 = OnnxRunner(int8_path).outputs(images, "NHWC")
    if info.task == "single-label":
        same = fp32[0].argmax(1) == int8[0].argmax(1)
    else:
        same = (fp32[1].astype(bool) == int8[1].astype(bool)).all(1)
    return {"correct_fp32": correct(info, fp32, labels), "correct_int8": correct(info, int8, labels),
            "agreement": float(same.mean()) if len(same) else 1.0}


# ----------------------------------------------------------------------------- the whole export
def export_int8(model, info: ModelInfo, out: Path, images, source: str, max_drop: float = MAX_ACCURACY_DROP,
                calibration_images: int = CALIBRATION_IMAGES, keep_float: tuple[str, ...] | None = None,
                download: bool | None = None) -> dict:
    """The int8 ONNX file of a loaded model: its fp32 export (parity with PyTorch checked first on
    `images`, uint8 (N, C, H, W), from `source`), quantized with ranges from `calibration_images`
    training images (seeded by the run's seed), then both run on the test split. Written to `out`
    only when test accuracy dropped by at most `max_drop` points; else refused with the figures.
    keep_float: the layers left in fp32 ("first", "last"); None: chosen (KEEP_FLOAT_TRIES).
    download: whether the data may be downloaded (None: as the run's config says)."""
    onnx_quantization()  # before any work: the quantizer is there
    if not 0 <= max_drop <= 100:
        raise CnnkitError(f"--max-accuracy-drop is in points of accuracy, 0 to 100, not {max_drop:g}")
    if calibration_images < 1:
        raise CnnkitError("--calibration-images must be at least 1")
    seed = int(info.training.get("seed", 0))
    train, data = load_model_split(info, "train", "calibrate the int8 ranges", download)
    calibration = nhwc(train.images[calibration_indices(len(train), calibration_images, seed)])
    test_split = info.data.test_source or "test"
    test, _ = load_model_split(info, test_split, "measure the int8 model's accuracy", download)
    pick = calibration_indices(len(test), PROOF_MAX_IMAGES, seed + 1, test_split)  # every test image, up to 10,000
    with tempfile.TemporaryDirectory(prefix="cnnkit-export-") as tmp:
        fp32 = export(model, info, "onnx", Path(tmp) / "fp32.onnx")
        check = parity(model, info, fp32, "onnx", images)
        if not check["passed"]:
            raise CnnkitError(f"the fp32 export disagrees with PyTorch (agreement {check['agreement']:.2%}, "
                              f"difference {check['max_abs_diff']:.2e}): nothing to quantize")
        test_images, test_labels = nhwc(test.images[pick]), test.labels[pick].numpy()
        fp32_outputs = OnnxRunner(fp32).outputs(test_images, "NHWC")  # what every try is compared with
        tried = []  # (drop, how, proof, file) per choice of fp32 layers, the better one kept
        for i, keep in enumerate(KEEP_FLOAT_TRIES if keep_float is None else (tuple(keep_float),)):
            int8 = Path(tmp) / f"int8-{i}.onnx"  # moved to `out` only once it has passed
            how = quantize_onnx(fp32, int8, calibration, keep)
            proof = {"split": test_split, "data": data, "measure": accuracy_name(info), "max_drop_points": max_drop,
                     **measured_change(info, fp32_outputs, int8, test_images, test_labels)}
            tried.append((proof["drop_points"], i, how, proof, int8))
            if proof["drop_points"] <= RETRY_DROP:
                break
        _, _, how, proof, int8 = min(tried)
        how["tried"] = [{"kept_float": t[2]["kept_float"], "drop_points": t[0]} for t in tried]
        proof["passed"] = proof["drop_points"] <= max_drop
        if proof["passed"]:
            set_record(int8, {"tried": how["tried"], "proof": proof}, out)
        fp32_bytes = fp32.stat().st_size
    if not proof["passed"]:
        out.unlink(missing_ok=True)  # an older int8 file there was not proven for this model
        raise Int8Refused(f"int8 lost {proof['drop_points']:.2f} points of test {proof['measure']} "
                          f"({100 * proof['accuracy_fp32']:.2f}% -> {100 * proof['accuracy_int8']:.2f}%, McNemar "
                          f"p = {proof['mcnemar_p_value']:.2g}), more than the {max_drop:g} allowed: no file written; "
                          "deploy the fp32 export, or allow more with --max-accuracy-drop")
    return {"out": str(out), "format": "onnx", "int8": how, "task": info.task, "bytes": out.stat().st_size,
            "fp32_bytes": fp32_bytes, "checked_on": source, "fp32_parity": check, "max_allowed_diff": PARITY_MAX_DIFF,
            "proof": proof, "passed": True}


def nhwc(images) -> np.ndarray:
    """uint8 (N, C, H, W) tensor -> (N, H, W, C) array: what an export takes."""
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def measured_change(info: ModelInfo, fp32: list[np.ndarray], int8: Path, images: np.ndarray, labels: np.ndarray
                    ) -> dict:
    """The int8 file against the fp32 one's outputs `fp32` on the same test images: accuracies, the
    drop in points, agreement, McNemar."""
    ran = run_both(info, fp32, int8, images, labels)
    paired = paired_comparison(ran["correct_int8"], ran["correct_fp32"])  # a: int8, b: fp32
    return {"n": paired["n"], "accuracy_fp32": paired["accuracy_b"], "accuracy_int8": paired["accuracy_a"],
            "drop_points": 100 * (paired["accuracy_b"] - paired["accuracy_a"]), "agreement": ran["agreement"],
            "mcnemar_p_value": paired["mcnemar_p_value"], "only_int8_right": paired["only_a_right"],
            "only_fp32_right": paired["only_b_right"], "test": paired["test"]}


def accuracy_name(info: ModelInfo) -> str:
    return {"multi-label": "subset accuracy (whole label sets)", "binary": "accuracy at the threshold"}.get(
        info.task, "accuracy")
