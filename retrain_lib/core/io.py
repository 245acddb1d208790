"""Local file primitives every layer shares: atomic writes, file digests, safe ids.

An atomic write goes to a hidden temp file beside its target (``.<name>.<hex>.tmp``), which is
renamed over the target only once it is complete, so a reader never sees half a file and a
crash leaves at most a temp file that listings skip (:func:`is_in_flight`).
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_sha256",
    "is_in_flight",
    "safe_id",
    "stream_sha256",
]

_TMP_SUFFIX = ".tmp"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def is_in_flight(name: str) -> bool:
    """Whether a file name is the temp file of an unfinished atomic write."""
    return name.startswith(".") and (name.endswith(_TMP_SUFFIX) or _TMP_SUFFIX + "." in name)


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write to; it replaces ``path`` on success.

    The parent folder is created. When the block raises, the temp file is removed and
    ``path`` is left as it was. ``keep_suffix`` ends the temp name with ``path``'s suffix too,
    for writers that pick or check a format by it (GDAL/OGR).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = target.suffix if keep_suffix else ""
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}{suffix}"
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    with open(path, "rb") as handle:
        return stream_sha256(handle)


def stream_sha256(stream: IO[bytes]) -> str:
    """Hex SHA-256 of what a binary stream holds, read in blocks."""
    # Not hashlib.file_digest: it needs readinto(), which an S3 response body lacks.
    digest = hashlib.sha256()
    while block := stream.read(1 << 20):
        digest.update(block)
    return digest.hexdigest()


def safe_id(raw: str, *, replacement: str = "-", max_length: int = 128,
            fallback: str = "x") -> str:
    """An id safe for storage keys, file names and MLflow: runs of characters other than
    letters, digits, ``.``, ``_`` and ``-`` become ``replacement``; leading and trailing
    ``replacement`` and ``.`` are dropped; at most ``max_length`` characters."""
    cleaned = _UNSAFE.sub(replacement, raw).strip(replacement + ".")[:max_length]
    return cleaned or fallback
