"""Fetching dataset files: where they are looked for, downloading with a progress bar, checksums.

Files are looked for in, in order: an explicit `data_dir`, `$CNNKIT_DATA`, and the user cache
directory (where downloads go). A download streams into `NAME.part`, is verified, and only then
renamed to `NAME`, so an interrupted or corrupt download is never used.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import platformdirs
from tqdm import tqdm

from ..errors import CnnkitError

# A mirror that replaces every official base URL (for tests against a local server, or a
# company mirror). The file's path below the base stays the same.
MIRROR_ENV = "CNNKIT_DATA_URL"
CHUNK_BYTES = 1 << 20


def cache_dir() -> Path:
    """Where downloads go: $CNNKIT_DATA if set, else the per-user cache directory."""
    env = os.environ.get("CNNKIT_DATA")
    return Path(env) if env else Path(platformdirs.user_cache_dir("cnnkit")) / "data"


def search_dirs(data_dir: str | os.PathLike | None, subdirs: list[str]) -> list[Path]:
    """Folders that may hold a dataset's files, most specific first."""
    roots = [Path(data_dir)] if data_dir else []
    if os.environ.get("CNNKIT_DATA"):
        roots.append(Path(os.environ["CNNKIT_DATA"]))
    roots.append(cache_dir())
    out: list[Path] = []
    for root in roots:
        for sub in subdirs:
            p = root / sub if sub else root
            if p not in out:
                out.append(p)
    return out


def md5_of_file(path: Path, decompress: bool = False) -> str:
    """md5 of a file's bytes, or of its gzip-decompressed content."""
    h = hashlib.md5()
    opener = gzip.open if decompress else open
    try:
        with opener(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                h.update(chunk)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise CnnkitError(f"{path} is corrupt ({e}); delete it and run again to download a fresh copy") from None
    return h.hexdigest()


def verify(path: Path, md5: str, decompressed: bool) -> None:
    """Refuse a file whose checksum differs from the published one."""
    got = md5_of_file(path, decompress=decompressed)
    if got != md5:
        what = "decompressed content" if decompressed else "file"
        raise CnnkitError(
            f"{path} failed its checksum (md5 of {what} is {got}, expected {md5}); "
            "it is truncated or corrupt: delete it and run again to download a fresh copy"
        )


def download(urls: list[str], dest: Path, md5: str, decompressed: bool, quiet: bool = False) -> Path:
    """Download the first URL that answers into `dest`, verify it, rename into place."""
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:  # same file name below the mirror's base URL
        urls = [mirror.rstrip("/") + "/" + u.rsplit("/", 1)[1] for u in urls[:1]]
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}",
                          disable=quiet, leave=False) as bar:
                    while chunk := resp.read(CHUNK_BYTES):
                        out.write(chunk)
                        bar.update(len(chunk))
            if total is not None and part.stat().st_size != total:
                raise OSError(f"got {part.stat().st_size} of {total} bytes")
            verify(part, md5, decompressed)
            os.replace(part, dest)
            return dest
        except (OSError, urllib.error.URLError, CnnkitError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
            part.unlink(missing_ok=True)
    raise CnnkitError(f"could not download {dest.name} ({'; '.join(errors)})")
