"""`cnnkit evaluate`: a model file on a split of its dataset, written as a report folder."""
from __future__ import annotations

from pathlib import Path

from ..evaluate import load_split_for
from ..modelfile import load_model, resolve_model_path
from ..report_folder import evaluate_and_report


def evaluate_model(model_path: str | Path, data: str, split: str = "test", data_dir: str | None = None,
                   out: str | Path | None = None, tta: bool = False) -> tuple[dict, dict[str, Path], list[str]]:
    """(metrics, {name: file}, class names): the files of report_folder.evaluate_and_report in
    `out` (default: RUN/evaluate-<split>, beside the model file)."""
    model, info = load_model(model_path)
    info.single_label_only("cnnkit evaluate")
    loaded, names = load_split_for(info, data, split, data_dir)
    out = Path(out) if out else resolve_model_path(model_path).parent / f"evaluate-{split}"
    metrics, files = evaluate_and_report(model, info, loaded, out, data_name=data, split_name=split, tta=tta)
    metrics["files"] = {k: str(v) for k, v in files.items()}
    return metrics, files, names
