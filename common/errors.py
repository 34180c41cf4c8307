"""Errors that carry a gRPC status, and the one place they become one.

Hierarchy::

    StatusError(code, message)          any error a user should see with a precise status
      InvalidArgument                   INVALID_ARGUMENT: the request is malformed
      NotFound                          NOT_FOUND: no such model / variant / node
      ResourceExhausted                 RESOURCE_EXHAUSTED: a queue or limit is full
      Unavailable                       UNAVAILABLE: retriable, nothing is ready to answer
      DeadlineExceeded                  DEADLINE_EXCEEDED
      FailedPrecondition                FAILED_PRECONDITION
      Unauthenticated                   UNAUTHENTICATED: no or wrong credential
      PermissionDenied                  PERMISSION_DENIED: a known caller may not do this

Servers raise these from domain code; servicers registered through :func:`map_errors` turn them
into the status (and
any other exception into INTERNAL with a generic message, logged with its traceback). Tunneled
answers carry ``(code, message)`` pairs, rebuilt on the other side with :func:`from_code`.

A request that does not decode as its message type (corrupt wire format, a string field that is
not UTF-8) would be answered UNKNOWN by gRPC itself; registered on :func:`tolerant_decoding`
``(server)``, it reaches the handler as a :class:`Malformed` value instead, and
:func:`map_errors` answers it INVALID_ARGUMENT (streaming handlers check for it per message).
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeAlias, TypeVar

import grpc
from grpc import aio

_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

__all__ = [
    "EOF",
    "PUSHBACK_KEY",
    "RETRY_AFTER_KEY",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "Malformed",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServicerContext",
    "StatusError",
    "Unauthenticated",
    "Unavailable",
    "from_code",
    "map_errors",
    "status_of",
    "tolerant_decoding",
    "wire_status",
]

_log = logging.getLogger("meshserve.status")

#: The servicer context type of our async handlers (grpc-stubs makes it generic).
ServicerContext: TypeAlias = "aio.ServicerContext[Any, Any]"
#: End-of-stream marker of ``context.read()`` / ``call.read()`` (missing from grpc-stubs).
EOF: Final[object] = aio.EOF  # type: ignore[attr-defined]


class StatusError(Exception):
    """An error with the gRPC status a caller should receive."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}: {self.message})"


