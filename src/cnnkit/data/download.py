"""Fetching dataset files: where they are looked for, downloading with a progress bar, checksums.

Files are looked for in, in order: an explicit `data_dir`, `$CNNKIT_DATA`, and the user cache
directory (where downloads go). A download streams into `NAME.part`, is verified, and only then
renamed to `NAME`, so an interrupted or corrupt download is never used.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import os
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Callable

from ..errors import CnnkitError
from ..utils import cache_dir, hash_file, progress

# A mirror that replaces every official base URL (for tests against a local server, or a
# company mirror). The file's path below the base stays the same.
MIRROR_ENV = "CNNKIT_DATA_URL"
CHUNK_BYTES = 1 << 20


# Errors writing the download to this machine's disk: no other mirror can help (cli/ words them).
LOCAL_FAULTS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR)

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


def md5_of_file(path: Path) -> str:
    """md5 of a file's bytes, streamed (the CIFAR-10 archive is 170 MB)."""
    try:
        return hash_file(path, "md5", CHUNK_BYTES)
    except OSError as e:
        raise CnnkitError(f"cannot read {path} ({e})") from None


def verify(path: Path, md5: str) -> None:
    """Refuse a file whose md5 differs from the published one (archives published by md5 alone)."""
    got = md5_of_file(path)
    if got != md5:
        raise CnnkitError(f"{path} failed its archive checksum (md5 {got}, expected {md5}): it is not the official "
                          "archive; delete it and run again to download a fresh copy")


def read_verified(path: Path, archive_md5: str | None, content_md5: str | None) -> bytes:
    """The content of a dataset file (gunzipped if it is gzip), accepted if the file's md5 equals the
    published archive md5 OR its content's md5 equals the content md5: mirrors and distributions
    re-compress archives (`gzip -n`: a new header, the same bytes inside), and many ship the files
    uncompressed. A failure names each check with what was found and expected."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CnnkitError(f"cannot read {path} ({e})") from None
    compressed = raw[:2] == b"\x1f\x8b"  # the gzip magic number
    archive_got = hashlib.md5(raw).hexdigest() if compressed else None
    if compressed:
        try:
            content = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise CnnkitError(f"{path} is an incomplete or damaged gzip file ({e}): it is truncated or corrupt; "
                              "delete it and run again to download a fresh copy") from None
        if archive_md5 is not None and archive_got == archive_md5:
            return content
    else:
        content = raw
    content_got = hashlib.md5(content).hexdigest()
    if content_md5 is not None and content_got == content_md5:
        return content
    checks = []
    if compressed and archive_md5 is not None:
        checks.append(f"archive md5 {archive_got}, expected {archive_md5}")
    if content_md5 is not None:
        checks.append(f"{'decompressed ' if compressed else ''}content md5 {content_got}, expected {content_md5}")
    raise CnnkitError(f"{path} failed its checksum ({'; '.join(checks)}): its data differs from the official "
                      "file; delete it and run again to download a fresh copy, or replace it with the official file")


def download(urls: list[str], dest: Path, check: Callable[[Path], object], quiet: bool = False) -> Path:
    """Download the first URL that answers into `dest`, `check` it (raising CnnkitError if it is not
    the official file), then rename it into place."""
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
                with progress(total, f"download {dest.name}", unit="B", unit_scale=True, disable=quiet) as bar:
                    while chunk := resp.read(CHUNK_BYTES):
                        out.write(chunk)
                        bar.update(len(chunk))
            if total is not None and part.stat().st_size != total:
                raise OSError(f"got {part.stat().st_size} of {total} bytes")
            check(part)
            os.replace(part, dest)
            return dest
        except (OSError, urllib.error.URLError, CnnkitError) as e:
            part.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno in LOCAL_FAULTS:  # this disk's fault, not the network's
                e.filename = e.filename or str(part)
                raise
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
    raise CnnkitError(f"could not download {dest.name} ({'; '.join(errors)})")
