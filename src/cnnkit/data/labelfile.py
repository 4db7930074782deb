"""Label files: a CSV, TSV or JSON Lines file that names each image and its class, where the
images are not kept in one folder per class.

    path,label,split              one row per image; paths relative to the label file's folder, or
    ants/0013035.jpg,ants,train   absolute; the split column (train / val / test) is optional:
    bees/1092977343.jpg,bees,val  without one, the splits are drawn as for a flat folder

Several labels per image (multi-label) come in either of two forms: a label column holding them
joined by --label-sep (";" by default: `cat;outdoor`), or, with no label column, one 0/1 column per
label (`path,cat,dog,outdoor`). The columns are found by name (PATH_COLUMNS, LABEL_COLUMNS,
SPLIT_COLUMNS, any case) unless named by --path-column / --label-column / --split-column; an
ambiguous or missing column gets a message saying which flag settles it.

Rows are checked before anything is decoded: a missing file, a duplicate image, an empty path or
label, an unknown split name or a row with the wrong number of fields stops with one line naming
the first bad row (and how many more there are). Files that exist but cannot be decoded are skipped
and listed, as in folders.

The rows are sorted by (split, class, path) before decoding, so a label file and the folder it
describes give the same dataset: the same classes, splits and, seeded, the same trained weights.
Read with the standard library's csv and json modules: a 60,000-row file (CIFAR-10's JPEGs) parses
in 0.23 s and is read and checked, every file's existence included, in 0.79 s (medians of 3, AMD
EPYC: python -m benchmarks.data.label_file_read); the stat calls are most of it, so pandas would
add a large dependency to save little.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CnnkitError
from .core import unreadable  # the same reasons a folder's listing gives

LABEL_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl")
PATH_COLUMNS = ("path", "file", "filename", "filepath", "file_path", "image", "image_path", "img")
LABEL_COLUMNS = ("label", "labels", "class", "classes", "category", "target", "tags")
SPLIT_COLUMNS = ("split", "subset")
SPLIT_NAMES = ("train", "val", "test")
LABEL_SEP = ";"  # the default separator of several labels in one cell
SET_SEP = "\x1f"  # joins a multi-label row's labels in the listing (ASCII unit separator: in no label name)


@dataclass(frozen=True)
class Columns:
    """Which column holds what; None: detected from the header (split: absent is allowed)."""
    path: str | None = None
    label: str | None = None
    split: str | None = None
    label_sep: str = LABEL_SEP  # separates several labels in one label cell

    @classmethod
    def of(cls, cfg) -> "Columns":
        """The columns a TrainConfig's path_column / label_column / split_column / label_sep name."""
        return cls(cfg.path_column, cfg.label_column, cfg.split_column, cfg.label_sep)


@dataclass
class LabelFile:
    """A label file's rows, checked: what the folder reader's listing gives for a folder."""
    files: dict[str, list[tuple[str, str]]]  # split ('all' without a split column) -> [(path, class)], sorted;
    # a multi-label row's class is its labels joined by SET_SEP ('' for none), in class_names order
    class_names: list[str]  # sorted, as folder names are (0/1 columns: in the file's order)
    unreadable: list[tuple[str, str]]  # (path, why): files that exist but cannot be opened (skipped)
    columns: Columns  # the columns used, all named (label: None for 0/1 columns)
    multi_label: bool = False  # some row has several labels, or the labels are 0/1 columns


def is_label_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in LABEL_FILE_SUFFIXES


