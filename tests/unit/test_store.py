"""ModelStore: verified fetch, resumable http downloads, size limits, LRU-by-bytes cache.

The http tests use a real ``ThreadingHTTPServer`` on 127.0.0.1 whose behaviour each test sets:
serve a body, honour or ignore ``Range``, cut the first response short, omit Content-Length.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from meshserve.node.store import ModelStore, StoreError

MiB = 1 << 20


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Behaviour:
    body: bytes = b""
    cut_first_after: int | None = None  # first response: send this many body bytes, then close
    ignore_range: bool = False  # always answer 200 with the whole body
    no_length: bool = False  # omit Content-Length (body ends when the connection closes)
    ranges: list[str | None] = field(default_factory=list)  # Range header of each request
    served: int = 0  # body bytes written to clients, all requests together
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        b = self.server.behaviour
        rng = self.headers.get("Range")
        with b.lock:
            first = not b.ranges
            b.ranges.append(rng)
        body, start = memoryview(b.body), 0
        if rng is not None and not b.ignore_range:
            start = int(rng.removeprefix("bytes=").removesuffix("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        if not b.no_length:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if first and b.cut_first_after is not None:
            payload = payload[: b.cut_first_after]
        try:
            for i in range(0, len(payload), 64 << 10):
                chunk = payload[i : i + (64 << 10)]
                self.wfile.write(chunk)
                with b.lock:
                    b.served += len(chunk)
        except OSError:  # the client hung up (e.g. it refused the artifact)
            pass

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    behaviour: Behaviour


@pytest.fixture
def server() -> Iterator[tuple[Behaviour, str]]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.behaviour = Behaviour()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield httpd.behaviour, f"http://127.0.0.1:{httpd.server_address[1]}/model.onnx"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


async def test_file_fetch_is_verified_and_cached(tmp_path: Path) -> None:
    data = os.urandom(3000)
    src = tmp_path / "src.onnx"
    src.write_bytes(data)
    store = ModelStore(tmp_path / "cache")
    path = await store.fetch(src.as_uri(), _sha(data).upper())
    assert path == tmp_path / "cache" / f"{_sha(data)}.onnx"
    assert path.read_bytes() == data
    src.unlink()  # a second fetch must not need the source
    assert await store.fetch(src.as_uri(), _sha(data)) == path
    assert _files(tmp_path / "cache") == [path.name]
    assert store.cached_bytes() == 3000


async def test_sha_mismatch_is_refused_and_leaves_nothing(
    tmp_path: Path, server: tuple[Behaviour, str]
) -> None:
    behaviour, url = server
    behaviour.body = os.urandom(5000)
    store = ModelStore(tmp_path / "cache")
    with pytest.raises(StoreError) as info:
        await store.fetch(url, "ab" * 32)
    assert str(info.value) == (
        f"sha256 mismatch for {url}: expected {'ab' * 32}, got {_sha(behaviour.body)}; "
        "the artifact was refused"
    )
    assert _files(tmp_path / "cache") == []


async def test_content_length_over_limit_is_refused_before_downloading(
    tmp_path: Path, server: tuple[Behaviour, str]
) -> None:
    behaviour, url = server
    behaviour.body = bytes(64 * MiB)  # more than loopback socket buffers can swallow
    store = ModelStore(tmp_path / "cache", max_artifact_bytes=MiB)
    calls: list[tuple[int, int | None]] = []
    with pytest.raises(StoreError, match=f"is {64 * MiB} bytes, over the limit of {MiB}"):
        await store.fetch(url, _sha(behaviour.body), progress=lambda n, t: calls.append((n, t)))
    assert calls == []
    assert _files(tmp_path / "cache") == []
    assert behaviour.served < len(behaviour.body)


async def test_stream_past_limit_without_length_is_refused(
    tmp_path: Path, server: tuple[Behaviour, str]
) -> None:
    behaviour, url = server
    behaviour.body, behaviour.no_length = os.urandom(3 * MiB), True
    store = ModelStore(tmp_path / "cache", max_artifact_bytes=2 * MiB)
    with pytest.raises(StoreError, match=f"exceeds the limit of {2 * MiB} bytes"):
        await store.fetch(url, _sha(behaviour.body))
    assert _files(tmp_path / "cache") == []


async def test_interrupted_download_resumes_with_range(
    tmp_path: Path, server: tuple[Behaviour, str]
) -> None:
    behaviour, url = server
    behaviour.body, behaviour.cut_first_after = os.urandom(3 * MiB + 17), MiB + 123
    store = ModelStore(tmp_path / "cache")
    path = await store.fetch(url, _sha(behaviour.body))
    assert path.read_bytes() == behaviour.body
    assert behaviour.ranges == [None, f"bytes={MiB + 123}-"]
    assert behaviour.served == len(behaviour.body) < 2 * len(behaviour.body)
    assert _files(tmp_path / "cache") == [path.name]


async def test_part_left_by_an_earlier_process_is_resumed(
    tmp_path: Path, server: tuple[Behaviour, str]
) -> None:
    behaviour, url = server
    behaviour.body = os.urandom(2 * MiB)
    sha = _sha(behaviour.body)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{sha}.part").write_bytes(behaviour.body[:700_000])
    path = await ModelStore(tmp_path / "cache").fetch(url, sha)
    assert path.read_bytes() == behaviour.body
    assert behaviour.ranges == ["bytes=700000-"]
    assert behaviour.served == len(behaviour.body) - 700_000


async def test_server_ignoring_range_restarts_from_zero(
    tmp_path: Path, server: tuple[Behaviour, str]
) -> None:
    behaviour, url = server
    behaviour.body, behaviour.cut_first_after = os.urandom(2 * MiB), 500_000
    behaviour.ignore_range = True
    path = await ModelStore(tmp_path / "cache").fetch(url, _sha(behaviour.body))
    assert path.read_bytes() == behaviour.body
    assert behaviour.ranges == [None, "bytes=500000-"]  # asked to resume, got a 200


async def test_retries_exhausted_keeps_the_part_for_later(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = ModelStore(tmp_path / "cache", retries=0)
    with pytest.raises(StoreError, match=r"cannot download .* after 1 attempt\(s\)"):
        await store.fetch(f"http://127.0.0.1:{port}/m.onnx", "ab" * 32)


async def test_progress_counts_increase_to_the_total(
    tmp_path: Path, server: tuple[Behaviour, str]
) -> None:
    behaviour, url = server
    behaviour.body = os.urandom(3 * MiB + MiB // 2)
    calls: list[tuple[int, int | None]] = []
    await ModelStore(tmp_path / "cache").fetch(
        url, _sha(behaviour.body), progress=lambda n, t: calls.append((n, t))
    )
    counts = [n for n, _ in calls]
    assert counts == sorted(set(counts)) and len(counts) >= 4
    assert all(t == len(behaviour.body) for _, t in calls)
    assert calls[-1] == (len(behaviour.body), len(behaviour.body))


async def test_unsupported_scheme_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="unsupported artifact URI scheme 'ftp'"):
        await ModelStore(tmp_path / "cache").fetch("ftp://127.0.0.1/m.onnx", "ab" * 32)


async def test_concurrent_fetches_of_one_sha_download_once(
    tmp_path: Path, server: tuple[Behaviour, str]
) -> None:
    behaviour, url = server
    behaviour.body = os.urandom(2 * MiB)
    store = ModelStore(tmp_path / "cache")
    a, b = await asyncio.gather(*(store.fetch(url, _sha(behaviour.body)) for _ in range(2)))
    assert a == b and a.read_bytes() == behaviour.body
    assert len(behaviour.ranges) == 1  # the second waited, then hit the cache


def _artifacts(tmp_path: Path, n: int, size: int) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        src = tmp_path / f"src{i}.onnx"
        src.write_bytes(os.urandom(size))
        out.append((src.as_uri(), _sha(src.read_bytes())))
    return out


async def test_lru_eviction_by_bytes_respects_pins_and_recency(tmp_path: Path) -> None:
    (a, sa), (b, sb), (c, sc), (d, sd) = _artifacts(tmp_path, 4, 1000)
    store = ModelStore(tmp_path / "cache", max_cache_bytes=2500)
    await store.fetch(a, sa)
    await store.fetch(b, sb)
    await store.fetch(a, sa)  # a cache hit counts as a use: b is now the LRU
    await store.fetch(c, sc)
    assert [e.sha256 for e in store.entries()] == [sa, sc]
    store.pin(sa)
    await store.fetch(d, sd)  # LRU is a, but it is pinned: c goes
    assert {e.sha256 for e in store.entries()} == {sa, sd}
    assert [e.pinned for e in store.entries()] == [True, False]
    store.unpin(sa)
    await store.fetch(b, sb)  # a is the LRU again and no longer pinned
    assert [e.sha256 for e in store.entries()] == [sd, sb]
    assert store.cached_bytes() == 2000


async def test_just_fetched_artifact_is_never_evicted(tmp_path: Path) -> None:
    (a, sa), (b, sb) = _artifacts(tmp_path, 2, 1000)
    store = ModelStore(tmp_path / "cache", max_cache_bytes=500)  # smaller than one artifact
    await store.fetch(a, sa)
    assert [e.sha256 for e in store.entries()] == [sa]
    store.pin(sa)
    await store.fetch(b, sb)  # over the limit, but a is pinned and b was just fetched
    assert {e.sha256 for e in store.entries()} == {sa, sb}


async def test_recency_survives_a_restart(tmp_path: Path) -> None:
    (a, sa), (b, sb), (c, sc) = _artifacts(tmp_path, 3, 1000)
    first = ModelStore(tmp_path / "cache")
    for uri, sha in ((a, sa), (b, sb)):
        await first.fetch(uri, sha)
    os.utime(tmp_path / "cache" / f"{sb}.onnx", (1_000_000, 1_000_000))  # b: used long ago
    second = ModelStore(tmp_path / "cache", max_cache_bytes=2000)
    assert [e.sha256 for e in second.entries()] == [sb, sa]
    await second.fetch(c, sc)
    assert [e.sha256 for e in second.entries()] == [sa, sc]