class InvalidArgument(StatusError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(StatusError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(StatusError):
    """A queue or limit is full. ``retry_after_s``: when a retry may be admitted (a hint; None:
    no estimate). The hint travels as trailing metadata, under gRPC's own key
    ``grpc-retry-pushback-ms`` and our older ``retry-after-ms``, and, through tunnel frames and
    between servers, at the end of the message ("...; retry after 40 ms")."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        if retry_after_s is not None:
            retry_after_s = max(0.001, retry_after_s)
            if _RETRY_AFTER.search(message) is None:
                message = f"{message}; retry after {round(retry_after_s * 1000)} ms"
        elif (found := _RETRY_AFTER.search(message)) is not None:
            retry_after_s = int(found.group(1)) / 1000.0
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(StatusError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(StatusError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(StatusError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(StatusError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(StatusError):
    code = grpc.StatusCode.PERMISSION_DENIED


#: How a retry-after hint ends a RESOURCE_EXHAUSTED message (so it survives any hop).
_RETRY_AFTER = re.compile(r"retry after (\d+) ms$")
#: The trailing metadata key of the hint (milliseconds, an integer); kept for older clients.
RETRY_AFTER_KEY: Final = "retry-after-ms"
#: gRPC's own key for the same hint (gRFC A6): gRPC's built-in retries (a service config's
#: retryPolicy, in any language) wait this long before the next attempt.
PUSHBACK_KEY: Final = "grpc-retry-pushback-ms"

_BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def from_code(code: int, message: str) -> StatusError:
    """Rebuild an error from a numeric status code (as carried in tunnel frames)."""
    status = _BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        FailedPrecondition,
        Unauthenticated,
        PermissionDenied,
    ):
        if cls.code == status:
            return cls(message)
    return StatusError(message, status)


#: Longest status message sent (characters): messages quote what a caller sent (a model name),
#: and gRPC clients refuse trailers over 8 KiB by default, which turned a precise status into
#: "RESOURCE_EXHAUSTED: received metadata size exceeds hard limit".
_MAX_STATUS_MESSAGE = 2000


def _bounded(message: str) -> str:
    if len(message) <= _MAX_STATUS_MESSAGE:
        return message
    return message[: _MAX_STATUS_MESSAGE - 30] + f"... ({len(message)} characters)"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The (code, message) a caller sees for ``exc`` (the message cut to
    :data:`_MAX_STATUS_MESSAGE` characters); unknown errors are INTERNAL and logged."""
    if isinstance(exc, StatusError):
        return exc.code, _bounded(exc.message)
    if isinstance(exc, aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    _log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error (see server log)"


def wire_status(exc: BaseException) -> tuple[int, str]:
    """``(numeric code, message)`` of :func:`status_of`, as carried in tunnel frames."""
    code, message = status_of(exc)
    value: int = code.value[0]
    return value, message


class Malformed:
    """A request message that did not decode; ``reason`` says why (:func:`tolerant_decoding`)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def error(self) -> InvalidArgument:
        return InvalidArgument(self.reason)


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    decode = deserializer

    def tolerant(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception as exc:  # protobuf's DecodeError: corrupt wire format, bad UTF-8
            return Malformed(f"the request message does not decode: {exc}")

    return tolerant


def _tolerant_handler(handler: _Handler) -> _Handler:
    replace = getattr(handler, "_replace", None)  # grpc's handlers are namedtuples
    if replace is None:
        return handler
    tolerant: _Handler = replace(request_deserializer=_tolerant(handler.request_deserializer))
    return tolerant


class _TolerantGeneric(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:  # type: ignore[type-arg]
        self._inner = inner
        self._handlers: dict[str, _Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        handler = self._handlers.get(method)
        if handler is None:
            found = self._inner.service(handler_call_details)
            if found is None:
                return None
            handler = self._handlers[method] = _tolerant_handler(found)  # one per RPC name
        return handler


class _TolerantServer:
    """What the generated ``add_*_to_server`` functions need of a server, decoding leniently."""

    def __init__(self, server: aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(tuple(_TolerantGeneric(h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, _Handler]) -> None:
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service, {name: _tolerant_handler(h) for name, h in handlers.items()}
        )


def tolerant_decoding(server: aio.Server) -> Any:
    """``server`` for a generated ``add_*_to_server``: requests that do not decode reach the
    handler as :class:`Malformed` (answered INVALID_ARGUMENT by :func:`map_errors`) instead of
    gRPC's UNKNOWN."""
    return _TolerantServer(server)


def _wrap_unary(
    behavior: Callable[[Any, ServicerContext], Awaitable[Any]],
) -> Callable[[Any, ServicerContext], Awaitable[Any]]:
    async def handler(request: Any, context: ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            return await behavior(request, context)
        except Exception as exc:
            if isinstance(exc, aio.AbortError):
                raise
            code, message = status_of(exc)
            hint = getattr(exc, "retry_after_s", None)
            if hint is not None:  # the standard key and ours: both say when, in ms
                ms = str(round(hint * 1000))
                context.set_trailing_metadata(((PUSHBACK_KEY, ms), (RETRY_AFTER_KEY, ms)))
        # The status is set, not raised with ``context.abort``: grpc's AbortError keeps the
        # request in a reference cycle (its traceback's frames) that only the garbage collector
        # frees, so each failed query held its request until then (hundreds of MiB under load).
        context.set_code(code)
        context.set_details(message)
        return None

    return handler


S = TypeVar("S")


def map_errors(servicer: S) -> S:
    """Make every ``async def`` RPC method of ``servicer`` (the names its generated base class
    defines) answer a raised exception with its status (see :func:`status_of`).

    Wraps once, when the servicer is registered, rather than per call as a server interceptor
    would (an aio interceptor costs a coroutine and a new handler object on every RPC).
    Synchronous methods (the generated UNIMPLEMENTED stubs) are left alone; streaming handlers
    that report errors per message never raise them here.
    """
    rpcs = {
        name
        for klass in type(servicer).__mro__
        if klass.__module__.endswith("_pb2_grpc")  # the generated base: its names are the RPCs
        for name in vars(klass)
        if not name.startswith("_")
    }
    for name in rpcs:
        method = getattr(servicer, name)
        if inspect.iscoroutinefunction(method):
            setattr(servicer, name, _wrap_unary(method))
    return servicer
