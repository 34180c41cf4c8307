"""Webhook receivers on loopback for the monitoring tests: the ``webhook`` fixture serves one and
yields its URL; :attr:`Hook.received` holds the JSON bodies POSTed to it, in order.
:func:`failing_receiver` serves one that answers every POST 500 (:attr:`Failing.posts`: the
paths POSTed), at a URL carrying a secret in its path and query."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

__all__ = ["Failing", "Hook", "failing_receiver", "webhook"]


class Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    Hook.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/retrain"
    server.shutdown()
    server.server_close()


class Failing(http.server.BaseHTTPRequestHandler):
    """Answers every POST 500, and keeps the paths POSTed."""

    posts: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        Failing.posts.append(self.path)
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def failing_receiver(secret: str) -> Iterator[str]:
    """Serve :class:`Failing` on loopback; its URL, with ``secret`` in its path and query."""
    Failing.posts = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/{secret}?key={secret}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
