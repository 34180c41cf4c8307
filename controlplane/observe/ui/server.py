"""The live map's web server: a replica's own view, pushed to browsers as Server-Sent Events.

Contract (the routes and JSON are ``docs/ui.md``'s; the page is ``static/``):

* Runs on the replica's event loop (aiohttp), on ``--ui-listen`` (``:PORT`` is loopback only).
  It never reads etcd per browser request: every answer comes from :class:`UiSources`, the
  replica's snapshot, node streams, mirrors (the event ring and the leader key included) and
  gateway tallies.
* One publisher task, alive only while a page is open, builds the ``State`` once per push
  (:func:`~meshserve.controlplane.observe.ui.view.mesh_state`: at most every
  :data:`MIN_PUSH_S`, at least every :data:`PUSH_S`, sooner when a mirror changes) and the new
  events since the last push, serialises them once and hands the bytes to every open stream.
  A stream that cannot keep up skips states (it only ever needs the newest) and, past
  :data:`_MAX_EVENT_BATCHES` queued event batches, drops the oldest. At most
  :data:`MAX_STREAMS` streams are open; more are answered 503.
* Access: with tokens configured (the admin token, and ``--ui-viewer-token-file``'s read-only
  token), every ``/api/`` route but ``whoami``/``login``/``logout`` needs a session cookie from
  ``POST /api/login`` or an ``Authorization: Bearer`` header, else 401. The token is compared in
  constant time and never stored in the page; sessions are random ids kept in memory
  (:data:`_SESSION_S`, at most :data:`_MAX_SESSIONS`). The page carries no secret (see view.py).
  Responses carry a strict Content-Security-Policy (scripts from the page's origin only).
* :meth:`UiServer.stop` ends every stream and the publisher, then the listener; awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web

from meshserve.common.errors import NotFound
from meshserve.common.process import listen_address
from meshserve.common.security import secret_matches
from meshserve.controlplane import keys
from meshserve.controlplane.observe.episodes import Episode, EpisodeKey
from meshserve.controlplane.observe.telemetry import Telemetered
from meshserve.controlplane.observe.ui.view import (
    Rates,
    SloTally,
    event_doc,
    explain_doc,
    mesh_state,
)
from meshserve.controlplane.snapshot import Snapshot
from meshserve.protos import mesh_pb2

__all__ = ["MAX_STREAMS", "MIN_PUSH_S", "PUSH_S", "UiServer", "UiSources"]

_log = logging.getLogger("meshserve.controlplane.ui")

PUSH_S = 1.0  # a push at least this often while a page is open (rates move)
MIN_PUSH_S = 0.25  # and at most this often, however fast the mesh changes
MAX_STREAMS = 64
_FIRST_EVENTS = 200  # the newest events a page gets when it connects
_MAX_EVENT_BATCHES = 50  # queued per stream before the oldest are dropped
_KEEPALIVE_S = 15.0  # an SSE comment on an idle stream (proxies close silent connections)
_SESSION_S = 12 * 3600.0
_MAX_SESSIONS = 1000
_COOKIE = "meshserve_ui"
_MAX_LOGIN_BYTES = 4096
_STATIC = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "app.css": "text/css",
}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class UiSources:
    """What the map reads, all of it the replica's own state (no etcd reads)."""

    snapshot: Callable[[], Snapshot]
    sessions: Mapping[str, Telemetered]  # node id -> its stream to this replica
    replica: Callable[[], mesh_pb2.ReplicaInfo]
    replicas: Callable[[], Sequence[mesh_pb2.ReplicaInfo]]
    leader: Callable[[], str]  # the scheduling replica's id ("" when none)
    episodes: Callable[[], Mapping[EpisodeKey, Episode]]  # open alarm episodes
    slo_counts: Callable[[], Mapping[str, tuple[int, int]]]  # model -> (met, total) so far
    events: Callable[[], Mapping[str, bytes]]  # the event ring's records (a mirror)
    explain: Callable[[str, str], mesh_pb2.ExplainPlacementResponse]
    #: change notifications: subscribe(callback) -> unsubscribe (the mirrors')
    subscribe: Sequence[Callable[[Callable[[], None]], Callable[[], None]]] = ()


@dataclass(eq=False)
class _Stream:
    """One open page: the newest state not yet written and the event batches queued."""

    state: bytes | None = None
    #: (newest seq in the batch, the batch's JSON)
    events: deque[tuple[int, bytes]] = field(
        default_factory=lambda: deque(maxlen=_MAX_EVENT_BATCHES)
    )
    seen_seq: int = 0  # the newest event it was sent when it connected
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False


