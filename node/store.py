"""Model store: fetch an artifact (file://, http(s)://) into a local cache and verify its sha256.

Contract: :meth:`ModelStore.fetch` returns a path whose content hashes to the requested sha256, or
raises :class:`StoreError` with a reason a user can act on. Nothing unverified is ever returned.
Files are cached under their sha256, so a second fetch of the same artifact costs one hash check.
Blocking I/O runs in a worker thread; the event loop is never blocked.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

__all__ = ["ModelStore", "StoreError"]

_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class StoreError(Exception):
    """An artifact could not be fetched or failed verification; ``str()`` is the reason."""


class ModelStore:
    def __init__(self, root: Path, *, max_artifact_bytes: int = 2 << 30, timeout_s: float = 60.0):
        self._root = root
        self._max = max_artifact_bytes
        self._timeout = timeout_s

    @property
    def root(self) -> Path:
        return self._root

    async def fetch(self, uri: str, sha256: str) -> Path:
        return await asyncio.to_thread(self._fetch_blocking, uri, sha256.lower())

    def _fetch_blocking(self, uri: str, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise StoreError(f"invalid sha256 {sha256!r}: expected 64 hex characters")
        self._root.mkdir(parents=True, exist_ok=True)
        final = self._root / f"{sha256}.onnx"
        if final.exists() and _hash_file(final) == sha256:
            return final
        parsed = urllib.parse.urlparse(uri)
        fd, tmp_name = tempfile.mkstemp(dir=self._root, suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                if parsed.scheme == "file":
                    digest = self._copy_file(Path(urllib.request.url2pathname(parsed.path)), out)
                elif parsed.scheme in ("http", "https"):
                    digest = self._download(uri, out)
                else:
                    raise StoreError(
                        f"unsupported artifact URI scheme {parsed.scheme!r} in {uri!r} "
                        "(use file://, http:// or https://)"
                    )
            if digest != sha256:
                raise StoreError(
                    f"sha256 mismatch for {uri}: expected {sha256}, got {digest}; "
                    "the artifact was refused"
                )
            os.replace(tmp, final)
            return final
        finally:
            tmp.unlink(missing_ok=True)

    def _copy_file(self, src: Path, out: object) -> str:
        try:
            size = src.stat().st_size
        except OSError as exc:
            raise StoreError(f"cannot read artifact {src}: {exc.strerror}") from exc
        if size > self._max:
            raise StoreError(f"artifact {src} is {size} bytes, over the limit of {self._max}")
        digest = hashlib.sha256()
        with src.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)  # type: ignore[attr-defined]
        return digest.hexdigest()

    def _download(self, uri: str, out: object) -> str:
        digest = hashlib.sha256()
        total = 0
        try:
            with urllib.request.urlopen(uri, timeout=self._timeout) as resp:
                length = resp.headers.get("Content-Length")
                if length is not None and int(length) > self._max:
                    raise StoreError(
                        f"artifact {uri} is {length} bytes, over the limit of {self._max}"
                    )
                while chunk := resp.read(_CHUNK):
                    total += len(chunk)
                    if total > self._max:
                        raise StoreError(f"artifact {uri} exceeds the limit of {self._max} bytes")
                    digest.update(chunk)
                    out.write(chunk)  # type: ignore[attr-defined]
        except OSError as exc:
            raise StoreError(f"cannot download {uri}: {exc}") from exc
        return digest.hexdigest()


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
