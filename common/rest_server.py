"""The Open Inference Protocol over HTTP/REST: one aiohttp app, served beside the gRPC server.

:func:`build_app` takes the RPC handlers of a process's ``inference.GRPCInferenceService``
servicer (as registered: wrapped by its auth checks and
:func:`~meshserve.common.errors.map_errors`) and serves KServe's/Triton's REST paths with them::

    GET  /v2                                      server metadata
    GET  /v2/health/live | /v2/health/ready       200, else 400
    GET  /v2/models/{m}[/versions/{v}]            model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready      200, else 400
    POST /v2/models/{m}[/versions/{v}]/infer      JSON, or Triton's binary-data extension
    GET  /v2/models/{m}[/versions/{v}]/config     Triton's model configuration extension
    POST /v2/repository/index                     Triton's repository index (body: {"ready": b})

Each call gets a :class:`RestContext`, the part of a gRPC servicer context the handlers use:
the caller's ``Authorization``/``x-api-key``, ``x-client-id`` and W3C trace headers as call
metadata (so API keys and tenant rights are checked, admission counted and traces joined as for
gRPC), its address as the peer, the deadline (a ``timeout`` header in seconds or the body's
``timeout`` parameter in microseconds, else none) and the status a handler sets. A handler's
status is answered as HTTP (:func:`meshserve.common.rest.http_status`) with
``{"error": "..."}``; a retry hint as ``Retry-After``. Bodies are held to ``max_body_bytes``
(413 beyond). Large bodies are parsed and answers rendered on a worker thread.

:class:`RestServer` starts the app on the process's event loop and stops it (awaited, bounded)
in the process's stop sequence.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import grpc
from aiohttp import web
from grpc import aio

from meshserve.common import rest
from meshserve.common.codec import DECODE_OFF_LOOP_BYTES
from meshserve.common.errors import RETRY_AFTER_KEY, InvalidArgument, StatusError, status_of
from meshserve.common.security import SecurityConfigError, TLSFiles
from meshserve.protos import inference_pb2

__all__ = [
    "RestContext",
    "RestHandlers",
    "RestServer",
    "build_app",
    "listen_address",
    "ssl_context",
]

_log = logging.getLogger("meshserve.rest")

#: The request headers passed to the handlers as call metadata (lower case, as gRPC's).
FORWARDED_HEADERS: Final = (
    "authorization",
    "x-api-key",
    "x-client-id",
    "traceparent",
    "tracestate",
    "baggage",
)

Handler = Callable[[Any, Any], Awaitable[Any]]


class _Aborted(aio.AbortError):
    """:meth:`RestContext.abort`: an AbortError, so map_errors lets it through as gRPC's."""


class RestContext:
    """What the servicers read of a gRPC ``ServicerContext``, for one REST call."""

    def __init__(
        self, metadata: tuple[tuple[str, str], ...], peer: str, deadline: float | None
    ) -> None:
        self._metadata = metadata
        self._peer = peer
        self._deadline = deadline
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # plain HTTP: no client certificate

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, str]]) -> None:
        self.trailing = tuple(metadata)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        self.code, self.details = code, details
        raise _Aborted(details)


@dataclass(frozen=True, slots=True)
class RestHandlers:
    """A servicer's RPC handlers (``handler(request proto, context)``; errors raised or set on
    the context as :func:`~meshserve.common.errors.map_errors` does). ``infer`` may answer the
    response's bytes."""

    live: Handler
    ready: Handler
    server_metadata: Handler
    model_ready: Handler
    model_metadata: Handler
    infer: Handler
    model_config: Handler
    repository_index: Handler

    @classmethod
    def of(cls, servicer: Any) -> RestHandlers:
        """The handlers of a registered ``GRPCInferenceService`` servicer."""
        return cls(
            live=servicer.ServerLive,
            ready=servicer.ServerReady,
            server_metadata=servicer.ServerMetadata,
            model_ready=servicer.ModelReady,
            model_metadata=servicer.ModelMetadata,
            infer=servicer.ModelInfer,
            model_config=servicer.ModelConfig,
            repository_index=servicer.RepositoryIndex,
        )


def listen_address(listen: str) -> tuple[str, int]:
    """(host, port) of a ``--http-listen`` value: ``HOST:PORT``, ``[::1]:PORT``; ``:PORT`` or
    ``PORT`` alone is 127.0.0.1 (see :func:`meshserve.common.process.metrics_address`)."""
    from meshserve.common.process import listen_address as parse

    return parse(listen, "--http-listen")


