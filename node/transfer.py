"""Moving an artifact's bytes into a ``.part`` file while hashing them: a local copy or an
http(s) download that resumes.

Contract:

* :meth:`Transfer.copy_file` and :meth:`Transfer.download` write the artifact to ``part`` and
  return the sha256 (hex) of the bytes written; they never judge it (the store compares it
  with the sha256 asked for). Failures are :class:`StoreError` with a reason a user can act on.
* An artifact over ``max_bytes`` is refused: before any byte moves when its size is known,
  otherwise as soon as the stream passes the limit; its ``.part`` is deleted.
* A download that hits a connection error, a 5xx/408/429 status, or a body shorter than its
  ``Content-Length`` is retried up to ``retries`` times with a backoff doubling from 0.2 s (at
  most 5 s), resuming with ``Range: bytes=<have>-`` (a 206 reply is appended; a 200 reply
  restarts from zero). A ``.part`` already on disk (an earlier, interrupted process) is resumed
  the same way. When the network failed the ``.part`` is kept for the next fetch.
* ``progress(bytes_so_far, total_or_None)`` is called after each chunk of at most 1 MiB; setting
  ``cancel`` stops the transfer at the next chunk (or retry wait) with :class:`StoreError`.
* Blocking: call from a worker thread, never the event loop.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHUNK", "Progress", "StoreError", "Transfer"]

_log = logging.getLogger("meshserve.node.store")

CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_BACKOFF_S = 0.2  # first retry delay; doubles per attempt, capped at _BACKOFF_MAX_S
_BACKOFF_MAX_S = 5.0

Progress = Callable[[int, int | None], None]
"""``progress(bytes_so_far, total_or_None)``; see :meth:`ModelStore.fetch`."""


class StoreError(Exception):
    """An artifact could not be fetched or failed verification; ``str()`` is the reason."""


class _Transient(Exception):
    """A network failure worth retrying (with a resume)."""


@dataclass(frozen=True, slots=True)
class Transfer:
    """How artifacts are moved: their size limit, the per-request timeout and the retries."""

    max_bytes: int
    timeout_s: float = 60.0
    retries: int = 3

    def copy_file(
        self, src: Path, part: Path, progress: Progress | None, cancel: threading.Event
    ) -> str:
        try:
            size = src.stat().st_size
        except OSError as exc:
            raise StoreError(f"cannot read artifact {src}: {exc.strerror}") from exc
        if size > self.max_bytes:
            raise StoreError(f"artifact {src} is {size} bytes, over the limit of {self.max_bytes}")
        digest = hashlib.sha256()
        done = 0
        try:
            with src.open("rb") as f, part.open("wb") as out:
                while chunk := f.read(CHUNK):
                    if cancel.is_set():
                        raise StoreError(f"copy of {src} was cancelled")
                    done += len(chunk)
                    if done > self.max_bytes:
                        raise StoreError(
                            f"artifact {src} exceeds the limit of {self.max_bytes} bytes"
                        )
                    digest.update(chunk)
                    out.write(chunk)
                    if progress is not None:
                        progress(done, size)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise StoreError(f"cannot read artifact {src}: {exc}") from exc
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return digest.hexdigest()

    def download(
        self,
        uri: str,
        sha256: str,
        part: Path,
        progress: Progress | None,
        cancel: threading.Event,
    ) -> str:
        attempt = 0
        while True:
            try:
                return self._download_once(uri, sha256, part, progress, cancel)
            except _Transient as exc:
                attempt += 1
                if attempt > self.retries:
                    raise StoreError(
                        f"cannot download {uri} after {attempt} attempt(s): {exc}; "
                        "the partial download is kept and will be resumed by the next fetch"
                    ) from exc
                delay = min(_BACKOFF_S * 2 ** (attempt - 1), _BACKOFF_MAX_S)
                _log.info("download of %s failed (%s); retry %d in %.1fs", uri, exc, attempt, delay)
                if cancel.wait(delay):
                    raise StoreError(f"download of {uri} was cancelled") from exc

    def _download_once(
        self,
        uri: str,
        sha256: str,
        part: Path,
        progress: Progress | None,
        cancel: threading.Event,
    ) -> str:
        digest, have = self._resume_point(part)
        headers = {"Range": f"bytes={have}-"} if have else {}
        request = urllib.request.Request(uri, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                length_header = resp.headers.get("Content-Length")
                remaining = int(length_header) if length_header is not None else None
                total: int | None
                if have and resp.status == 206:
                    start, total = _content_range(resp.headers.get("Content-Range"))
                    if start != have:  # not the range we asked for: start over cleanly
                        part.unlink(missing_ok=True)
                        raise _Transient(f"server sent a range starting at {start}, not {have}")
                    if total is None and remaining is not None:
                        total = have + remaining
                    mode = "ab"
                else:  # 200: a full body (the server may have ignored our Range)
                    digest, have, total, mode = hashlib.sha256(), 0, remaining, "wb"
                if total is not None and total > self.max_bytes:
                    part.unlink(missing_ok=True)
                    raise StoreError(
                        f"artifact {uri} is {total} bytes, over the limit of {self.max_bytes}"
                    )
                done = have
                with part.open(mode) as out:
                    while chunk := resp.read(CHUNK):
                        if cancel.is_set():
                            raise StoreError(f"download of {uri} was cancelled")
                        done += len(chunk)
                        if done > self.max_bytes:
                            out.close()
                            part.unlink(missing_ok=True)
                            raise StoreError(
                                f"artifact {uri} exceeds the limit of {self.max_bytes} bytes"
                            )
                        digest.update(chunk)
                        out.write(chunk)
                        if progress is not None:
                            progress(done, total)
                if total is not None and done < total:
                    raise _Transient(f"connection closed after {done} of {total} bytes")
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # nothing past our part: it may be complete already
                if digest.hexdigest() == sha256:
                    return sha256
                part.unlink(missing_ok=True)
                raise _Transient("the partial download was invalid; restarting") from exc
            if exc.code >= 500 or exc.code in (408, 429):
                raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
            raise StoreError(f"cannot download {uri}: HTTP {exc.code} {exc.reason}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(str(exc) or type(exc).__name__) from exc
        return digest.hexdigest()

    def _resume_point(self, part: Path) -> tuple[hashlib._Hash, int]:
        """The digest of the bytes already in ``part`` and their count (0: start from zero)."""
        digest = hashlib.sha256()
        try:
            size = part.stat().st_size
        except FileNotFoundError:
            return digest, 0
        if size == 0 or size > self.max_bytes:
            part.unlink(missing_ok=True)
            return digest, 0
        with part.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        return digest, size


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(start, total)`` from a ``Content-Range: bytes a-b/total`` header (None: unknown)."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if match is None:
        return None, None
    total = match.group(3)
    return int(match.group(1)), (None if total == "*" else int(total))
