"""Model store: fetch an artifact (file://, http(s)://) into a local cache and verify its sha256.

Contract:

* :meth:`ModelStore.fetch` returns a path whose content hashes to the requested sha256, or raises
  :class:`StoreError` with a reason a user can act on. Nothing unverified is ever returned: the
  sha256 is computed over the whole final file, and a file that does not match is deleted.
* Files are cached as ``<root>/<sha256>.onnx``; a second fetch of the same artifact costs one hash
  check and never touches the source.
* http(s) downloads go to ``<root>/<sha256>.part``. A connection error or a body shorter than its
  ``Content-Length`` is retried up to ``retries`` times with a short backoff, resuming with
  ``Range: bytes=<have>-`` (a 206 reply is appended; a 200 reply restarts from zero). A ``.part``
  left by an earlier, interrupted process is resumed the same way. A ``.part`` is deleted when its
  content is refused (sha256 mismatch, over the size limit) and kept when the network failed.
* An artifact over ``max_artifact_bytes`` is refused: before downloading when its size is known,
  otherwise as soon as the stream passes the limit.
* The cache is bounded by ``max_cache_bytes`` (the ``.onnx`` files): after every successful fetch
  the least-recently-used artifacts are deleted until the total fits, except the one just fetched,
  any being fetched, and any pinned with :meth:`ModelStore.pin`. Recency is the last fetch (a hit
  counts); it is kept in memory and, via ``os.utime``, in the file's mtime, so it survives restarts.
* Blocking I/O runs in a worker thread; the event loop is never blocked by a fetch. Fetches of the
  same sha256 are serialised; cancelling a fetch stops its download at the next chunk (the
  ``.part`` is kept for the next attempt).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import itertools
import logging
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from meshserve.common.digest import sha256_file

__all__ = ["CacheEntry", "ModelStore", "Progress", "StoreError"]

_log = logging.getLogger("meshserve.node.store")

_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_BACKOFF_S = 0.2  # first retry delay; doubles per attempt, capped at _BACKOFF_MAX_S
_BACKOFF_MAX_S = 5.0

Progress = Callable[[int, int | None], None]
"""``progress(bytes_so_far, total_or_None)``; see :meth:`ModelStore.fetch`."""


L = TypeVar("L")


class _KeyedLocks(Generic[L]):
    """One lock per key that exists only while someone holds a reference to it (not itself
    thread-safe: callers serialise acquire/release)."""

    def __init__(self, factory: Callable[[], L]) -> None:
        self._factory = factory
        self._entries: dict[str, tuple[L, int]] = {}

    def acquire(self, key: str) -> L:
        """The key's lock (created on first use); every call needs one :meth:`release`."""
        entry = self._entries.get(key)
        lock = entry[0] if entry is not None else self._factory()
        self._entries[key] = (lock, (entry[1] if entry is not None else 0) + 1)
        return lock

    def release(self, key: str) -> None:
        lock, users = self._entries[key]
        if users <= 1:
            del self._entries[key]
        else:
            self._entries[key] = (lock, users - 1)


class StoreError(Exception):
    """An artifact could not be fetched or failed verification; ``str()`` is the reason."""