def ssl_context(tls: TLSFiles | None, *, require_client_cert: bool) -> ssl.SSLContext | None:
    """HTTPS like the process's gRPC listener: its certificate and key, and when that listener
    requires client certificates, the same CAs required of REST callers (None: plain HTTP, the
    listener has no TLS). A REST caller's certificate only admits the connection: it never
    counts as a router's (the handlers see no peer certificate), so tenants need API keys."""
    if tls is None:
        return None
    if tls.cert is None or tls.key is None:
        raise SecurityConfigError("--http-listen with TLS needs --tls-cert and --tls-key")
    # not create_default_context: it would trust the system's CAs for client certificates too
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    if require_client_cert:
        ca = tls.callers_ca_bytes()
        if ca is None:
            raise SecurityConfigError("requiring client certificates needs a CA file (--tls-ca)")
        context.load_verify_locations(cadata=ca.decode())
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _json(status: int, doc: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(doc).encode(),
        content_type="application/json",
        headers=headers,
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=rest.error_body(message),
        content_type="application/json",
        headers=headers,
    )


def _refusal(context: RestContext) -> web.Response:
    code = context.code or grpc.StatusCode.UNKNOWN
    headers: dict[str, str] = {}
    for key, value in context.trailing:
        if key == RETRY_AFTER_KEY:
            after = rest.retry_after_header(value)
            if after is not None:
                headers["Retry-After"] = after
    return _error(rest.http_status(code), context.details or code.name, headers)


def _deadline(request: web.Request, timeout_s: float | None) -> float | None:
    """The call's absolute deadline: the ``timeout`` header (seconds), else ``timeout_s``."""
    header = request.headers.get("timeout")
    if header is not None:
        try:
            timeout_s = float(header)
        except ValueError:
            raise InvalidArgument(f"header 'timeout' {header[:40]!r}: want seconds") from None
        if not math.isfinite(timeout_s) or timeout_s <= 0:
            raise InvalidArgument(f"header 'timeout' {header[:40]!r}: want seconds > 0")
    return None if timeout_s is None else time.monotonic() + timeout_s


