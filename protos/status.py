"""Errors that carry a gRPC status, and the one place they become one.

Hierarchy::

    StatusError(code, message)          any error a user should see with a precise status
      InvalidArgument                   INVALID_ARGUMENT: the request is malformed
      NotFound                          NOT_FOUND: no such model / variant / node
      ResourceExhausted                 RESOURCE_EXHAUSTED: a queue or limit is full
      Unavailable                       UNAVAILABLE: retriable, nothing is ready to answer
      DeadlineExceeded                  DEADLINE_EXCEEDED
      FailedPrecondition                FAILED_PRECONDITION

Servers raise these from domain code; servicers registered through :func:`map_errors` turn them
into the status (and
any other exception into INTERNAL with a generic message, logged with its traceback). Tunneled
answers carry ``(code, message)`` pairs, rebuilt on the other side with :func:`from_code`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeAlias, TypeVar

import grpc
from grpc import aio

__all__ = [
    "EOF",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "ServicerContext",
    "StatusError",
    "Unavailable",
    "from_code",
    "map_errors",
    "status_of",
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
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(StatusError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(StatusError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(StatusError):
    code = grpc.StatusCode.FAILED_PRECONDITION


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
    ):
        if cls.code == status:
            return cls(message)
    return StatusError(message, status)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The (code, message) a caller sees for ``exc``; unknown errors are INTERNAL and logged."""
    if isinstance(exc, StatusError):
        return exc.code, exc.message
    if isinstance(exc, aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    _log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error (see server log)"


def wire_status(exc: BaseException) -> tuple[int, str]:
    """``(numeric code, message)`` of :func:`status_of`, as carried in tunnel frames."""
    code, message = status_of(exc)
    value: int = code.value[0]
    return value, message


def _wrap_unary(
    behavior: Callable[[Any, ServicerContext], Awaitable[Any]],
) -> Callable[[Any, ServicerContext], Awaitable[Any]]:
    async def handler(request: Any, context: ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except Exception as exc:
            if isinstance(exc, aio.AbortError):
                raise
            code, message = status_of(exc)
            await context.abort(code, message)

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
