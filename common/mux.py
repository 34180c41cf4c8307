"""Many queries over one ``NodeInference.Infer`` stream: the client side of the fast path.

A router (the gateway's forwarder, the SDK) keeps one :class:`MuxChannel` per node address. Each
:meth:`MuxChannel.call` sends one ``MuxRequest`` frame (the serialized ``ModelInferRequest``
passed through unchanged, plus the router's variant, prefer list, trace context and remaining
budget) and waits for the ``MuxResponse`` with the same id.

Contract:

- The stream opens lazily, on the first call, with the channel's ``metadata`` (an API key, for
  instance: a node authenticates the stream once and checks each frame's model).
- One reader task resolves the calls' futures by id; one writer task writes the frames in the
  order the calls queued them (so cancelling a caller never cancels a write, which would end the
  stream for every other call). No task per call. Every frame waiting when the writer runs goes
  in one ``MuxRequests`` message (bounded by the message limit): under load one send carries
  many queries, where a message per query would cost a send each.
- A call returns the response bytes, or raises the node's answer as a domain error
  (:func:`meshserve.common.errors.from_code`: a RESOURCE_EXHAUSTED keeps its retry-after hint,
  which travels at the end of the message).
- ``timeout``: the call raises DeadlineExceeded once it passes and is forgotten (a late answer is
  dropped); the node gets the budget as ``timeout_ms`` and sheds by it.
- At most ``max_in_flight`` calls are in flight on the channel; the next ones wait for a slot
  (within their timeout).
- A broken stream (node gone, connection reset, the node ended it) fails every pending call with
  UNAVAILABLE naming the address (or the status the node ended the stream with, when it refused
  the stream: UNAUTHENTICATED, PERMISSION_DENIED, ...); the next call opens a new stream.
- A request larger than ``max_message_bytes`` is refused (INVALID_ARGUMENT) without touching the
  stream: an over-limit frame would end it for every call. The channel must accept answers as
  large as the node's message limit (``grpc.max_receive_message_length``).
- :meth:`MuxChannel.close` ends the stream, fails the pending calls and awaits both tasks; the
  channel itself belongs to the caller. A closed MuxChannel refuses further calls (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Final

import grpc
from grpc import aio

from meshserve.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    StatusError,
    Unavailable,
    from_code,
)
from meshserve.protos import inference_pb2, mesh_pb2

__all__ = ["INFER_METHOD", "MuxChannel"]

#: The stream's full method name (``NodeInference.Infer``).
INFER_METHOD: Final = "/meshserve.v1.NodeInference/Infer"

#: Statuses a node ends a stream with on purpose: passed to the pending calls as they are.
_REFUSALS = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)

#: Frame overhead allowed for besides the request bytes (id, trace context, variant, prefer).
_FRAME_SLACK = 4096


def _target(channel: aio.Channel) -> str:
    """The address ``channel`` dials (for messages), from grpc's internals when they tell it."""
    target = getattr(getattr(channel, "_channel", None), "target", b"")
    if isinstance(target, bytes):
        return target.decode(errors="replace")
    return str(target) if isinstance(target, str) else ""


