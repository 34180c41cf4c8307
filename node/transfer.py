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
* A download is bounded in time: it fails (transient) once ``deadline_s`` has passed since it
  began (every attempt and retry wait included), or when fewer than ``min_rate_bps`` x
  ``rate_window_s`` bytes arrived in the last ``rate_window_s`` seconds (a server trickling bytes,
  or one that stalls: each read returns what has arrived, so a trickle never hides behind a full
  chunk). The check runs after every read; the socket timeout is at most ``rate_window_s``.
* Every :class:`StoreError` says whether retrying can help: ``permanent`` for a refusal of the
  content or the request itself (over the size limit, an HTTP 4xx other than 404/408/429, an
  unsupported URI, a sha256 mismatch decided by the store), not for the network (connection
  refused, timeout, 5xx, too slow, a missing file that may appear).
* ``progress(bytes_so_far, total_or_None)`` is called after each chunk of at most 1 MiB; setting
  ``cancel`` stops the transfer at the next chunk (or retry wait) with :class:`StoreError`.
* Where bytes may come from is a :class:`SourcePolicy` (node flags ``--artifact-root``,
  ``--artifact-host``): a ``file://`` artifact only under its roots (symbolic links and ``..``
  resolved first), an http(s) one only from its hosts; a redirect is followed only to the same
  scheme, host and port (never to another host, whatever the hosts allowed). A refusal is a
  permanent :class:`StoreError` sent before any byte is read.
* Blocking: call from a worker thread, never the event loop.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import logging
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["CHUNK", "Progress", "SourcePolicy", "StoreError", "Transfer"]

_log = logging.getLogger("meshserve.node.store")

CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_BACKOFF_S = 0.2  # first retry delay; doubles per attempt, capped at _BACKOFF_MAX_S
_BACKOFF_MAX_S = 5.0

Progress = Callable[[int, int | None], None]
"""``progress(bytes_so_far, total_or_None)``; see :meth:`ModelStore.fetch`."""


class StoreError(Exception):
    """An artifact could not be fetched or failed verification; ``str()`` is the reason.

    ``permanent``: retrying the same artifact cannot help (its content or the request is
    refused); False for a failure of the network or the source that may pass (retried later)."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.permanent = permanent


class _Transient(Exception):
    """A network failure worth retrying (with a resume)."""


@dataclass(frozen=True, slots=True)
class SourcePolicy:
    """Where artifacts may be read from.

    ``file_roots``: the directories a ``file://`` artifact must lie under (None: anywhere, for
    embedding and unit tests; empty: no ``file://`` at all, the node's default).
    ``http_hosts``: the hosts (``host`` or ``host:port``, lower case) an http(s) artifact may be
    fetched from (None: any). Redirects are followed within one origin only."""

    file_roots: tuple[Path, ...] | None = None
    http_hosts: frozenset[str] | None = None

    def local_path(self, src: Path) -> Path:
        """``src`` resolved (links, ``..``), when it lies under a root; else a permanent error."""
        if self.file_roots is None:
            return src
        if not self.file_roots:
            raise StoreError(
                f"file:// artifacts are off on this node ({src}): start it with "
                "--artifact-root DIR for the directories it may read models from",
                permanent=True,
            )
        resolved = src.resolve()
        for root in self.file_roots:
            if resolved.is_relative_to(root.resolve()):
                return resolved
        roots = ", ".join(str(r) for r in self.file_roots)
        raise StoreError(
            f"artifact {src} is outside this node's artifact roots ({roots}; node flag "
            "--artifact-root)",
            permanent=True,
        )

    def check_url(self, uri: str) -> None:
        """A permanent error unless ``uri``'s host may be fetched from."""
        if self.http_hosts is None:
            return
        parts = urllib.parse.urlsplit(uri)
        host = (parts.hostname or "").lower()
        try:
            with_port = f"{host}:{parts.port}" if parts.port is not None else host
        except ValueError:  # a port that is no number
            raise StoreError(f"artifact URI {uri!r} has an invalid port", permanent=True) from None
        if host not in self.http_hosts and with_port not in self.http_hosts:
            raise StoreError(
                f"artifact host {with_port or uri!r} is not among this node's artifact hosts "
                f"({', '.join(sorted(self.http_hosts))}; node flag --artifact-host)",
                permanent=True,
            )


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, the default port filled in (-1: an invalid port)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        port = -1
    return parts.scheme, (parts.hostname or "").lower(), port