class _Transient(Exception):
    """A network failure worth retrying (with a resume)."""


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached artifact, as listed by :meth:`ModelStore.entries`."""

    sha256: str
    path: Path
    size: int
    last_used: float  # seconds since the epoch (the file's mtime)
    pinned: bool


class ModelStore:
    """A verified, size-bounded artifact cache under ``root``; see the module docstring."""

    def __init__(
        self,
        root: Path,
        *,
        max_cache_bytes: int = 20 << 30,
        max_artifact_bytes: int = 2 << 30,
        timeout_s: float = 60.0,
        retries: int = 3,
    ) -> None:
        self._root = root
        self._max_cache = max_cache_bytes
        self._max = max_artifact_bytes
        self._timeout = timeout_s
        self._retries = max(0, retries)
        self._mutex = threading.Lock()  # guards everything below (used from worker threads)
        self._pins: Counter[str] = Counter()
        self._active: Counter[str] = Counter()  # sha256s being fetched by a worker thread
        self._used: dict[str, int] = {}  # sha256 -> use sequence number in this process
        self._seq = itertools.count(1)
        self._sha_locks = _KeyedLocks(threading.Lock)  # guarded by self._mutex
        self._async_locks = _KeyedLocks(asyncio.Lock)  # event-loop only

    @property
    def root(self) -> Path:
        return self._root

    # -- pins and cache inspection ------------------------------------------------------------

    def pin(self, sha256: str) -> None:
        """Protect ``sha256`` from eviction (counted: each pin needs its own :meth:`unpin`).

        The artifact need not be cached yet; pin before :meth:`fetch` so that no concurrent
        fetch can evict the file between the fetch returning and the caller loading it.
        """
        with self._mutex:
            self._pins[sha256.lower()] += 1

    def unpin(self, sha256: str) -> None:
        """Undo one :meth:`pin`; unpinning an artifact that is not pinned does nothing."""
        with self._mutex:
            sha = sha256.lower()
            if self._pins[sha] <= 1:
                self._pins.pop(sha, None)
            else:
                self._pins[sha] -= 1

    def entries(self) -> list[CacheEntry]:
        """The cached artifacts, least recently used first (a small directory scan)."""
        with self._mutex:
            return self._scan_locked()

    def cached_bytes(self) -> int:
        """Total size of the cached artifacts (``.part`` files not included)."""
        return sum(e.size for e in self.entries())

    # -- fetch --------------------------------------------------------------------------------

    async def fetch(self, uri: str, sha256: str, *, progress: Progress | None = None) -> Path:
        """Fetch ``uri`` into the cache, verify it hashes to ``sha256`` and return its path.

        ``progress(bytes_so_far, total_or_None)`` is called after each chunk (at most every
        1 MiB) of a download or copy, **from the worker thread**, not the event loop: it must be
        thread-safe and quick (use ``loop.call_soon_threadsafe`` to reach the loop). On a resumed
        download the count includes the bytes already on disk. It is not called on a cache hit.
        Raises :class:`StoreError` with the reason when the artifact cannot be had or is refused.
        """
        sha = sha256.lower()
        lock = self._async_locks.acquire(sha)
        try:
            async with lock:
                cancel = threading.Event()
                work = asyncio.ensure_future(
                    asyncio.to_thread(self._fetch_blocking, uri, sha, progress, cancel)
                )
                try:
                    return await asyncio.shield(work)
                except asyncio.CancelledError:
                    # Stop the worker at its next chunk and wait for it, so the lock still
                    # covers it: a later fetch of this sha256 never races an orphaned download.
                    cancel.set()
                    await asyncio.wait([work])
                    if not work.cancelled():
                        work.exception()  # retrieved: the caller asked to cancel, not to know
                    raise
        finally:
            self._async_locks.release(sha)

    def _fetch_blocking(
        self, uri: str, sha256: str, progress: Progress | None, cancel: threading.Event
    ) -> Path:
        if not _SHA256.match(sha256):
            raise StoreError(f"invalid sha256 {sha256!r}: expected 64 hex characters")
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme not in ("file", "http", "https"):
            raise StoreError(
                f"unsupported artifact URI scheme {parsed.scheme!r} in {uri!r} "
                "(use file://, http:// or https://)"
            )
        with self._mutex:
            self._active[sha256] += 1
            sha_lock = self._sha_locks.acquire(sha256)
        try:
            with sha_lock:  # also serialises fetches from several event loops / threads
                path = self._fetch_locked(uri, parsed, sha256, progress, cancel)
            self._touch(sha256, path)
            self._evict(keep=sha256)
            return path
        finally:
            with self._mutex:
                self._active[sha256] -= 1
                if self._active[sha256] <= 0:
                    del self._active[sha256]
                self._sha_locks.release(sha256)

    def _fetch_locked(
        self,
        uri: str,
        parsed: urllib.parse.ParseResult,
        sha256: str,
        progress: Progress | None,
        cancel: threading.Event,
    ) -> Path:
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the model cache {self._root}: {exc}") from exc
        final = self._root / f"{sha256}.onnx"
        if final.exists():
            if sha256_file(final) == sha256:
                return final
            _log.warning("cached artifact %s is corrupt; fetching it again", final)
            final.unlink(missing_ok=True)
        part = self._root / f"{sha256}.part"
        if parsed.scheme == "file":
            src = Path(urllib.request.url2pathname(parsed.path))
            digest = self._copy_file(src, part, progress, cancel)
        else:
            digest = self._download(uri, sha256, part, progress, cancel)
        if digest != sha256:
            part.unlink(missing_ok=True)
            raise StoreError(
                f"sha256 mismatch for {uri}: expected {sha256}, got {digest}; "
                "the artifact was refused"
            )
        os.replace(part, final)
        return final

    def _copy_file(
        self, src: Path, part: Path, progress: Progress | None, cancel: threading.Event
    ) -> str:
        try:
            size = src.stat().st_size
        except OSError as exc:
            raise StoreError(f"cannot read artifact {src}: {exc.strerror}") from exc
        if size > self._max:
            raise StoreError(f"artifact {src} is {size} bytes, over the limit of {self._max}")
        digest = hashlib.sha256()
        done = 0
        try:
            with src.open("rb") as f, part.open("wb") as out:
                while chunk := f.read(_CHUNK):
                    if cancel.is_set():
                        raise StoreError(f"copy of {src} was cancelled")
                    done += len(chunk)
                    if done > self._max:
                        raise StoreError(f"artifact {src} exceeds the limit of {self._max} bytes")
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

    def _download(
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
                if attempt > self._retries:
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
            with urllib.request.urlopen(request, timeout=self._timeout) as resp:
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
                if total is not None and total > self._max:
                    part.unlink(missing_ok=True)
                    raise StoreError(
                        f"artifact {uri} is {total} bytes, over the limit of {self._max}"
                    )
                done = have
                with part.open(mode) as out:
                    while chunk := resp.read(_CHUNK):
                        if cancel.is_set():
                            raise StoreError(f"download of {uri} was cancelled")
                        done += len(chunk)
                        if done > self._max:
                            out.close()
                            part.unlink(missing_ok=True)
                            raise StoreError(
                                f"artifact {uri} exceeds the limit of {self._max} bytes"
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
        if size == 0 or size > self._max:
            part.unlink(missing_ok=True)
            return digest, 0
        with part.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return digest, size

    # -- recency and eviction -----------------------------------------------------------------

    def _touch(self, sha256: str, path: Path) -> None:
        with self._mutex:
            self._used[sha256] = next(self._seq)
        try:
            os.utime(path)
        except OSError as exc:  # recency then lives in memory only; not worth failing a fetch
            _log.debug("cannot touch %s: %s", path, exc)

    def _scan_locked(self) -> list[CacheEntry]:
        found: list[tuple[tuple[int, int], CacheEntry]] = []
        try:
            paths = list(self._root.glob("*.onnx"))
        except OSError:
            return []
        for path in paths:
            sha = path.stem
            if not _SHA256.match(sha):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            # Used in this process: by use order (strict); otherwise by mtime, and older than
            # anything used since start.
            seq = self._used.get(sha)
            key = (1, seq) if seq is not None else (0, st.st_mtime_ns)
            found.append((key, CacheEntry(sha, path, st.st_size, st.st_mtime, sha in self._pins)))
        found.sort(key=lambda kv: kv[0])
        return [entry for _, entry in found]

    def _evict(self, keep: str) -> None:
        with self._mutex:
            entries = self._scan_locked()
            total = sum(e.size for e in entries)
            for entry in entries:
                if total <= self._max_cache:
                    return
                if entry.sha256 == keep or entry.pinned or entry.sha256 in self._active:
                    continue
                try:
                    entry.path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    _log.warning("cannot evict %s: %s", entry.path, exc)
                    continue
                total -= entry.size
                self._used.pop(entry.sha256, None)
                _log.info("evicted %s (%d bytes) from the model cache", entry.path, entry.size)
            if total > self._max_cache:
                _log.warning(
                    "model cache holds %d bytes, over its limit of %d: the rest is pinned or busy",
                    total,
                    self._max_cache,
                )


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(start, total)`` from a ``Content-Range: bytes a-b/total`` header (None: unknown)."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if match is None:
        return None, None
    total = match.group(3)
    return int(match.group(1)), (None if total == "*" else int(total))
