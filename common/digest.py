"""Content digests of files: the sha256 that names and verifies every model artifact.

:func:`sha256_file` is the one implementation, used by ``meshctl models register`` (a local
artifact's digest), the node's model store (verifying a cached or downloaded file) and the demo
models. It streams the file in 1 MiB chunks, so memory stays flat whatever the artifact's size.
"""

from __future__ import annotations

import hashlib
import os
from typing import Final

__all__ = ["CHUNK_BYTES", "sha256_file"]

#: Bytes read per chunk while hashing.
CHUNK_BYTES: Final = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The lowercase hex SHA-256 digest of the file at ``path`` (OSError if it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