def build_app(handlers: RestHandlers, *, max_body_bytes: int = 64 << 20) -> web.Application:
    """The REST app over ``handlers`` (see the module docstring)."""

    def context_of(request: web.Request, deadline: float | None = None) -> RestContext:
        headers = request.headers
        metadata = tuple((name, headers[name]) for name in FORWARDED_HEADERS if name in headers)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            host = str(peer[0])
            where = f"ipv6:[{host}]:{peer[1]}" if ":" in host else f"ipv4:{host}:{peer[1]}"
        else:
            where = "unix:"
        return RestContext(metadata, where, deadline)

    async def call(
        handler: Handler, message: Any, context: RestContext
    ) -> tuple[Any, web.Response | None]:
        """The handler's answer, or the error response for what it raised or set."""
        try:
            remaining = context.time_remaining()
            if remaining is None:
                answer = await handler(message, context)
            else:
                answer = await asyncio.wait_for(handler(message, context), remaining)
        except _Aborted:
            answer = None
        except TimeoutError:
            return None, _error(504, "deadline exceeded")
        except Exception as exc:
            code, details = status_of(exc)
            context.set_code(code)
            context.set_details(details)
            answer = None
        if context.code not in (None, grpc.StatusCode.OK) or answer is None:
            if context.code is None:
                context.set_code(grpc.StatusCode.INTERNAL)
            return None, _refusal(context)
        return answer, None

    async def probe(
        request: web.Request, handler: Handler, message: Any, field: str
    ) -> web.Response:
        """A health probe: 200 when the answer's ``field`` is true, else 400."""
        answer, failed = await call(handler, message, context_of(request))
        if failed is not None:
            return failed
        value = bool(getattr(answer, field))
        return _json(200 if value else 400, {field: value})

    async def live(request: web.Request) -> web.Response:
        return await probe(request, handlers.live, inference_pb2.ServerLiveRequest(), "live")

    async def ready(request: web.Request) -> web.Response:
        return await probe(request, handlers.ready, inference_pb2.ServerReadyRequest(), "ready")

    async def server_metadata(request: web.Request) -> web.Response:
        ctx = context_of(request)
        message = inference_pb2.ServerMetadataRequest()
        answer, failed = await call(handlers.server_metadata, message, ctx)
        if failed is not None:
            return failed
        doc = {"name": answer.name, "version": answer.version, "extensions": ["binary_tensor_data"]}
        return _json(200, doc)

    def names(request: web.Request) -> tuple[str, str]:
        info = request.match_info
        return info["model"], info.get("version", "")

    def model_call(
        handler: Handler, request_type: Any, render: Callable[[str, Any], web.Response]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """A route asking ``handler`` about the path's model (and version): ``render(name,
        answer)``, or the error response."""

        async def serve(request: web.Request) -> web.Response:
            name, version = names(request)
            message = request_type(name=name, version=version)
            answer, failed = await call(handler, message, context_of(request))
            return failed if failed is not None else render(name, answer)

        return serve

    model_ready = model_call(
        handlers.model_ready,
        inference_pb2.ModelReadyRequest,
        lambda name, a: _json(200 if a.ready else 400, {"name": name, "ready": a.ready}),
    )
    model_metadata = model_call(
        handlers.model_metadata,
        inference_pb2.ModelMetadataRequest,
        lambda _, a: _json(200, rest.metadata_json(a)),
    )
    model_config = model_call(
        handlers.model_config,
        inference_pb2.ModelConfigRequest,
        lambda _, a: _json(200, rest.config_json(a)),
    )

    async def repository_index(request: web.Request) -> web.Response:
        try:
            message = rest.parse_index_request(await request.read())
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the body exceeds {max_body_bytes} bytes (--max-message-mb)")
        except StatusError as exc:
            code, details = status_of(exc)
            return _error(rest.http_status(code), details)
        answer, failed = await call(handlers.repository_index, message, context_of(request))
        if failed is not None:
            return failed
        return _json(200, rest.index_json(answer))

    async def infer(request: web.Request) -> web.Response:
        name, version = names(request)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the body exceeds {max_body_bytes} bytes (--max-message-mb)")
        length = request.headers.get(rest.HEADER_LENGTH)
        try:
            if len(body) > DECODE_OFF_LOOP_BYTES:
                parsed = await asyncio.to_thread(rest.parse_infer, body, length, name, version)
            else:
                parsed = rest.parse_infer(body, length, name, version)
            deadline = _deadline(request, parsed.timeout_s)
        except StatusError as exc:
            code, details = status_of(exc)
            return _error(rest.http_status(code), details)
        del body
        answer, failed = await call(handlers.infer, parsed.request, context_of(request, deadline))
        if failed is not None:
            return failed
        if isinstance(answer, bytes):
            answer = inference_pb2.ModelInferResponse.FromString(answer)
        try:
            if answer.ByteSize() > DECODE_OFF_LOOP_BYTES:
                out, headers = await asyncio.to_thread(rest.render_infer, answer, parsed)
            else:
                out, headers = rest.render_infer(answer, parsed)
        except StatusError as exc:  # the answer's fault, not the caller's
            _log.error("REST: an answer to %r could not be rendered: %s", name, exc.message)
            return _error(500, f"the answer could not be rendered: {exc.message}")
        return web.Response(status=200, body=out, headers=headers)

    app = web.Application(client_max_size=max_body_bytes)
    routes = [
        web.get("/v2", server_metadata),
        web.get("/v2/health/live", live),
        web.get("/v2/health/ready", ready),
        web.post("/v2/repository/index", repository_index),
    ]
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        routes += [
            web.get(base, model_metadata),
            web.get(base + "/ready", model_ready),
            web.post(base + "/infer", infer),
            web.get(base + "/config", model_config),
        ]
    app.add_routes(routes)
    return app


class RestServer:
    """The REST app on ``listen`` (``HOST:PORT``; port 0 picks one), on the running loop;
    HTTPS with ``tls`` (:func:`ssl_context`)."""

    def __init__(
        self,
        app: web.Application,
        listen: str,
        *,
        tls: ssl.SSLContext | None = None,
        what: str = "",
    ) -> None:
        self._app = app
        self._host, self._port = listen_address(listen)
        self._tls = tls
        self._what = what
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen; the bound port (also :attr:`port`)."""
        runner = web.AppRunner(
            self._app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self._host, self._port, ssl_context=self._tls)
        await site.start()
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                self.port = int(address[1])
                break
        shown = f"[{self._host}]" if ":" in self._host else self._host
        scheme = "https" if self._tls is not None else "http"
        _log.info("%sOIP over HTTP/REST on %s://%s:%d/v2", self._what, scheme, shown, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening and close the connections (calls in flight get about a second)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
