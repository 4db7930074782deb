"""`cnnkit evaluate`: a model file on a split of its dataset, written as a report folder."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CnnkitError
from ..evaluate import load_split_for
from ..modelfile import load_model, resolve_model_path
from ..report_folder import evaluate_and_report
from ..report_multilabel import evaluate_and_report_multi_label
from ..utils import write_text_atomic


def evaluate_model(model_path: str | Path, data: str, split: str = "test", data_dir: str | None = None,
                   out: str | Path | None = None, tta: bool = False) -> tuple[dict, dict[str, Path], list[str]]:
    """(metrics, {name: file}, class names): the files of report_folder.evaluate_and_report in
    `out` (default: RUN/evaluate-<split>, beside the model file); for a multi-label model those of
    report_multilabel.evaluate_and_report_multi_label (its figures at the model file's thresholds,
    evaluate.evaluate_multi_label, in out/metrics.json, and report.html)."""
    model, info = load_model(model_path)
    if info.task == "multi-label" and tta:
        raise CnnkitError("--tta averages single-label probabilities; leave it out for this multi-label model")
    loaded, names = load_split_for(info, data, split, data_dir)
    out = Path(out) if out else resolve_model_path(model_path).parent / f"evaluate-{split}"
    if info.task == "multi-label":
        metrics, files = evaluate_and_report_multi_label(model, info, loaded, out, data_name=data, split_name=split)
        files["metrics"] = out / "metrics.json"
        write_text_atomic(files["metrics"], json.dumps(metrics, indent=2))
        metrics["files"] = {k: str(v) for k, v in files.items()}
        return metrics, files, names
    metrics, files = evaluate_and_report(model, info, loaded, out, data_name=data, split_name=split, tta=tta)
    metrics["files"] = {k: str(v) for k, v in files.items()}
    return metrics, files, names
