"""Where a node may read artifacts from (:class:`SourcePolicy`): ``file://`` only under its
roots (links and ``..`` resolved), http(s) only from its hosts, redirects within one origin.

Real files and real ``ThreadingHTTPServer`` instances on 127.0.0.1; each server counts the
requests it answered, so "never fetched" is asserted, not assumed.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from meshserve.node.store import ModelStore, SourcePolicy, StoreError

BODY = os.urandom(2000)
SHA = hashlib.sha256(BODY).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        if self.path.startswith("/redirect") and self.server.location:
            self.send_response(302)
            self.send_header("Location", self.server.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hits: list[str]
    location: str


@pytest.fixture
def servers() -> Iterator[tuple[_Server, _Server]]:
    """Two artifact servers on two ports: two origins."""
    made = []
    for _ in range(2):
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.hits, httpd.location = [], ""
        thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
        thread.start()
        made.append((httpd, thread))
    try:
        yield made[0][0], made[1][0]
    finally:
        for httpd, thread in made:
            httpd.shutdown()
            httpd.server_close()
            thread.join()


def _url(server: _Server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def _artifact(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "m.onnx"
    path.write_bytes(BODY)
    return path


async def test_a_file_under_a_root_is_fetched(tmp_path: Path) -> None:
    src = _artifact(tmp_path / "models")
    store = ModelStore(tmp_path / "cache", sources=SourcePolicy(file_roots=(tmp_path / "models",)))
    assert (await store.fetch(src.as_uri(), SHA)).read_bytes() == BODY


@pytest.mark.parametrize(
    "how", ["outside every root", "a link out of a root", "dot-dot out of a root", "no roots"]
)
async def test_a_file_outside_the_roots_is_refused_before_it_is_read(
    tmp_path: Path, how: str
) -> None:
    root, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    root.mkdir()
    secret = _artifact(elsewhere)
    roots: tuple[Path, ...] = (root,)
    if how == "outside every root":
        uri = secret.as_uri()
    elif how == "a link out of a root":
        (root / "link.onnx").symlink_to(secret)
        uri = (root / "link.onnx").as_uri()
    elif how == "dot-dot out of a root":
        uri = "file://" + str(root) + "/../elsewhere/m.onnx"
    else:
        roots, uri = (), secret.as_uri()
    store = ModelStore(tmp_path / "cache", sources=SourcePolicy(file_roots=roots))
    with pytest.raises(StoreError) as info:
        await store.fetch(uri, SHA)  # the right sha256: only the policy refuses it
    assert info.value.permanent
    assert "--artifact-root" in str(info.value)
    assert not list((tmp_path / "cache").glob("*.onnx"))


@pytest.mark.parametrize("where", ["another port", "a port that is no number", "another scheme"])
async def test_a_redirect_to_another_origin_is_not_followed(
    tmp_path: Path, servers: tuple[_Server, _Server], where: str
) -> None:
    first, other = servers
    first.location = {
        "another port": _url(other, "/m.onnx"),
        "a port that is no number": "http://127.0.0.1:port/m.onnx",
        "another scheme": _url(other, "/m.onnx").replace("http://", "https://"),
    }[where]
    store = ModelStore(tmp_path / "cache", retries=0)
    with pytest.raises(StoreError) as info:
        await store.fetch(_url(first, "/redirect"), SHA)
    assert info.value.permanent
    assert "another host" in str(info.value)
    assert other.hits == [], "the other origin was never asked"


async def test_a_redirect_within_the_origin_is_followed(
    tmp_path: Path, servers: tuple[_Server, _Server]
) -> None:
    first, _ = servers
    first.location = _url(first, "/m.onnx")
    path = await ModelStore(tmp_path / "cache").fetch(_url(first, "/redirect"), SHA)
    assert path.read_bytes() == BODY
    assert first.hits == ["/redirect", "/m.onnx"]


async def test_only_the_allowed_hosts_are_fetched_from(
    tmp_path: Path, servers: tuple[_Server, _Server]
) -> None:
    allowed, refused = servers
    port = allowed.server_address[1]
    policy = SourcePolicy(http_hosts=frozenset({f"127.0.0.1:{port}"}))
    store = ModelStore(tmp_path / "cache", sources=policy, retries=0)
    assert (await store.fetch(_url(allowed, "/m.onnx"), SHA)).read_bytes() == BODY
    other = ModelStore(tmp_path / "cache2", sources=policy, retries=0)
    with pytest.raises(StoreError) as info:
        await other.fetch(_url(refused, "/m.onnx"), SHA)
    assert info.value.permanent and "--artifact-host" in str(info.value)
    assert refused.hits == []
