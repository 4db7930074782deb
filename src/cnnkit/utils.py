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
def atomic_path(path: str | os.PathLike, before_replace=None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path` (atomic on POSIX).

    A crash or kill leaves at worst a stray `.tmp` file, never a half-written `path`. before_replace:
    called once the new file is complete and on disk, just before it replaces `path`. An OSError
    without a file name (a full disk reported by write() or fsync()) is given `path`'s."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the same suffix: writers that check it (torch.export) accept the temporary name
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        # Some writers (safetensors) create files readable by their owner only; a model file is
        # for sharing (a server under another account), so it gets the mode the umask gives.
        mode = 0o666 & ~_umask()
        if os.stat(tmp).st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    """This process's umask, read without changing it (os.umask sets it to read it, racing threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str], before_replace=None) -> None:
    """safetensors' save_file, atomically (atomic_path, with its before_replace), with its I/O
    failures ("I/O error: No space left on device (os error 28)") raised as the OSError they are,
    naming the path."""
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file
    path = Path(path)
    with atomic_path(path, before_replace) as tmp:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


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


# ----------------------------------------------------------------------------- memory
def available_memory_bytes() -> int:
    """Memory this process can still take: the kernel's MemAvailable, or less where a cgroup
    (a container's limit) allows less. Used to refuse, before allocating, what cannot fit."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not Linux: no bound we can read
            return 1 << 62
    try:  # cgroup v2: the limit less what the group already uses
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def redact(url: str) -> str:
    """A URL without its password (user:***@host), for messages, files and params."""
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(url)
    if not parts.password:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))
