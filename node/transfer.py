"""Moving an artifact's bytes into a ``.part`` file while hashing them: a local copy, an
http(s) download that resumes, or an object-store download (``s3://``, ``gs://``, ``az://``)
through fsspec that resumes.

Which code moves which URI, and why:

* ``s3://`` (``s3a://``), ``gs://`` (``gcs://``), ``az://`` (``abfs://``, ``abfss://``): fsspec
  with its maintained backends, installed as optional extras (``meshserve[s3]`` = s3fs,
  ``meshserve[gcs]`` = gcsfs, ``meshserve[azure]`` = adlfs). Credentials and endpoints come from
  each backend's standard configuration (for s3: ``AWS_*`` environment variables, ``~/.aws``,
  ``AWS_ENDPOINT_URL``; or the node flag ``--s3-endpoint-url``). A URI whose backend is not
  installed fails permanently with the ``pip install 'meshserve[<extra>]'`` to run. Resuming is
  a seek to the end of the ``.part`` (every backend reads byte ranges). Other fsspec protocols
  (and ``a::b`` chains) are refused: each would be a new way for a node to reach something.
* ``http(s)://``: our own fetcher below, kept on purpose. fsspec's http backend (aiohttp)
  cannot keep the rules a node needs: it follows redirects to any host (``_file_info`` passes
  ``allow_redirects=True``; aiohttp offers on/off, not a same-origin check per hop, so a node
  could be turned into a fetcher of internal hosts), it reads whole blocks (the minimum-rate
  check could not see a trickle), and on a server without ranges its seekable file refuses to
  resume ("Open with block_size=0 for a streaming file interface") while its streaming file
  cannot seek at all. urllib with :class:`_SameOrigin` does all three.
* ``file://``: a plain local copy (fsspec's local backend would add nothing), only under the
  node's ``--artifact-root`` directories.

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
  ``--artifact-host``, ``--artifact-bucket``): a ``file://`` artifact only under its roots
  (symbolic links and ``..`` resolved first), an http(s) one only from its hosts, an object-store
  one only from its buckets; a redirect is followed only to the same scheme, host and port (never
  to another host, whatever the hosts allowed). A refusal is a permanent :class:`StoreError` sent
  before any byte is read.
* Object stores keep the same guarantees (size limit from the object's size before any byte
  moves, resume, retries with backoff, deadline, minimum rate, cancel, progress), with one
  difference: the bytes come in ranged reads of :data:`OBJECT_BLOCK`, so the deadline and rate
  checks run between reads, and one read is bounded by the backend's socket timeout (set to the
  request timeout, or the rate window when a minimum rate is on). A missing object is transient
  (it may be uploaded yet, as an http 404); access denied or missing credentials are permanent.
* Blocking: call from a worker thread, never the event loop.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import http.client
import logging
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "CHUNK",
    "OBJECT_BLOCK",
    "OBJECT_STORES",
    "SCHEMES",
    "Progress",
    "SourcePolicy",
    "StoreError",
    "Transfer",
]

_log = logging.getLogger("meshserve.node.store")

CHUNK = 1 << 20
OBJECT_BLOCK = 8 << 20  # one ranged read of an object-store artifact (progress still per CHUNK)
OBJECT_STORES: Mapping[str, str] = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
}
"""Object-store URI scheme -> the backend's name: its ``meshserve[<name>]`` extra and its key in
:attr:`Transfer.storage_options`."""
SCHEMES = ("file", "http", "https", *OBJECT_STORES)
"""Every artifact URI scheme a node accepts."""
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
    fetched from (None: any). Redirects are followed within one origin only.
    ``buckets``: see the field."""

    file_roots: tuple[Path, ...] | None = None
    http_hosts: frozenset[str] | None = None
    buckets: frozenset[str] | None = None
    """The buckets (containers) an object-store artifact may be read from, lower case (None:
    any): ``s3://b/key`` is bucket ``b``."""
    s3_endpoint_url: str | None = None
    """The S3 endpoint (an S3-compatible server: MinIO, Ceph, moto) for ``s3://`` artifacts
    (None: botocore's own configuration, e.g. ``AWS_ENDPOINT_URL``; node flag
    ``--s3-endpoint-url``)."""

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

    def check_bucket(self, uri: str) -> None:
        """A permanent error unless the bucket of object-store ``uri`` may be read from."""
        if self.buckets is None:
            return
        # az://container@account.blob.core.windows.net/key: the container comes first
        bucket = urllib.parse.urlsplit(uri).netloc.partition("@")[0].lower()
        if bucket not in self.buckets:
            raise StoreError(
                f"artifact bucket {bucket!r} of {uri} is not among this node's artifact buckets "
                f"({', '.join(sorted(self.buckets))}; node flag --artifact-bucket)",
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
    storage_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per backend (``s3``, ``gcs``, ``azure``: :data:`OBJECT_STORES`'s values), the keyword
    arguments of its fsspec filesystem (for s3: ``endpoint_url``); credentials are best left to
    the backend's own configuration (environment, config files, instance metadata)."""

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
        once: Callable[[str, str, Path, Progress | None, threading.Event, _Clock], str]
        if urllib.parse.urlsplit(uri).scheme in ("http", "https"):
            self.sources.check_url(uri)
            once = self._download_once
        else:
            self.sources.check_bucket(uri)
            fs, path = self._object_store(uri)
            once = functools.partial(self._object_once, fs, path)
        attempt = 0
        clock = _Clock(time.monotonic() + self.deadline_s)
        while True:
            try:
                return once(uri, sha256, part, progress, cancel, clock)
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

    def _object_store(self, uri: str) -> tuple[Any, str]:
        """The fsspec filesystem for object-store ``uri`` and the object's path in it; a
        permanent error when its backend is not installed or will not start."""
        scheme = urllib.parse.urlsplit(uri).scheme
        backend = OBJECT_STORES.get(scheme)
        if backend is None:
            raise StoreError(
                f"unsupported artifact URI scheme {scheme!r} in {uri!r} "
                f"(use {', '.join(s + '://' for s in SCHEMES)})",
                permanent=True,
            )
        try:
            import fsspec  # type: ignore[import-untyped]

            cls = fsspec.get_filesystem_class(scheme)
        except ImportError as exc:
            raise StoreError(
                f"{scheme}:// artifacts need a storage backend this node lacks ({exc}): "
                f"install it with pip install 'meshserve[{backend}]'",
                permanent=True,
            ) from exc
        options: dict[str, Any] = dict(self.storage_options.get(backend, {}))
        if backend == "s3" and self.sources.s3_endpoint_url:
            options.setdefault("endpoint_url", self.sources.s3_endpoint_url)
        if backend == "s3":  # one socket read is bounded like an http one
            timeout = min(self.timeout_s, self.rate_window_s if self.min_rate_bps > 0 else 1e9)
            config = {
                "connect_timeout": timeout,
                "read_timeout": timeout,
                "retries": {"total_max_attempts": 2},  # our loop retries, resuming
            }
            options["config_kwargs"] = {**config, **options.get("config_kwargs", {})}
        try:
            fs = cls(**options)
        except Exception as exc:  # a backend's own configuration errors: nothing to retry
            raise StoreError(
                f"cannot set up the {scheme}:// storage backend for {uri}: "
                f"{type(exc).__name__}: {exc}",
                permanent=True,
            ) from exc
        return fs, str(cls._strip_protocol(uri))

    def _object_once(
        self,
        fs: Any,
        path: str,
        uri: str,
        sha256: str,
        part: Path,
        progress: Progress | None,
        cancel: threading.Event,
        clock: _Clock,
    ) -> str:
        """One attempt at an object-store download, resuming from ``part``."""
        digest, have = self._resume_point(part)
        if time.monotonic() >= clock.deadline:
            raise self.overdue(uri)
        with _backend_errors(uri, clock, self):
            size = fs.info(path).get("size")
        total = int(size) if size is not None else None
        if total is not None and total > self.max_bytes:
            part.unlink(missing_ok=True)
            raise StoreError(
                f"artifact {uri} is {total} bytes, over the limit of {self.max_bytes}",
                permanent=True,
            )
        if total is not None and have > total:  # not a prefix of this object
            part.unlink(missing_ok=True)
            digest, have = hashlib.sha256(), 0
        if total is not None and have == total:  # complete already, as after an http 416
            if digest.hexdigest() == sha256:
                return sha256
            part.unlink(missing_ok=True)
            raise _Transient("the partial download was invalid; restarting")
        rate = _Rate(self.min_rate_bps, self.rate_window_s)
        with _backend_errors(uri, clock, self):
            f = fs.open(path, "rb", block_size=OBJECT_BLOCK, cache_type="none")
        try:
            with part.open("ab" if have else "wb") as out:
                if have:
                    with _backend_errors(uri, clock, self):
                        f.seek(have)
                chunks = _object_chunks(f, rate, clock, self, uri)
                done = self._pump(
                    chunks, out, part, digest, have, total, uri, "download", progress, cancel
                )
        finally:
            with contextlib.suppress(Exception):  # a read-only file: nothing to flush
                f.close()
        if total is not None and done < total:
            raise _Transient(f"the object ended after {done} of {total} bytes")
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


def _object_chunks(
    f: Any, rate: _Rate, clock: _Clock, transfer: Transfer, uri: str
) -> Iterator[bytes]:
    """The rest of open object file ``f`` in slices of at most :data:`CHUNK`, read in ranged
    reads of :data:`OBJECT_BLOCK`, checking the minimum rate and the deadline after each read."""
    while True:
        with _backend_errors(uri, clock, transfer):
            block = f.read(OBJECT_BLOCK)
        slow = rate.check(len(block))
        if slow is not None:
            raise transfer.too_slow(uri, *slow)
        if time.monotonic() >= clock.deadline:
            raise transfer.overdue(uri)
        if not block:
            return
        for start in range(0, len(block), CHUNK):
            yield block[start : start + CHUNK]


@contextlib.contextmanager
def _backend_errors(uri: str, clock: _Clock, transfer: Transfer) -> Iterator[None]:
    """Translate what an object-store backend raises (its own types: botocore, aiohttp, azure)
    into our failures: a missing object is a transient :class:`StoreError` (it may be uploaded
    yet), access denied or missing credentials a permanent one, anything else a retry."""
    try:
        yield
    except FileNotFoundError as exc:
        raise StoreError(f"cannot download {uri}: no such object") from exc
    except PermissionError as exc:
        raise StoreError(
            f"cannot download {uri}: access denied ({exc}); check the node's credentials "
            "for this store",
            permanent=True,
        ) from exc
    except Exception as exc:
        if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            raise StoreError(
                f"cannot download {uri}: {exc} (for s3: AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)",
                permanent=True,
            ) from exc
        if time.monotonic() >= clock.deadline:
            raise transfer.overdue(uri) from exc
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc


_OPENER = urllib.request.build_opener(_SameOrigin())


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(start, total)`` from a ``Content-Range: bytes a-b/total`` header (None: unknown)."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if match is None:
        return None, None
    total = match.group(3)
    return int(match.group(1)), (None if total == "*" else int(total))
