"""`cnnkit audit`: duplicates, leakage, balance and unreadable files of a dataset (audit.py), drawn."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..utils import write_csv, write_text_atomic


PAIRS_DRAWN = 40


def audit_to_folder(data: str, out: str | Path | None = None, data_dir: str | None = None,
                    image_size: int | None = None, channels: int | None = None,
                    threshold: float | None = None) -> tuple[dict, dict[str, Path]]:
    """`cnnkit audit`: audit.json, duplicates.csv and audit.html (with the pairs drawn) in `out`."""
    from ..audit import NEAR_THRESHOLD, audit
    from ..data import load_dataset
    from ..report import plot_pairs
    from ..report_html import write_audit_page

    ds = load_dataset(data, data_dir=data_dir, image_size=image_size, channels=channels, quiet=True)
    result = audit(ds, NEAR_THRESHOLD if threshold is None else threshold)
    out = Path(out or f"audit-{ds.name}")
    out.mkdir(parents=True, exist_ok=True)
    pairs = result["pairs"]
    files = {"csv": out / "duplicates.csv", "json": out / "audit.json"}
    keys = ["kind", "similarity", "split_a", "index_a", "path_a", "label_a", "split_b", "index_b", "path_b", "label_b"]
    write_csv(files["csv"], keys, [[p[k] for k in keys] for p in pairs])
    shown = sorted(pairs, key=lambda p: (p["split_a"] == p["split_b"], -p["similarity"]))[:PAIRS_DRAWN]  # leaks first
    if shown:
        splits = {name: getattr(ds, name) for name in ("train", "val", "test") if getattr(ds, name) is not None}
        first = torch.stack([splits[p["split_a"]].images[p["index_a"]] for p in shown])
        second = torch.stack([splits[p["split_b"]].images[p["index_b"]] for p in shown])
        captions = [f"{p['split_a']}:{p['index_a']} ~ {p['split_b']}:{p['index_b']}\n{p['kind']} {p['similarity']:.3f}"
                    + ("" if p["label_a"] == p["label_b"] else f" ({p['label_a']}/{p['label_b']})") for p in shown]
        files["pairs"] = plot_pairs(first, second, captions, out / "duplicates.png")
    summary = {k: v for k, v in result.items() if k != "pairs"}
    write_text_atomic(files["json"],
                      json.dumps({**summary, "pairs": [{k: p[k] for k in keys} for p in pairs]}, indent=2))
    files["report"] = write_audit_page(out / "audit.html", result, files)
    return {**summary, "out": str(out)}, files