def _json(status: int, doc: Any) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(doc).encode(), content_type="application/json"
    )


def _sse(kind: str, data: bytes) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


class UiServer:
    """The map's HTTP server (see the module contract)."""

    def __init__(
        self,
        sources: UiSources,
        listen: str,
        *,
        tokens: Sequence[str] = (),
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._sources = sources
        self._host, self._port = listen_address(listen, "--ui-listen")
        self._tokens = tuple(t for t in tokens if t)
        self._tls = tls
        self._sessions: dict[str, float] = {}  # session id -> expiry (monotonic)
        self._streams: set[_Stream] = set()
        self._rates = Rates()
        self._slo = SloTally()
        self._dirty = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._last_seq = 0
        self._runner: web.AppRunner | None = None
        self._stopping = False
        self.port = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> int:
        """Listen; the bound port (also :attr:`port`)."""
        app = web.Application(client_max_size=_MAX_LOGIN_BYTES)
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/whoami", self._whoami)
        app.router.add_post("/api/login", self._login)
        app.router.add_post("/api/logout", self._logout)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/stream", self._stream)
        app.router.add_get("/api/explain", self._explain)
        app.on_response_prepare.append(self._secure_headers)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, self._host, self._port, ssl_context=self._tls).start()
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                self.port = int(address[1])
                break
        self._unsubscribe = [subscribe(self._dirty.set) for subscribe in self._sources.subscribe]
        if not self._tokens and self._host not in ("127.0.0.1", "::1", "localhost"):
            _log.warning(
                "the map on %s:%d needs no token: anyone who reaches it sees the mesh "
                "(set an admin token or --ui-viewer-token-file)",
                self._host,
                self.port,
            )
        _log.info("live map on %s", self.url)
        return self.port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"{'https' if self._tls else 'http'}://{host}:{self.port}/"

    async def stop(self) -> None:
        """End every stream and the publisher, then stop listening (awaited)."""
        self._stopping = True
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        for stream in list(self._streams):
            stream.closed = True
            stream.wake.set()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- access -------------------------------------------------------------------------------

    def _allowed(self, request: web.Request) -> bool:
        if not self._tokens:
            return True
        now = time.monotonic()
        sid = request.cookies.get(_COOKIE)
        if sid:
            expiry = self._sessions.get(sid)
            if expiry is not None and expiry > now:
                return True
        header = request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            return self._known(header[7:].strip())
        return False

    def _known(self, token: str) -> bool:
        return secret_matches(token, self._tokens)

    def _refused(self) -> web.Response:
        return _json(401, {"error": "log in with the admin or viewer token", "auth": "token"})

    async def _secure_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        for key, value in _HEADERS.items():
            response.headers.setdefault(key, value)

    async def _whoami(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return self._refused()
        return _json(200, {"auth": "token" if self._tokens else "none", "ok": True})

    async def _login(self, request: web.Request) -> web.Response:
        if not self._tokens:
            return web.Response(status=204)
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            return _json(413, {"error": f"a login is at most {_MAX_LOGIN_BYTES} bytes"})
        except ValueError:
            return _json(400, {"error": 'send JSON {"token": "..."}'})
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not self._known(token):
            await asyncio.sleep(0.5)  # slows a guessing loop down
            return _json(401, {"error": "wrong token", "auth": "token"})
        now = time.monotonic()
        for sid in [s for s, expiry in self._sessions.items() if expiry <= now]:
            del self._sessions[sid]
        while len(self._sessions) >= _MAX_SESSIONS:  # the oldest session goes
            del self._sessions[next(iter(self._sessions))]
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = now + _SESSION_S
        response = web.Response(status=204)
        response.set_cookie(
            _COOKIE,
            sid,
            httponly=True,
            samesite="Strict",
            secure=self._tls is not None,
            max_age=int(_SESSION_S),
            path="/",
        )
        return response

    async def _logout(self, request: web.Request) -> web.Response:
        sid = request.cookies.get(_COOKIE)
        if sid:
            self._sessions.pop(sid, None)
        response = web.Response(status=204)
        response.del_cookie(_COOKIE, path="/")
        return response

    # -- the page -----------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        return self._file(name)

    def _file(self, name: str) -> web.Response:
        body = resources.files("meshserve.controlplane.observe.ui").joinpath("static", name)
        return web.Response(body=body.read_bytes(), content_type=_STATIC[name], charset="utf-8")

    # -- data ---------------------------------------------------------------------------------

    def _build(self) -> dict[str, Any]:
        src = self._sources
        self._slo.update(src.slo_counts())
        return mesh_state(
            snapshot=src.snapshot(),
            sessions=src.sessions,
            replica=src.replica(),
            replicas=src.replicas(),
            leader=src.leader(),
            episodes=src.episodes(),
            rates=self._rates,
            slo=self._slo,
            events_seq=self._last_seq,
            now_ms=int(time.time() * 1000),
        )

    def _events_after(self, seq: int, limit: int) -> list[mesh_pb2.Event]:
        """The ring's events newer than ``seq`` (at most the newest ``limit``), oldest first."""
        records = self._sources.events()
        newer = sorted((k for k in records if k > keys.event_key(seq)), reverse=True)[:limit]
        out = []
        for key in reversed(newer):
            try:
                out.append(keys.decode(records[key], mesh_pb2.Event()))
            except Exception:  # one undecodable record does not hide the others
                _log.debug("event %s: undecodable", key)
        return out

    async def _state(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return self._refused()
        return _json(200, self._build())

    async def _explain(self, request: web.Request) -> web.Response:
        if not self._allowed(request):
            return self._refused()
        model = request.query.get("model", "")
        variant = request.query.get("variant", "")
        if not model or len(model) > 256 or len(variant) > 256:
            return _json(400, {"error": "name a model: /api/explain?model=<name>"})
        if not self._sources.snapshot().variants(model):
            return _json(404, {"error": f"unknown model {model!r}"})
        try:
            result = self._sources.explain(model, variant)
        except NotFound as exc:
            return _json(404, {"error": exc.message})
        return _json(200, explain_doc(model, variant, result))

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if not self._allowed(request):
            return self._refused()
        if self._stopping:
            return _json(503, {"error": "the replica is stopping"})
        if len(self._streams) >= MAX_STREAMS:
            return _json(503, {"error": f"at most {MAX_STREAMS} pages may be open at once"})
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        stream = _Stream()
        self._streams.add(stream)
        try:
            first = self._events_after(0, _FIRST_EVENTS)
            stream.seen_seq = first[-1].seq if first else 0
            await response.write(_sse("events", json.dumps([event_doc(e) for e in first]).encode()))
            await response.write(_sse("state", json.dumps(self._build()).encode()))
            self._ensure_publisher(stream.seen_seq)
            while not stream.closed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stream.wake.wait(), _KEEPALIVE_S)
                stream.wake.clear()
                if stream.closed:
                    break
                if not stream.events and stream.state is None:
                    await response.write(b": keepalive\n\n")
                while stream.events:
                    newest, batch = stream.events.popleft()
                    if newest > stream.seen_seq:  # not already in what it got at connect
                        await response.write(_sse("events", batch))
                state, stream.state = stream.state, None
                if state is not None:
                    await response.write(_sse("state", state))
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the page went away (or the server stops)
        finally:
            self._streams.discard(stream)
        return response

    # -- the publisher ------------------------------------------------------------------------

    def _ensure_publisher(self, since_seq: int) -> None:
        """Start the publisher if none runs; a new one sends the events after ``since_seq``."""
        if self._publisher is None or self._publisher.done():
            self._last_seq = since_seq
            self._publisher = asyncio.create_task(self._publish(), name="ui publisher")

    async def _publish(self) -> None:
        """Push while a page is open (see the module contract); ends when none is."""
        loop = asyncio.get_running_loop()
        while self._streams and not self._stopping:
            started = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), PUSH_S)
            self._dirty.clear()
            await asyncio.sleep(max(0.0, MIN_PUSH_S - (loop.time() - started)))
            try:
                events = self._events_after(self._last_seq, _FIRST_EVENTS)
                if events:
                    self._last_seq = events[-1].seq
                batch = (
                    (events[-1].seq, json.dumps([event_doc(e) for e in events]).encode())
                    if events
                    else None
                )
                state = json.dumps(self._build()).encode()
            except Exception:  # a bad push is skipped, the next one tries again
                _log.exception("the map's state could not be built")
                continue
            for stream in list(self._streams):
                if batch is not None:
                    stream.events.append(batch)
                stream.state = state
                stream.wake.set()
