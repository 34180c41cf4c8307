"""Model store: fetch an artifact (file://, http(s)://, s3://, gs://, az://) into a local cache
and verify its sha256.

Contract:

* :meth:`ModelStore.fetch` returns a path whose content hashes to the requested sha256, or raises
  :class:`StoreError` with a reason a user can act on. Nothing unverified is ever returned: the
  sha256 is computed over the whole final file, and a file that does not match is deleted.
* Files are cached as ``<root>/<sha256>.onnx``; a second fetch of the same artifact costs one hash
  check and never touches the source.
* Bytes are moved into ``<root>/<sha256>.part`` by :class:`~meshserve.node.transfer.Transfer`:
  http(s) and object-store downloads are retried up to ``retries`` times, resuming from the end
  of the ``.part`` (a ``Range`` request; a ranged read through fsspec for ``s3://``, ``gs://``,
  ``az://``); a ``.part`` left by an earlier, interrupted process is resumed the same way; an
  artifact over
  ``max_artifact_bytes`` is refused. A ``.part`` is deleted when its content is refused (sha256
  mismatch, over the size limit) and kept when the network failed.
* The cache is bounded by ``max_cache_bytes`` (the ``.onnx`` files): after every successful fetch
  the least-recently-used artifacts are deleted until the total fits, except the one just fetched,
  any being fetched, and any pinned with :meth:`ModelStore.pin`. Recency is the last fetch (a hit
  counts); it is kept in memory and, via ``os.utime``, in the file's mtime, so it survives restarts.
* A :class:`StoreError` says whether retrying can help (``permanent``: sha256 mismatch, over the
  size limit, an unsupported URI, a refused request; see :mod:`meshserve.node.transfer`).
* Blocking I/O runs in a worker thread; the event loop is never blocked by a fetch. Fetches of the
  same sha256 are serialised (one lock per artifact), fetches of different artifacts never wait
  for each other; cancelling a fetch stops its download at the next chunk (the
  ``.part`` is kept for the next attempt).
* Where artifacts may come from is the store's :class:`SourcePolicy` (``file://`` roots, http(s)
  hosts, same-origin redirects only, object-store buckets); a source it refuses is a permanent
  :class:`StoreError`. An object-store URI whose fsspec backend is not installed is a permanent
  :class:`StoreError` naming the ``meshserve[...]`` extra to install.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import threading
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from meshserve.common.digest import sha256_file
from meshserve.node.transfer import SCHEMES, Progress, SourcePolicy, StoreError, Transfer

__all__ = ["CacheEntry", "ModelStore", "Progress", "SourcePolicy", "StoreError"]

_log = logging.getLogger("meshserve.node.store")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")

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
        deadline_s: float = 1800.0,
        min_rate_bps: float = 0.0,
        rate_window_s: float = 30.0,
        sources: SourcePolicy | None = None,
        storage_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """``deadline_s``, ``min_rate_bps``, ``rate_window_s``: the bounds of one download;
        ``sources``: where artifacts may come from (default: anywhere; see
        :class:`~meshserve.node.transfer.Transfer` and its :class:`SourcePolicy`);
        ``storage_options``: per object-store backend (``s3``, ``gcs``, ``azure``), its fsspec
        filesystem's arguments (:attr:`Transfer.storage_options`)."""
        self._root = root
        self._max_cache = max_cache_bytes
        self._transfer = Transfer(
            max_artifact_bytes,
            timeout_s,
            max(0, retries),
            deadline_s=deadline_s,
            min_rate_bps=max(0.0, min_rate_bps),
            rate_window_s=max(0.1, rate_window_s),
            sources=sources or SourcePolicy(),
            storage_options=dict(storage_options or {}),
        )
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
            raise StoreError(
                f"invalid sha256 {sha256!r}: expected 64 hex characters", permanent=True
            )
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme not in SCHEMES:
            raise StoreError(
                f"unsupported artifact URI scheme {parsed.scheme!r} in {uri!r} "
                f"(use {', '.join(s + '://' for s in SCHEMES)})",
                permanent=True,
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
            digest = self._transfer.copy_file(src, part, progress, cancel)
        else:
            digest = self._transfer.download(uri, sha256, part, progress, cancel)
        if digest != sha256:
            part.unlink(missing_ok=True)
            raise StoreError(
                f"sha256 mismatch for {uri}: expected {sha256}, got {digest}; "
                "the artifact was refused",
                permanent=True,
            )
        os.replace(part, final)
        return final

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