class _SameOrigin(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to the scheme, host and port of the URL it came from: a node is
    never turned into a fetcher of other hosts (SSRF) by an artifact server."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        if _origin(newurl) != _origin(req.full_url):
            raise StoreError(
                f"artifact {req.full_url} redirects (HTTP {code}) to {newurl}, another host: "
                "a node follows redirects within the same scheme, host and port only",
                permanent=True,
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@dataclass(frozen=True, slots=True)
class Transfer:
    """How artifacts are moved: their size limit, the per-request timeout, the retries, and the
    bounds of one download (overall deadline; minimum rate over a sliding window, 0: none)."""

    max_bytes: int
    timeout_s: float = 60.0
    retries: int = 3
    deadline_s: float = 1800.0
    min_rate_bps: float = 0.0
    rate_window_s: float = 30.0
    sources: SourcePolicy = SourcePolicy()

    def copy_file(
        self, src: Path, part: Path, progress: Progress | None, cancel: threading.Event
    ) -> str:
        src = self.sources.local_path(src)
        try:
            size = src.stat().st_size
        except OSError as exc:
            raise StoreError(f"cannot read artifact {src}: {exc.strerror}") from exc
        if size > self.max_bytes:
            raise StoreError(
                f"artifact {src} is {size} bytes, over the limit of {self.max_bytes}",
                permanent=True,
            )
        digest = hashlib.sha256()
        try:
            with src.open("rb") as f, part.open("wb") as out:
                chunks = iter(lambda: f.read(CHUNK), b"")
                self._pump(chunks, out, part, digest, 0, size, str(src), "copy", progress, cancel)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise StoreError(f"cannot read artifact {src}: {exc}") from exc
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return digest.hexdigest()

    def _pump(
        self,
        chunks: Iterable[bytes],
        out: IO[Any],
        part: Path,
        digest: Any,
        done: int,
        total: int | None,
        source: str,
        verb: str,
        progress: Progress | None,
        cancel: threading.Event,
    ) -> int:
        """Write ``chunks`` to ``out`` (the open ``part`` file) and into ``digest``, checking the
        cancel flag and the size limit per chunk (over it: ``part`` is removed, a permanent
        error) and reporting progress; returns the byte count after the last chunk. ``source``
        and ``verb`` name the transfer in errors ("download of URI was cancelled")."""
        for chunk in chunks:
            if cancel.is_set():
                raise StoreError(f"{verb} of {source} was cancelled")
            done += len(chunk)
            if done > self.max_bytes:
                out.close()
                part.unlink(missing_ok=True)
                raise StoreError(
                    f"artifact {source} exceeds the limit of {self.max_bytes} bytes",
                    permanent=True,
                )
            digest.update(chunk)
            out.write(chunk)
            if progress is not None:
                progress(done, total)
        return done

    def download(
        self,
        uri: str,
        sha256: str,
        part: Path,
        progress: Progress | None,
        cancel: threading.Event,
    ) -> str:
        self.sources.check_url(uri)
        attempt = 0
        clock = _Clock(time.monotonic() + self.deadline_s)
        while True:
            try:
                return self._download_once(uri, sha256, part, progress, cancel, clock)
            except _Transient as exc:
                attempt += 1
                if attempt > self.retries:
                    raise StoreError(
                        f"cannot download {uri} after {attempt} attempt(s): {exc}; "
                        "the partial download is kept and will be resumed by the next fetch"
                    ) from exc
                delay = min(_BACKOFF_S * 2 ** (attempt - 1), _BACKOFF_MAX_S)
                if time.monotonic() + delay >= clock.deadline:
                    raise self.overdue(uri) from exc
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
        clock: _Clock,
    ) -> str:
        digest, have = self._resume_point(part)
        headers = {"Range": f"bytes={have}-"} if have else {}
        request = urllib.request.Request(uri, headers=headers)
        timeout = self.timeout_s
        if self.min_rate_bps > 0:
            timeout = min(timeout, self.rate_window_s)
        timeout = max(0.05, min(timeout, clock.deadline - time.monotonic()))
        if time.monotonic() >= clock.deadline:
            raise self.overdue(uri)
        try:
            with _OPENER.open(request, timeout=timeout) as resp:
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
                        f"artifact {uri} is {total} bytes, over the limit of {self.max_bytes}",
                        permanent=True,
                    )
                done = have
                rate = _Rate(self.min_rate_bps, self.rate_window_s)
                with part.open(mode) as out:
                    chunks = iter(lambda: _read_some(resp, rate, clock, self, uri), b"")
                    done = self._pump(
                        chunks, out, part, digest, done, total, uri, "download", progress, cancel
                    )
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
            raise StoreError(
                f"cannot download {uri}: HTTP {exc.code} {exc.reason}",
                permanent=exc.code != 404,  # a 404 may be an upload not finished yet
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= clock.deadline:
                raise self.overdue(uri) from exc
            raise _Transient(str(exc) or type(exc).__name__) from exc
        return digest.hexdigest()

    def overdue(self, uri: str) -> StoreError:
        """The deadline failure of a download of ``uri``."""
        return StoreError(
            f"download of {uri} did not finish within its deadline of {self.deadline_s:g}s "
            "(node flag --download-deadline-s); it will be retried later"
        )

    def too_slow(self, uri: str, got: int, window: float) -> StoreError:
        """The minimum-rate failure of a download of ``uri``: ``got`` bytes in ``window`` s."""
        return StoreError(
            f"download of {uri} is too slow: {got} bytes in the last {window:.0f}s, under the "
            f"minimum of {self.min_rate_bps:g} bytes/s (node flag --download-min-rate); "
            "it will be retried later"
        )

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


@dataclass(slots=True)
class _Clock:
    """When one download (all its attempts) must be over, on ``time.monotonic``."""

    deadline: float


class _Rate:
    """The minimum-rate rule over a sliding window: bytes seen per read, oldest dropped."""

    def __init__(self, min_bps: float, window_s: float) -> None:
        self._min_bytes = min_bps * window_s
        self._window = window_s
        self._started = time.monotonic()
        self._seen: collections.deque[tuple[float, int]] = collections.deque()
        self._sum = 0

    def check(self, got: int) -> tuple[int, float] | None:
        """Record ``got`` bytes now; ``(bytes in window, window)`` when the rule is broken."""
        if self._min_bytes <= 0:
            return None
        now = time.monotonic()
        self._seen.append((now, got))
        self._sum += got
        while self._seen and self._seen[0][0] < now - self._window:
            self._sum -= self._seen.popleft()[1]
        if now - self._started >= self._window and self._sum < self._min_bytes:
            return self._sum, self._window
        return None


def _read_some(
    resp: http.client.HTTPResponse, rate: _Rate, clock: _Clock, transfer: Transfer, uri: str
) -> bytes:
    """The next bytes of ``resp`` (at most :data:`CHUNK`; what has arrived, not a full chunk),
    after checking the deadline and the minimum rate."""
    try:
        chunk = resp.read1(CHUNK)
    except TimeoutError:
        chunk = None
    slow = rate.check(len(chunk or b""))
    if slow is not None:
        raise transfer.too_slow(uri, *slow)
    if time.monotonic() >= clock.deadline:
        raise transfer.overdue(uri)
    if chunk is None:
        raise _Transient("the connection stalled (socket timeout)")
    return chunk


_OPENER = urllib.request.build_opener(_SameOrigin())


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(start, total)`` from a ``Content-Range: bytes a-b/total`` header (None: unknown)."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if match is None:
        return None, None
    total = match.group(3)
    return int(match.group(1)), (None if total == "*" else int(total))
