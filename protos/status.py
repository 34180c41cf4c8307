"""Errors that carry a gRPC status, and the one place they become one.

Hierarchy::

    StatusError(code, message)          any error a user should see with a precise status
      InvalidArgument                   INVALID_ARGUMENT: the request is malformed
      NotFound                          NOT_FOUND: no such model / variant / node
      ResourceExhausted                 RESOURCE_EXHAUSTED: a queue or limit is full
      Unavailable                       UNAVAILABLE: retriable, nothing is ready to answer
      DeadlineExceeded                  DEADLINE_EXCEEDED
      FailedPrecondition                FAILED_PRECONDITION

Servers raise these from domain code; :class:`StatusInterceptor` turns them into the status (and
any other exception into INTERNAL with a generic message, logged with its traceback). Tunneled
answers carry ``(code, message)`` pairs, rebuilt on the other side with :func:`from_code`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeAlias

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
    "StatusInterceptor",
    "Unavailable",
    "from_code",
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


class StatusInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps :class:`StatusError` (and stray exceptions) to a gRPC status for unary RPCs.

    Streaming handlers map errors themselves (per message, where the protocol allows).
    """

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary),  # type: ignore[arg-type]
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
