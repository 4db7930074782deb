"""report.html: one self-contained page per run or evaluation.

Every picture is embedded as a base64 PNG and the style is inline, so the file opens offline, can be
mailed or attached to an issue, and needs no server. No JavaScript. The layout is one column that
narrows to a phone's width; wide tables scroll sideways inside their own box.
"""
from __future__ import annotations

import base64
import html
import os
import platform
import statistics
from datetime import datetime
from pathlib import Path

from .modelfile import DataRecord, ModelInfo
from .utils import write_text_atomic
from .version import __version__

# A backslash at the end of a line below continues the rule: it ends a line of this file, not of the style.
STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1b1f24;margin:0 auto;\
max-width:1000px;padding:12px}
h1{font-size:1.45em;margin:.3em 0}\
h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.9em;margin:.4em 0}
th,td{padding:3px 8px;border-bottom:1px solid #eaeef2;text-align:right;white-space:nowrap}
th.text,td.text{text-align:left}
th.wrap,td.wrap{white-space:normal;overflow-wrap:anywhere;min-width:12em;text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:8px}
.card{flex:1 1 130px;border:1px solid #d0d7de;border-radius:6px;padding:6px 10px}
.card b{display:block;font-size:1.3em}
.muted{color:#57606a;font-size:.9em}
"""


def esc(value) -> str:
    return html.escape(str(value))


def image_tag(path: str | Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def table(header: list[str], rows: list[list], text_columns: tuple[int, ...] = (0,),
          wrap_columns: tuple[int, ...] = ()) -> str:
    """An HTML table: numbers right-aligned, text_columns left-aligned, wrap_columns (long paths)
    allowed to wrap inside a column at least 12em wide."""
    def cls(i: int) -> str:
        names = [n for n, cols in (("text", text_columns), ("wrap", wrap_columns)) if i in cols]
        return f' class="{" ".join(names)}"' if names else ""
    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{esc(v)}</td>" for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def relative(path: str, root: str) -> str:
    """A file's path inside the dataset folder: short enough to read on a phone."""
    try:
        return str(Path(path).relative_to(root)) if path and root else path
    except ValueError:
        return path


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def environment(device: str = "cpu") -> dict:
    """Versions and hardware, as a reader needs them to reproduce a figure."""
    import numpy
    import torch
    from .hardware import cpu as this_cpu
    cpu = this_cpu()
    env = {"cnnkit": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
           "python": platform.python_version(), "os": platform.platform(), "cpu": cpu.model,
           "cpu_flags": " ".join(cpu.bf16_flags) or "-", "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": device}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def write_report(path: str | Path, *, title: str, model_info: dict, info: ModelInfo, evaluation: dict,
                 files: dict[str, Path], timing: dict, env: dict) -> Path:
    """Write report.html. model_info: models.summary's dict; info: the model file's metadata (config,
    data, history, calibration); evaluation: evaluate.evaluate's metrics plus 'split' and 'data';
    files: PNGs by name (curves, confusion_matrix, confusion_matrix_normalized, misclassified,
    reliability); timing: {train_seconds, evaluate_seconds, ...}."""
    ev = evaluation
    parts = [f"<h1>{esc(title)}</h1>",
             f'<p class="muted">{esc(info.name)} · {len(info.class_names)} classes · input {esc(str(info.input))}'
             f' · {esc(ev.get("split", "test"))} split of {esc(ev.get("data", info.data.name))} ({ev["n"]:,} images)'
             f' · written {datetime.now().strftime("%Y-%m-%d %H:%M")} by cnnkit {esc(__version__)}</p>',
             card_row(report_cards(ev, model_info, timing))]
    parts += metrics_section(ev, info)
    parts += binary_section(ev, files, info.class_names)
    parts += confusion_section(ev, files)
    parts += misclassified_section(ev, files, info.data.source)
    parts += calibration_section(ev, files)
    parts += conformal_section(ev)
    parts += training_section(info, files)
    parts += closing_sections(model_info, info, ev, timing, env)
    return write_page(path, title, parts)


def closing_sections(model_info: dict, info: ModelInfo, ev: dict, timing: dict, env: dict) -> list[str]:
    """The last sections of every report.html: model, data, timing, environment."""
    parts = model_section(model_info) + data_section(info.data) + timing_section(ev, timing, info.history,
                                                                                 info.data.sizes)
    parts.append("<h2>Environment</h2>")
    parts.append(table(["component", "value"], [[k, v] for k, v in env.items()], wrap_columns=(1,)))
    return parts


def timing_and_environment(info: ModelInfo, device: object, evaluate_seconds: float) -> dict:
    """report.html's timing and environment tables, {timing, env}; device: a torch.device or its name."""
    training = info.metrics
    return {"timing": {"train_seconds": training.get("train_seconds"), "evaluate_seconds": evaluate_seconds},
            "env": {**environment(str(device)),
                    **({"precision (training)": training["precision"]} if "precision" in training else {})}}


def card_row(cards: list[tuple[str, str]]) -> str:
    """The headline figures, one card each: (label, value)."""
    return '<div class="cards">' + "".join(f'<div class="card">{esc(k)}<b>{esc(v)}</b></div>' for k, v in cards) \
        + "</div>"


# The sections of report.html, top to bottom: each returns its parts (HTML strings).


def report_cards(ev: dict, model_info: dict, timing: dict) -> list[tuple[str, str]]:
    cards = [("accuracy", pct(ev["accuracy"]))]
    if "tta_accuracy" in ev:
        cards.append(("accuracy with TTA", pct(ev["tta_accuracy"])))
    if "top5_accuracy" in ev:
        cards.append(("top-5 accuracy", pct(ev["top5_accuracy"])))
    cards += [("macro F1", f'{ev["averages"]["macro"]["f1"]:.4f}'),
              ("ECE (calibrated)", f'{ev["ece"]:.4f}'),
              *conformal_card(ev),
              ("parameters", f'{model_info["parameters"]:,}')]
    if timing.get("train_seconds") is not None:
        cards.append(("training time", f'{timing["train_seconds"]:.1f} s'))
    return cards


def conformal_card(ev: dict) -> list[tuple[str, str]]:
    """The mean prediction set at 95% coverage, when measured."""
    at = [r for r in (ev.get("conformal") or {}).get("levels", []) if r["coverage"] == 0.95 and "note" not in r]
    return [("mean set at 95% coverage", f'{at[0]["mean_set_size"]:.2f} classes')] if at else []


def metrics_section(ev: dict, info: ModelInfo) -> list[str]:
    rows = [[c["class"], f'{c["precision"]:.4f}', f'{c["recall"]:.4f}', f'{c["f1"]:.4f}', c["support"]]
            for c in ev["per_class"]]
    rows += [[f"{k} avg", f'{v["precision"]:.4f}', f'{v["recall"]:.4f}', f'{v["f1"]:.4f}', ev["n"]]
             for k, v in ev["averages"].items()]
    parts = ["<h2>Per-class metrics</h2>", table(["class", "precision", "recall", "F1", "support"], rows)]
    if "tta_accuracy" in ev:
        tta = info.tta
        parts.append(f'<p>Test-time augmentation (the image{", its mirror" if tta.hflip else ""} '
                     f'and four {tta.shift_pixels}-pixel shifts, softmax averaged): accuracy {pct(ev["tta_accuracy"])} '
                     f'against {pct(ev["accuracy"])} without.</p>')
    return parts


def binary_section(ev: dict, files: dict[str, Path], names: list[str]) -> list[str]:
    """A binary model: its threshold, ROC and precision-recall curves with their areas, and the
    figures at the threshold against those at 0.5 (the confusion matrix below is at the threshold)."""
    if "binary" not in ev:
        return []
    b = ev["binary"]

    def area(v: float | None) -> str:
        return "n/a (one class in the split)" if v is None else f"{v:.4f}"
    return ["<h2>ROC and precision-recall</h2>",
            f"<p>One logit: the probability that an image is <b>{esc(names[1])}</b> (else {esc(names[0])}), "
            f"calibrated on validation. The threshold {b['threshold']:.3f} was chosen on validation; at it, accuracy "
            f"{pct(b['accuracy'])}, precision {b['precision']:.4f}, recall {b['recall']:.4f}, F1 {b['f1']:.4f} for "
            f"{esc(names[1])}; accuracy {pct(b['accuracy_at_half'])} at 0.5. ROC AUC {area(b['roc_auc'])}, average "
            f"precision (area under the precision-recall curve) {area(b['average_precision'])}.</p>",
            image_tag(files["roc_pr"], "ROC and precision-recall curves") if "roc_pr" in files else ""]


def confusion_section(ev: dict, files: dict[str, Path]) -> list[str]:
    parts = ["<h2>Confusion matrix</h2>",
             '<p class="muted">Rows: true class; columns: predicted. Counts, then each row divided by its total '
             "(recall on the diagonal).</p>"]
    for key in ("confusion_matrix", "confusion_matrix_normalized"):
        if key in files:
            parts.append(image_tag(files[key], key.replace("_", " ")))
    if ev["most_confused"]:
        pairs = [[m["true"], m["predicted"], m["count"]] for m in ev["most_confused"]]
        parts.append("<p>Most confused pairs:</p>"
                     + table(["true", "predicted as", "count"], pairs, text_columns=(0, 1)))
    return parts


def misclassified_section(ev: dict, files: dict[str, Path], source: str) -> list[str]:
    parts = ["<h2>Misclassified</h2>"]
    mis = ev["misclassified"]
    if not mis:
        return parts + ["<p>No mistakes on this split.</p>"]
    parts.append(f'<p class="muted">The {min(len(mis), 24)} worst mistakes by loss, each beside its Grad-CAM heatmap '
                 'for the predicted class (where the network found its evidence). The table lists up to 50.</p>')
    if "misclassified" in files:
        parts.append(image_tag(files["misclassified"], "misclassified gallery"))
    parts.append(table(["#", "true", "predicted", "probability", "loss", f"file (in {source})"],
                       [[m["index"], m["true"], m["predicted"], f'{m["probability"]:.3f}', f'{m["loss"]:.3f}',
                         relative(m["path"], source) or "–"] for m in mis],
                       text_columns=(1, 2), wrap_columns=(5,)))
    return parts


def calibration_section(ev: dict, files: dict[str, Path]) -> list[str]:
    parts = ["<h2>Calibration</h2>",
             f'<p>Temperature {ev["temperature"]:.3f} (fitted on the validation split at the end of training): '
             f'expected calibration error {ev["ece"]:.4f}, against {ev["ece_uncalibrated"]:.4f} before scaling '
             '(15 equal-width bins). A calibrated model that says 0.8 is right 80% of the time.</p>']
    if "reliability" in files:
        parts.append(image_tag(files["reliability"], "reliability diagram"))
    return parts


def conformal_section(ev: dict) -> list[str]:
    """Prediction sets (conformal.py): for each coverage asked, the share of this split's images whose
    set holds the true class and the mean set size, calibrated on the validation split."""
    c = ev.get("conformal")
    if not c:
        return []
    rows = [[f'{100 * r["coverage"]:g}%', "n/a", "n/a", r["note"]] if "note" in r else
            [f'{100 * r["coverage"]:g}%', pct(r["empirical_coverage"]), f'{r["mean_set_size"]:.3f}',
             f'{r["threshold"]:.4g}'] for r in c["levels"]]
    same = ev.get("split") == "val"  # a dataset without a test split: the figures are on the calibration images
    return ["<h2>Prediction sets</h2>",
            f'<p>Split conformal prediction (score {esc(c["score"])}), calibrated on {c["calibration_images"]:,} '
            "validation images: asked for a coverage, <code>cnnkit predict --coverage</code> gives each image the "
            "classes, most probable first, that hold its true class with at least that probability (and, where the "
            f'scores have no ties, less than that plus {1 / (c["calibration_images"] + 1):.2g}). Below: how often '
            'the set held the true class on '
            f'these {c["n"]:,} images, and its mean size. Where the accuracy already reaches a coverage, each set '
            "is the top class alone, and holds the true class as often as the model is right.</p>"
            + ("<p><b>These are the calibration images themselves (the data has no test split): coverage here is "
               "not a test of the guarantee.</b></p>" if same else ""),
            table(["coverage asked", "held the true class", "mean set size", "score threshold"], rows,
                  wrap_columns=(3,))]


def training_section(info: ModelInfo, files: dict[str, Path]) -> list[str]:
    parts = ["<h2>Training</h2>"]
    if "curves" in files:
        parts.append(image_tag(files["curves"], "training curves"))
    if info.history:
        parts.append(table(["epoch", "train loss", "train acc", "val loss", "val acc", "lr", "seconds"],
                           [[r["epoch"], f'{r["train_loss"]:.4f}', f'{r["train_acc"]:.4f}', f'{r["val_loss"]:.4f}',
                             f'{r["val_acc"]:.4f}', f'{r["lr"]:.3g}', f'{r["seconds"]:.1f}'] for r in info.history]))
    if info.training:
        parts.append("<details><summary>configuration</summary>" +
                     table(["field", "value"], [[k, v] for k, v in info.training.items()], wrap_columns=(1,))
                     + "</details>")
    if info.pretrained:
        p = info.pretrained
        parts.append(f'<p>Pretrained weights: {esc(p.get("source"))} ({p.get("loaded_tensors")} tensors).</p>')
    return parts


def model_section(model_info: dict) -> list[str]:
    layers = table(["#", "layer", "output shape", "params", "mult-adds"],
                   [[l["index"], l["layer"], "x".join(map(str, l["output_shape"])), f'{l["params"]:,}',
                     f'{l["macs"]:,}' if l["macs"] else ""] for l in model_info["layers"]], text_columns=(1,))
    return ["<h2>Model</h2>", layers,
            f'<p>{model_info["parameters"]:,} parameters ({model_info["trainable_params"]:,} trainable, counting '
            f'BatchNorm statistics as the notes do: {model_info["total_params"]:,} in all); '
            f'{model_info["macs_per_image"]:,} multiply-adds per image.</p>']


def data_section(data: DataRecord) -> list[str]:
    parts = ["<h2>Data</h2>", table(["split", "images"], [[k, f"{v:,}"] for k, v in data.sizes.items()]),
             f'<p>Source: {esc(data.source or "?")}.'
             + (" The data has no test split: test figures are on the validation split."
                if data.test_source == "val" else "")
             + "</p>"]
    if data.skipped:
        parts.append(f"<p>{len(data.skipped)} file(s) skipped because they could not be decoded:</p>"
                     + table(["file", "reason"], data.skipped, text_columns=(), wrap_columns=(0, 1)))
    else:
        parts.append("<p>No files were skipped.</p>")
    return parts


def timing_section(ev: dict, timing: dict, history: list[dict], sizes: dict) -> list[str]:
    seconds = [r["seconds"] for r in history]
    rows = []
    if timing.get("train_seconds") is not None:
        rows.append(["training", f'{timing["train_seconds"]:.1f} s'])
    if seconds:
        rows.append(["median epoch", f"{statistics.median(seconds):.2f} s"])
        if sizes.get("train"):
            rows.append(["training throughput", f'{sizes["train"] / statistics.median(seconds):,.0f} images/s'])
    if timing.get("evaluate_seconds") is not None:
        rows.append(["this evaluation", f'{timing["evaluate_seconds"]:.1f} s for {ev["n"]:,} images'
                     + (" (with TTA)" if "tta_accuracy" in ev else "")])
    return ["<h2>Timing</h2>", table(["what", "time"], rows)]


def write_page(path: str | Path, title: str, parts: list[str]) -> Path:
    page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
    path = Path(path)
    write_text_atomic(path, page)
    return path


def write_compare_page(path: str | Path, *, names: tuple[str, str], result: dict, verdict: str, per_class: list[list],
                       files: dict[str, Path], data: str) -> Path:
    """compare.html: the verdict, the paired counts, per-class recall side by side (multi-label: per-label
    F1 and each model's mAP; "right" is then the exact label set) and the curves."""
    a, b = names
    lo, hi = result["difference_ci95"]
    measure = result.get("measure", "accuracy")
    multi = result.get("task") == "multi-label"
    parts = [f"<h1>{esc(a)} against {esc(b)}</h1>",
             f'<p class="muted">the same {result["n"]:,} test images of {esc(data)} · written '
             f'{datetime.now().strftime("%Y-%m-%d %H:%M")} by cnnkit {esc(__version__)}</p>',
             f"<p><b>{esc(verdict)}</b></p>"]
    cards = [(f"{measure} {a}", pct(result["accuracy_a"])), (f"{measure} {b}", pct(result["accuracy_b"])),
             ("difference (A − B)", f'{100 * result["difference"]:+.2f} pts'),
             ("95% interval", f"{100 * lo:+.2f} to {100 * hi:+.2f}"),
             ("McNemar p", f'{result["mcnemar_p_value"]:.3g}')]
    if multi:
        cards += [(f"mAP {n}", pct(result.get(f"mean_average_precision_{k}"))) for n, k in ((a, "a"), (b, "b"))]
    parts.append(card_row(cards))
    parts.append("<h2>Where they disagree</h2>")
    right = "its whole label set right (every label present found, no other)" if multi else "right"
    parts.append('<p class="muted">McNemar\'s exact test uses only the images exactly one model gets '
                 f"{esc(right)}: if the two were equally accurate, each such image would be A's or B's with "
                 "even odds.</p>")
    parts.append(table(["", f"{b} right", f"{b} wrong"],
                       [[f"{a} right", result["both_right"], result["only_a_right"]],
                        [f"{a} wrong", result["only_b_right"], result["both_wrong"]]]))
    parts.append("<h2>F1 per label</h2>" if multi else "<h2>Recall per class</h2>")
    parts.append(table(["label" if multi else "class", a, b, "difference"], per_class))
    if "curves" in files:
        parts.append("<h2>Training curves</h2>")
        parts.append(image_tag(files["curves"], "validation loss and accuracy per epoch of both runs"))
    return write_page(path, f"{a} against {b}", parts)


def write_audit_page(path: str | Path, result: dict, files: dict[str, Path]) -> Path:
    """audit.html: the figures, leakage per pair of splits, class balance, and the pairs side by side."""
    parts = [f"<h1>Audit of {esc(result['data'])}</h1>",
             f'<p class="muted">{result["images"]:,} images '
             f'({", ".join(f"{k} {v:,}" for k, v in result["splits"].items())}) '
             f'decoded at {esc("x".join(map(str, result["decoded_shape"])))} from {esc(result["source"])} · written '
             f'{datetime.now().strftime("%Y-%m-%d %H:%M")} by cnnkit {esc(__version__)}</p>']
    cards = [("exact duplicate pairs", f'{result["exact_pairs"]:,}'),
             ("near duplicate pairs", f'{result["near_pairs"]:,}'),
             ("pairs with different labels", f'{result["label_conflicts"]:,}'),
             ("unreadable files", f'{len(result["unreadable"]):,}')]
    parts.append(card_row(cards))
    parts.append("<h2>Leakage between splits</h2>")
    parts.append('<p class="muted">Images of a later split with an exact or near copy in an earlier one: each inflates '
                 "that split's accuracy.</p>")
    parts.append(table(["splits", "images", "share"],
                       [[k, v["images"], pct(v["share"])] for k, v in result["leakage"].items()]))
    parts.append(f'<p class="muted">Method: exact = {esc(result["method"]["exact"])}; '
                 f'near = {esc(result["method"]["near"])}.</p>')
    if "pairs" in files:
        parts.append("<h2>Duplicate pairs</h2>")
        parts.append(image_tag(files["pairs"], "duplicate pairs side by side"))
    parts.append("<h2>Class balance</h2>")
    classes = list(next(iter(result["class_balance"].values())))
    parts.append(table(["class", *result["class_balance"]], [[c, *[v[c] for v in result["class_balance"].values()]]
                                                             for c in classes]))
    if "file_facts" in result:
        f = result["file_facts"]
        parts.append("<h2>Files</h2>")
        parts.append(table(["size (most common)", "files"], [[k, v] for k, v in f["sizes"].items()]))
        parts.append(f'<p>{f["distinct_sizes"]} distinct sizes; modes {esc(f["modes"])}; '
                     f'formats {esc(f["formats"])}.</p>')
    if result["unreadable"]:
        parts.append("<h2>Unreadable files</h2>")
        parts.append(table(["file", "reason"], [[u["path"], u["reason"]] for u in result["unreadable"]],
                           wrap_columns=(0, 1)))
    return write_page(path, f"Audit of {result['data']}", parts)