def read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, fields)]) of a CSV / TSV file, or of a JSON Lines file (its objects'
    keys in first-seen order; a key a line lacks is an empty field). Blank lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark is not a column name
    except UnicodeDecodeError as e:
        raise CnnkitError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise CnnkitError(f"cannot read {path}: {e.strerror or e}") from None
    if path.suffix.lower() == ".jsonl":
        return read_jsonl(path, text)
    reader = csv.reader(text.splitlines(keepends=True), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    rows: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    try:
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue
            if header is None:
                header = [f.strip() for f in fields]
            else:
                rows.append((reader.line_num, fields))
    except csv.Error as e:
        raise CnnkitError(f"{path} line {reader.line_num}: {e}") from None
    if header is None:
        raise CnnkitError(f"{path} is empty: it needs a header row naming its columns, e.g. path,label")
    return header, rows


def read_jsonl(path: Path, text: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    objects: list[tuple[int, dict]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CnnkitError(f"{path} line {number}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise CnnkitError(f"{path} line {number}: each line must be a JSON object, e.g. "
                              '{"path": "a.jpg", "label": "cat"}')
        objects.append((number, obj))
    if not objects:
        raise CnnkitError(f"{path} is empty: it needs one JSON object per line, "
                          '{"path": "a.jpg", "label": "cat"}')
    header = list(dict.fromkeys(k for _, obj in objects for k in obj))
    return header, [(n, ["" if obj.get(k) is None else str(obj[k]) for k in header]) for n, obj in objects]


def find_column(path: Path, header: list[str], given: str | None, names: tuple[str, ...], what: str, flag: str,
                required: bool = True) -> int | None:
    """The index of the column named `given`, or else of the one header name among `names`."""
    if given is not None:
        if given not in header:
            raise CnnkitError(f"{path} has no column {given!r} ({flag}); its columns: {', '.join(header)}")
        return header.index(given)
    found = [i for i, h in enumerate(header) if h.lower() in names]
    if len(found) > 1:
        raise CnnkitError(f"{path}: columns {' and '.join(repr(header[i]) for i in found)} could both be the {what} "
                          f"column: choose one with {flag}")
    if not found and required:
        raise CnnkitError(f"{path} has no {what} column (looked for {', '.join(names)}; its columns: "
                          f"{', '.join(header)}): name it with {flag}")
    return found[0] if found else None


@dataclass(frozen=True)
class Layout:
    """Where a label file's fields are: column indices, and which form its labels take."""
    path: int
    label: int | None  # None: the labels are the 0/1 `indicators` columns
    split: int | None  # None: no split column (the rows are all 'all')
    indicators: tuple[int, ...]
    multi: bool  # several labels per row (separated, or 0/1 columns)
    sep: str


def read_label_file(path: str | os.PathLike, columns: Columns = Columns()) -> LabelFile:
    """Read and check a label file (see the module docstring); raises CnnkitError naming the first bad row."""
    path = Path(path)
    header, rows = read_table(path)
    at = layout(path, header, rows, columns)
    problems: list[str] = []
    seen: dict[str, int] = {}
    entries: dict[str, list[tuple[str, str]]] = {}
    bad: list[tuple[str, str]] = []
    for number, fields in rows:
        row = parse_row(path.parent, header, at, number, fields, seen)
        if isinstance(row, str):
            problems.append(row)
        elif (why := unreadable(row[1])) is None:  # one stat per file; a second only for the ones that fail
            entries.setdefault(row[0], []).append(row[1:])
        elif os.path.lexists(row[1]):  # there, but unreadable (a broken link, no permission): skipped and listed
            bad.append((row[1], why))
        else:
            problems.append(f"row {number}: no such file {row[1]}")
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:4])}{' ...' if len(problems) > 4 else ''})"
        raise CnnkitError(f"{path} {problems[0]}{more if len(problems) > 1 else ''}")
    return listing(path, header, at, entries, bad)


def layout(path: Path, header: list[str], rows: list[tuple[int, list[str]]], columns: Columns) -> Layout:
    """The columns, found by name or named by the flags, and the labels' form."""
    at_path = find_column(path, header, columns.path, PATH_COLUMNS, "image path", "--path-column")
    at_split = find_column(path, header, columns.split, SPLIT_COLUMNS, "split", "--split-column", required=False)
    at_label = find_column(path, header, columns.label, LABEL_COLUMNS, "label", "--label-column", required=False)
    indicators = [] if at_label is not None else indicator_columns(header, rows, {at_path, at_split})
    if at_label is None and not indicators:  # neither form: say what was looked for
        find_column(path, header, None, LABEL_COLUMNS, "label", "--label-column (or give one 0/1 column per label)")
    if at_label == at_path:
        raise CnnkitError(f"{path}: the image path and the label are the same column {header[at_path]!r}")
    multi = bool(indicators) or any(len(f) == len(header) and columns.label_sep in f[at_label] for _, f in rows)
    return Layout(at_path, at_label, at_split, tuple(indicators), multi, columns.label_sep)


