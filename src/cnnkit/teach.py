"""The notes' worked calculations, step by step, for `cnnkit math`: every function returns a plain
dict (what --json prints) and `format_*` turns it into the text a learner reads. The numbers come
from cnnkit.reference."""
from __future__ import annotations

import math

import numpy as np
import torch.nn as nn

from . import reference as R
from .errors import CnnkitError


def parse_matrix(text: str, what: str) -> np.ndarray:
    """'1 2 3; 4 5 6' (rows separated by ';' or newlines, values by spaces or commas) -> 2-D array."""
    rows = [r for r in text.replace("\n", ";").split(";") if r.strip()]
    try:
        values = [[float(v) for v in r.replace(",", " ").split()] for r in rows]
    except ValueError as e:
        raise CnnkitError(f"--{what}: cannot read {text!r} as numbers ({e}); write rows like '1 2 3; 4 5 6'") from None
    if not values or len({len(r) for r in values}) != 1:
        raise CnnkitError(f"--{what}: every row needs the same number of values, e.g. '1 2 3; 4 5 6'")
    return np.array(values)


def parse_padding(text: str | int) -> str | int:
    if isinstance(text, int) or str(text) in ("valid", "same", "full"):
        return text
    try:
        p = int(text)
    except ValueError:
        raise CnnkitError(f"--padding must be valid, same, full or a number, not {text!r}") from None
    if p < 0:
        raise CnnkitError("--padding must not be negative")
    return p


def fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.4g}"


def _signed(v: float) -> str:
    return f"({fmt(v)})" if v < 0 else fmt(v)


# ----------------------------------------------------------------------------- output sizes


def conv_output(n: int, m: int, padding: str | int = 0, stride: int = 1) -> dict:
    """o = floor((n + 2p - m) / s) + 1 with the numbers filled in."""
    if n < 1 or m < 1 or stride < 1:
        raise CnnkitError("--n, --m and --stride must be positive")
    before, after = R.pad_amounts(n, m, padding, stride)
    o = (n + before + after - m) // stride + 1
    if o < 1:
        raise CnnkitError(f"a kernel of {m} does not fit an input of {n} with padding {padding}: use more padding")
    if before == after:
        formula = f"o = ⌊(n + 2p − m) / s⌋ + 1 = ⌊({n} + 2·{before} − {m}) / {stride}⌋ + 1 = {o}"
    else:
        formula = ("o = ⌊(n + p_before + p_after − m) / s⌋ + 1 = "
                   f"⌊({n} + {before} + {after} − {m}) / {stride}⌋ + 1 = {o}")
    table = {mode: (n + sum(R.pad_amounts(n, m, mode, 1)) - m) + 1 for mode in ("valid", "same", "full")}
    return {"n": n, "m": m, "padding": padding, "pad_before": before, "pad_after": after, "stride": stride,
            "output_size": o, "formula": formula, "stride1_table": table}


