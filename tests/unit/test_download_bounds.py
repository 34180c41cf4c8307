"""Downloads are bounded and say whether retrying can help (issue 14 §3).

A real ``ThreadingHTTPServer`` on 127.0.0.1 answers each path its own way: a status code, a body
trickled one byte at a time, or headers and then silence. Each case checks the
:class:`~meshserve.node.store.StoreError` the store raises (its reason and ``permanent``).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from meshserve.devtools.local import free_port
from meshserve.node.store import ModelStore, StoreError

BODY = b"0123456789" * 100
SHA = hashlib.sha256(BODY).hexdigest()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    stop: threading.Event


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.strip("/")
        if path.isdigit():  # /403, /404, /503: that status
            self.send_error(int(path))
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY) if path != "huge" else 1 << 40))
        self.end_headers()
        try:
            if path in ("ok", "huge"):
                self.wfile.write(BODY)
            elif path == "trickle":  # one byte per 0.2 s
                for i in range(len(BODY)):
                    if self.server.stop.wait(0.2):
                        return
                    self.wfile.write(BODY[i : i + 1])
                    self.wfile.flush()
            elif path == "stall":  # headers, then nothing
                self.server.stop.wait(30)
        except OSError:
            return

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def base() -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@dataclass(frozen=True)
class Kind:
    name: str
    path: str  # appended to the server's base ("" and a full uri: as given)
    sha: str
    permanent: bool
    says: str


KINDS = [
    Kind("a sha256 mismatch is permanent", "/ok", "ab" * 32, True, "sha256 mismatch"),
    Kind("an artifact over the size limit is permanent", "/huge", SHA, True, "over the limit"),
    Kind("HTTP 403 is permanent", "/403", SHA, True, "HTTP 403"),
    Kind("HTTP 404 is transient (an upload not finished yet)", "/404", SHA, False, "HTTP 404"),
    Kind("HTTP 503 is transient", "/503", SHA, False, "HTTP 503"),
    Kind("an unsupported scheme is permanent", "ftp://x/m.onnx", SHA, True, "unsupported"),
    Kind("an invalid sha256 is permanent", "/ok", "xyz", True, "invalid sha256"),
]


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
async def test_failure_says_whether_retrying_can_help(
    kind: Kind, base: str, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path, retries=0, max_artifact_bytes=1 << 20)
    uri = kind.path if "://" in kind.path else base + kind.path
    with pytest.raises(StoreError) as info:
        await store.fetch(uri, kind.sha)
    assert kind.says in str(info.value)
    assert info.value.permanent is kind.permanent


async def test_connection_refused_and_a_missing_file_are_transient(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, retries=0)
    for uri in (f"http://127.0.0.1:{free_port()}/m.onnx", (tmp_path / "nope.onnx").as_uri()):
        with pytest.raises(StoreError) as info:
            await store.fetch(uri, SHA)
        assert info.value.permanent is False, uri


async def test_a_trickling_download_fails_by_the_minimum_rate(base: str, tmp_path: Path) -> None:
    store = ModelStore(tmp_path, min_rate_bps=100.0, rate_window_s=1.0)
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        await store.fetch(f"{base}/trickle", SHA)
    assert time.monotonic() - started < 5  # the window (1 s) and a read, not the whole body
    assert "too slow" in str(info.value) and "minimum of 100 bytes/s" in str(info.value)
    assert info.value.permanent is False


async def test_a_stalled_download_fails_at_its_deadline(base: str, tmp_path: Path) -> None:
    store = ModelStore(tmp_path, deadline_s=1.0, timeout_s=60.0)
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        await store.fetch(f"{base}/stall", SHA)
    assert time.monotonic() - started < 5  # not the 60 s socket timeout
    assert "deadline of 1s" in str(info.value)
    assert info.value.permanent is False


async def test_a_stuck_download_does_not_hold_up_another_artifact(
    base: str, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path, deadline_s=3.0)
    local = tmp_path / "local.onnx"
    local.write_bytes(BODY[::-1])
    stuck = asyncio.ensure_future(store.fetch(f"{base}/stall", SHA))
    await asyncio.sleep(0.2)
    path = await asyncio.wait_for(
        store.fetch(local.as_uri(), hashlib.sha256(BODY[::-1]).hexdigest()), 5
    )
    assert path.read_bytes() == BODY[::-1]
    assert not stuck.done()
    with pytest.raises(StoreError):
        await stuck  # bounded by its own deadline
