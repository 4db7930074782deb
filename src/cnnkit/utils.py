"""Small helpers shared by every module: atomic writes (text and CSV), file hashing, progress bars."""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path` (atomic on POSIX).

    A crash or kill leaves at worst a stray `.tmp` file, never a half-written `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # same suffix: writers that check it (torch.export) accept it
    try:
        yield tmp
        with open(tmp, "rb") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(path: str | os.PathLike, header: list[str], rows: list[list]) -> None:
    import csv
    import io
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def cache_dir() -> Path:
    """Where downloads, decoded datasets and exports go: $CNNKIT_DATA if set, else the per-user cache."""
    import platformdirs
    env = os.environ.get("CNNKIT_DATA")
    return Path(env) if env else Path(platformdirs.user_cache_dir("cnnkit")) / "data"


def hash_file(path: str | os.PathLike, algorithm: str = "md5", block_bytes: int = 1 << 20) -> str:
    """A file's digest, read in blocks (archives of hundreds of MB, model files)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            h.update(block)
    return h.hexdigest()


def hash_bytes(data: bytes, algorithm: str = "md5") -> str:
    return hashlib.new(algorithm, data).hexdigest()


# ----------------------------------------------------------------------------- progress
PROGRESS_LINE_SECONDS = 30.0  # off a terminal: at most one progress line per this many seconds


class LineProgress:
    """tqdm's update / set_postfix / close for logs and pipes: a carriage-return bar would write
    hundreds of updates per epoch into a CI log, so this prints a plain line at most every
    PROGRESS_LINE_SECONDS (none at all for work shorter than that)."""

    def __init__(self, total: int | None, desc: str, unit: str, file):
        self.total, self.desc, self.unit, self.file = total, desc, unit, file
        self.n, self.postfix = 0, ""
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_LINE_SECONDS:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            print(f"{self.desc}: {self.n}{of} {self.unit}{' ' + self.postfix if self.postfix else ''}",
                  file=self.file, flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it", disable: bool = False, unit_scale: bool = False):
    """A progress bar on stderr: tqdm on a terminal, LineProgress elsewhere, nothing when disabled."""
    from tqdm import tqdm
    if disable:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=False, dynamic_ncols=True)
    return LineProgress(total, desc, unit, sys.stderr)