def format_conv_output(r: dict) -> str:
    lines = []
    if isinstance(r["padding"], str):
        lines.append(f"padding {r['padding']}: p = {r['pad_before']} before, {r['pad_after']} after")
    lines.append(r["formula"])
    t = r["stride1_table"]
    lines.append(f"at stride 1, n = {r['n']}, m = {r['m']}: valid n − m + 1 = {t['valid']}, same n = {t['same']}, "
                 f"full n + m − 1 = {t['full']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- convolution step by step


def conv_steps(x: np.ndarray, w: np.ndarray, padding: str | int = 0, stride: int = 1,
               mode: str = "cross_correlation") -> dict:
    """Every output value as the sum of products of its window with the kernel."""
    if mode not in ("cross_correlation", "convolution"):
        raise CnnkitError("--mode must be cross_correlation or convolution")
    k = R.rot180(w) if mode == "convolution" else w
    (pt, pb), (pl, pr) = R.pad_amounts(x.shape[0], w.shape[0], padding, stride), \
        R.pad_amounts(x.shape[1], w.shape[1], padding, stride)
    if x.shape[0] == 1 and w.shape[0] == 1:  # a 1-D signal: pad along its length only
        pt = pb = 0
    xp = np.pad(x, ((pt, pb), (pl, pr)))
    oh, ow = (xp.shape[0] - k.shape[0]) // stride + 1, (xp.shape[1] - k.shape[1]) // stride + 1
    if oh < 1 or ow < 1:
        raise CnnkitError(f"the {w.shape[0]}x{w.shape[1]} kernel does not fit the {x.shape[0]}x{x.shape[1]} input "
                          f"with padding {padding}: use padding same or full")
    steps, out = [], np.zeros((oh, ow))
    for i in range(oh):
        for j in range(ow):
            window = xp[i * stride:i * stride + k.shape[0], j * stride:j * stride + k.shape[1]]
            out[i, j] = float((window * k).sum())
            terms = " + ".join(f"{_signed(a)}·{_signed(b)}" for a, b in zip(window.ravel(), k.ravel()))
            steps.append({"i": i, "j": j, "row": i * stride, "col": j * stride, "window": window.tolist(),
                          "value": out[i, j], "sum": f"out[{i},{j}] = {terms} = {fmt(out[i, j])}"})
    return {"mode": mode, "padding": padding, "stride": stride, "input": x.tolist(), "kernel": w.tolist(),
            "kernel_used": k.tolist(), "padded_input": xp.tolist(), "output": out.tolist(),
            "output_shape": [oh, ow], "steps": steps}


def matrix_text(m, indent: str = "  ") -> str:
    m = np.asarray(m)
    cells = [[fmt(v) for v in row] for row in m]
    width = max(len(c) for row in cells for c in row)
    return "\n".join(indent + " ".join(c.rjust(width) for c in row) for row in cells)


def format_conv_steps(r: dict) -> str:
    lines = ["input (zero-padded):", matrix_text(r["padded_input"])]
    if r["mode"] == "convolution":
        lines += ["kernel, rotated by 180° (convolution flips it; cross-correlation would not):",
                  matrix_text(r["kernel_used"])]
    else:
        lines += ["kernel (cross-correlation: slid as is, what PyTorch and Keras compute):", matrix_text(r["kernel"])]
    lines.append(f"stride {r['stride']}: each output is the sum of products of its window with the kernel")
    lines += ["  " + s["sum"] for s in r["steps"]]
    lines += [f"output {r['output_shape'][0]}x{r['output_shape'][1]}:", matrix_text(r["output"])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pooling


def pool_steps(x: np.ndarray | None, n: int | None, size: int, stride: int | None, kind: str) -> dict:
    stride = stride or size
    if kind not in ("max", "avg", "l2"):
        raise CnnkitError("--kind must be max, avg or l2")
    if x is None:
        if n is None:
            raise CnnkitError("give --n (input size) or --input (values)")
        o = R.output_size(n, size, 0, stride)
        return {"n": n, "size": size, "stride": stride, "output_size": o,
                "formula": f"o = ⌊(n − size) / s⌋ + 1 = ⌊({n} − {size}) / {stride}⌋ + 1 = {o}"}
    fn = {"max": R.max_pool, "avg": R.avg_pool, "l2": R.l2_pool}[kind]
    if x.shape[0] < size or x.shape[1] < size:
        raise CnnkitError(f"a {size}x{size} window does not fit a {x.shape[0]}x{x.shape[1]} input")
    out = fn(x, size, stride)
    steps = []
    name = {"max": "max", "avg": "mean", "l2": "sqrt of sum of squares"}[kind]
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            window = x[i * stride:i * stride + size, j * stride:j * stride + size]
            steps.append({"i": i, "j": j, "window": window.tolist(), "value": float(out[i, j]),
                          "text": f"out[{i},{j}] = {name}({', '.join(fmt(v) for v in window.ravel())}) "
                                  f"= {fmt(out[i, j])}"})
    return {"kind": kind, "size": size, "stride": stride, "input": x.tolist(), "output": out.tolist(),
            "output_shape": list(out.shape), "steps": steps,
            "formula": f"o = ⌊(n − size) / s⌋ + 1 = ⌊({x.shape[0]} − {size}) / {stride}⌋ + 1 = {out.shape[0]}"}


def format_pool(r: dict) -> str:
    if "steps" not in r:
        return r["formula"]
    lines = [f"{r['kind']} pooling, {r['size']}x{r['size']} windows, stride {r['stride']}"
             + (" (overlapping)" if r["stride"] < r["size"] else ""), "input:", matrix_text(r["input"]), r["formula"]]
    lines += ["  " + s["text"] for s in r["steps"]]
    lines += ["output:", matrix_text(r["output"])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- shapes, parameters, losses


def shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
    """The tensor shape after every layer for a batch (N, C, H, W), as the notes print it."""
    from .models.summary import summary
    n, per_image = input_shape[0], input_shape[1:]
    info = summary(model, tuple(per_image))
    layers = [{"layer": l["layer"], "shape": [n, *l["output_shape"]]} for l in info["layers"]]
    chain = " → ".join(str(s) for s in [[n, *per_image]] + [l["shape"] for l in layers])
    return {"input": list(input_shape), "layers": layers, "chain": chain}


def format_shapes(r: dict) -> str:
    lines = [f"  {str(r['input']):<22} input"] + [f"  {str(l['shape']):<22} {l['layer']}" for l in r["layers"]]
    return "\n".join(lines + ["", r["chain"]])


def param_comparison(input_shape: tuple[int, int, int], filters: int, kernel: int, padding: str | int = "valid",
                     stride: int = 1) -> dict:
    """A conv layer's parameters against a fully connected layer with the same input and output sizes."""
    c, h, w = input_shape
    oh, ow = (conv_output(h, kernel, padding, stride)["output_size"],
              conv_output(w, kernel, padding, stride)["output_size"])
    weights = filters * kernel * kernel * c
    inputs, outputs = c * h * w, filters * oh * ow
    dense_weights = inputs * outputs
    return {"input": [c, h, w], "output": [filters, oh, ow], "conv_weights": weights, "conv_biases": filters,
            "conv_params": weights + filters, "dense_inputs": inputs, "dense_outputs": outputs,
            "dense_weights": dense_weights, "dense_params": dense_weights + outputs,
            "ratio": (dense_weights + outputs) / (weights + filters)}


def format_params(r: dict) -> str:
    c, h, w = r["input"]
    f, oh, ow = r["output"]
    k = int(round(math.sqrt(r["conv_weights"] / (f * c))))
    return "\n".join([
        f"input {h}×{w}×{c}, {f} filters of {k}×{k} → output {oh}×{ow}×{f}",
        f"conv:  {k}·{k}·{c}·{f} = {r['conv_weights']:,} weights + {f} biases = {r['conv_params']:,} parameters "
        "(the same weights slide over every position)",
        f"dense: {r['dense_inputs']:,} inputs × {r['dense_outputs']:,} outputs = {r['dense_weights']:,} weights "
        f"(≈ {r['dense_weights'] / 1e6:.0f} million) + {r['dense_outputs']:,} biases",
        f"the fully connected layer needs {r['ratio']:,.0f}× more parameters",
    ])


def loss_example(logits: list[float], target: int) -> dict:
    """Cross-entropy from probabilities and from logits: binary for one logit, categorical for more."""
    z = np.array(logits, dtype=np.float64)
    if len(z) == 1:
        if target not in (0, 1):
            raise CnnkitError("with one logit (binary), --target must be 0 or 1")
        p = float(R.sigmoid(z[0]))
        return {"kind": "binary", "logit": float(z[0]), "target": target, "probability": p,
                "from_probabilities": R.binary_cross_entropy(p, target),
                "from_logits": R.binary_cross_entropy_with_logits(z[0], target)}
    if not 0 <= target < len(z):
        raise CnnkitError(f"--target must be a class index from 0 to {len(z) - 1}")
    p = R.softmax(z)
    return {"kind": "categorical", "logits": z.tolist(), "target": target, "probabilities": p.tolist(),
            "from_probabilities": R.categorical_cross_entropy(p, target),
            "from_logits": R.categorical_cross_entropy_with_logits(z, target)}


def format_loss(r: dict) -> str:
    if r["kind"] == "binary":
        z, p = r["logit"], r["probability"]
        return "\n".join([
            f"p = σ(z) = 1 / (1 + e^−{fmt(z)}) = {p:.4f}",
            f"from the probability: −[y·ln p + (1 − y)·ln(1 − p)] = {r['from_probabilities']:.4f}",
            f"from the logit: max(z, 0) − z·y + ln(1 + e^−|z|) = {r['from_logits']:.4f}"])
    p = r["probabilities"]
    return "\n".join([
        f"softmax: p = e^z / Σ e^z = [{', '.join(f'{v:.4f}' for v in p)}]",
        f"from the probabilities: −ln p[{r['target']}] = −ln {p[r['target']]:.4f} = {r['from_probabilities']:.4f}",
        f"from the logits: −z[{r['target']}] + ln Σ e^z = {r['from_logits']:.4f}"])