def parse_row(base: Path, header: list[str], at: Layout, number: int, fields: list[str],
              seen: dict[str, int]) -> tuple[str, str, str] | str:
    """(split, file, label) of one row, its labels joined by SET_SEP; or what is wrong with it (the
    caller checks that the file exists). seen: file -> the row that first listed it (updated)."""
    if len(fields) != len(header):
        return f"row {number}: {len(fields)} fields where the header has {len(header)}"
    name = fields[at.path].strip()
    if not name:
        return f"row {number}: no image path"
    if at.label is None:
        label = SET_SEP.join(header[i] for i in at.indicators if fields[i].strip() == "1")
    else:
        cell = fields[at.label]
        parts = [p.strip() for p in (cell.split(at.sep) if at.multi else [cell]) if p.strip()]
        if not parts:
            return f"row {number}: {name} has an empty label"
        label = SET_SEP.join(sorted(set(parts)))
    split = fields[at.split].strip().lower() if at.split is not None else "all"
    if at.split is not None and split not in SPLIT_NAMES:
        return f"row {number}: split {fields[at.split].strip()!r} is not one of {', '.join(SPLIT_NAMES)}"
    file = os.path.normpath(os.path.join(base, os.path.expanduser(name)))
    if file in seen:
        return f"row {number}: {name} is listed again (first on row {seen[file]})"
    seen[file] = number
    return split, file, label


def listing(path: Path, header: list[str], at: Layout, entries: dict[str, list[tuple[str, str]]],
            bad: list[tuple[str, str]]) -> LabelFile:
    """The checked rows as a LabelFile: class names from the training rows, every split's classes
    known to training, rows sorted by (class, path)."""
    train_key = "train" if at.split is not None else "all"
    if not entries.get(train_key):
        raise CnnkitError(f"{path} lists no {'training ' if at.split is not None else ''}images"
                          + (" (no row has split 'train')" if at.split is not None and entries else ""))
    labels_of = (lambda c: c.split(SET_SEP) if c else []) if at.multi else (lambda c: [c])  # noqa: E731
    class_names = ([header[i] for i in at.indicators] if at.indicators
                   else sorted({n for _, c in entries[train_key] for n in labels_of(c)}))
    for split, listed in entries.items():
        unknown = sorted({n for _, c in listed for n in labels_of(c)} - set(class_names))
        if unknown:
            raise CnnkitError(f"{path}: the {split} rows have {'labels' if at.multi else 'classes'} {unknown} that no "
                              "train row has")
    if at.multi:  # each row's labels in class order, so equal sets are equal strings
        order = {n: i for i, n in enumerate(class_names)}
        entries = {sp: [(p, SET_SEP.join(sorted(labels_of(c), key=order.get))) for p, c in listed]
                   for sp, listed in entries.items()}
    files = {s: sorted(entries[s], key=lambda e: (e[1], e[0])) for s in (*SPLIT_NAMES, "all") if s in entries}
    used = Columns(header[at.path], header[at.label] if at.label is not None else None,
                   header[at.split] if at.split is not None else None, at.sep)
    return LabelFile(files, class_names, bad, used, at.multi)


def indicator_columns(header: list[str], rows: list[tuple[int, list[str]]], taken: set[int | None]) -> list[int]:
    """The columns, other than `taken`, holding only 0 and 1 in every row: one per label (multi-label)."""
    candidates = [i for i in range(len(header)) if i not in taken]
    whole = [f for _, f in rows if len(f) == len(header)]
    return [i for i in candidates if whole and all(f[i].strip() in ("0", "1") for f in whole)]