class _Stream:
    """One open ``Infer`` stream: its call, pending futures, outbox and the two tasks."""

    __slots__ = ("call", "dead", "outbox", "pending", "reader", "wake", "writer")

    def __init__(self, call: aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        self.call = call
        self.pending: dict[int, asyncio.Future[mesh_pb2.MuxResponse]] = {}
        self.outbox: collections.deque[mesh_pb2.MuxRequest] = collections.deque()
        self.wake: asyncio.Future[None] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.dead = False


class MuxChannel:
    """Queries multiplexed over one ``NodeInference.Infer`` stream (see the module contract).

    ``metadata``: sent when the stream opens (each reopening too). ``address``: names the node
    in error messages (default: the channel's target).
    """

    def __init__(
        self,
        channel: aio.Channel,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        max_in_flight: int = 1024,
        max_message_bytes: int = 64 << 20,
        address: str = "",
    ) -> None:
        self._method: Any = channel.stream_stream(
            INFER_METHOD,
            request_serializer=mesh_pb2.MuxRequests.SerializeToString,
            response_deserializer=mesh_pb2.MuxResponses.FromString,
        )
        self._metadata = tuple(metadata)
        self._slots = asyncio.Semaphore(max(1, max_in_flight))
        self._max_request_bytes = max(1, max_message_bytes - _FRAME_SLACK)
        self.address = address or _target(channel)
        self._stream: _Stream | None = None
        self._next_id = 1
        self._closed = False
        self.reopened = 0  # streams opened after the first (a broken one replaced)

    @property
    def in_flight(self) -> int:
        """Calls waiting for their answer on the open stream."""
        stream = self._stream
        return 0 if stream is None else len(stream.pending)

    async def call(
        self,
        request: bytes,
        *,
        variant: str = "",
        prefer: str = "",
        trace_context: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """Send one serialized ``ModelInferRequest``; the serialized ``ModelInferResponse``.

        ``variant``: the router's choice (overrides the request's ``model_version``);
        ``prefer``: the ``meshserve_prefer`` parameter's value; ``trace_context``: the W3C
        ``traceparent``/``tracestate`` the node's span is a child of; ``timeout``: seconds."""
        if len(request) > self._max_request_bytes:
            raise InvalidArgument(
                f"the request is {len(request)} bytes, over the {self._max_request_bytes}-byte "
                f"limit of the stream to {self.address}"
            )
        frame = mesh_pb2.MuxRequest(request=request, variant=variant, prefer=prefer)
        if trace_context:
            frame.trace_context.update(trace_context)
        if timeout is None:
            return await self._exchange(frame)
        if timeout <= 0:
            raise DeadlineExceeded(f"the deadline passed before the query to {self.address}")
        frame.timeout_ms = max(1, int(timeout * 1000))
        try:
            async with asyncio.timeout(timeout):
                return await self._exchange(frame)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no answer from {self.address} within {timeout * 1000:.0f} ms"
            ) from None

    async def call_message(
        self,
        request: inference_pb2.ModelInferRequest,
        *,
        variant: str = "",
        prefer: str = "",
        trace_context: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> inference_pb2.ModelInferResponse:
        """:meth:`call` for callers that hold messages: serializes and parses."""
        data = await self.call(
            request.SerializeToString(),
            variant=variant,
            prefer=prefer,
            trace_context=trace_context,
            timeout=timeout,
        )
        return inference_pb2.ModelInferResponse.FromString(data)

    async def _exchange(self, frame: mesh_pb2.MuxRequest) -> bytes:
        slots = self._slots
        await slots.acquire()
        try:
            stream = self._stream
            if stream is None:
                stream = self._open()
            ident = self._next_id
            self._next_id = ident + 1
            frame.id = ident
            future: asyncio.Future[mesh_pb2.MuxResponse] = (
                asyncio.get_running_loop().create_future()
            )
            pending = stream.pending
            pending[ident] = future
            stream.outbox.append(frame)
            wake = stream.wake
            if wake is not None and not wake.done():
                wake.set_result(None)
            try:
                answer = await future
            finally:
                pending.pop(ident, None)  # forgotten: a late answer finds no one
        finally:
            slots.release()
        if answer.status_code:
            raise from_code(answer.status_code, answer.status_message)
        return answer.response

    def _open(self) -> _Stream:
        if self._closed:
            raise Unavailable(f"the stream to {self.address} is closed")
        call = self._method(metadata=self._metadata or None)
        stream = _Stream(call)
        stream.reader = asyncio.create_task(self._read_loop(stream), name="mux reader")
        stream.writer = asyncio.create_task(self._write_loop(stream), name="mux writer")
        if self._next_id > 1:
            self.reopened += 1
        self._stream = stream
        return stream

    async def _write_loop(self, stream: _Stream) -> None:
        call, outbox, pending = stream.call, stream.outbox, stream.pending
        loop = asyncio.get_running_loop()
        limit = self._max_request_bytes
        try:
            while True:
                while outbox:
                    batch = mesh_pb2.MuxRequests()
                    frames, size = batch.frames, 0
                    while outbox and (size == 0 or size + len(outbox[0].request) < limit):
                        frame = outbox.popleft()
                        if frame.id in pending:  # not given up on while it waited
                            frames.append(frame)
                            size += len(frame.request) + _FRAME_SLACK
                    if frames:
                        await call.write(batch)
                wake = stream.wake = loop.create_future()
                await wake
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = self._failure(exc)
            # a write can fail ("INTERNAL: Internal error from Core") before the node's
            # status arrives (the node refused the stream): that status, when it comes at
            # once, says why; the write's error stands otherwise
            with contextlib.suppress(Exception):
                code = await asyncio.wait_for(call.code(), 1.0)
                if code != grpc.StatusCode.OK:
                    error = self._status(code, await call.details())
            self._break(stream, error)

    async def _read_loop(self, stream: _Stream) -> None:
        call, pending = stream.call, stream.pending
        try:
            while True:
                answers = await call.read()
                if not isinstance(answers, mesh_pb2.MuxResponses):  # EOF: the node ended it
                    self._break(stream, Unavailable(f"node {self.address} ended the stream"))
                    return
                for answer in answers.frames:
                    future = pending.get(answer.id)
                    if future is not None and not future.done():
                        future.set_result(answer)
        except asyncio.CancelledError:
            if stream.dead:
                return
            raise
        except Exception as exc:
            self._break(stream, self._failure(exc))

    def _failure(self, exc: BaseException) -> StatusError:
        """What a broken stream's pending calls raise."""
        if isinstance(exc, aio.AioRpcError):
            return self._status(exc.code(), exc.details())
        return Unavailable(f"the stream to {self.address} broke: {exc!r}")

    def _status(self, code: grpc.StatusCode, details: str | None) -> StatusError:
        """What a stream ended with ``code`` means for its pending calls."""
        details = details or code.name
        if code in _REFUSALS:
            return from_code(code.value[0], details)
        return Unavailable(f"the stream to {self.address} broke: {code.name}: {details}")

    def _break(self, stream: _Stream, error: StatusError) -> None:
        """End ``stream``: fail its pending calls with ``error``; the next call reopens."""
        if stream.dead:
            return
        stream.dead = True
        if self._stream is stream:
            self._stream = None
        for future in stream.pending.values():
            if not future.done():
                future.set_exception(error)
        stream.pending.clear()
        stream.outbox.clear()
        current = asyncio.current_task()
        for task in (stream.reader, stream.writer):
            if task is not None and task is not current:
                task.cancel()
        stream.call.cancel()

    async def close(self) -> None:
        """End the stream (pending calls fail UNAVAILABLE) and await its tasks."""
        self._closed = True
        stream = self._stream
        if stream is None:
            return
        self._break(stream, Unavailable(f"the stream to {self.address} was closed"))
        tasks = [t for t in (stream.reader, stream.writer) if t is not None]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> MuxChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
