"""The node's multiplexed stream (``NodeInference.Infer``): many queries over one stream.

Routers (gateways, SDKs) keep one stream per node (:class:`meshserve.common.mux.MuxChannel` is
the client); a message on an open stream costs a fraction of a unary call. Served on the node's
direct port (``--listen``, same TLS) next to the OIP service.

Contract, per stream:

- The caller is authenticated once, from the stream's metadata (:meth:`Rights.stream_of`: an
  API key, or a router's client certificate); a refusal ends the stream with its status. Each
  frame's model is then checked on its own: a refused frame answers PERMISSION_DENIED and the
  stream goes on.
- Each frame: its ``request`` bytes decode as a ``ModelInferRequest`` (else that frame answers
  INVALID_ARGUMENT); ``variant`` (when given) becomes its ``model_version``, ``prefer`` the
  ``meshserve_prefer`` parameter; its ``trace_context`` is the parent of the node's span (else
  the stream's metadata); ``timeout_ms`` its deadline, which the handler's admission and
  shedding use, and past which the frame answers DEADLINE_EXCEEDED. Then
  :meth:`InferenceHandler.infer` with ``hop="mux"``.
- Answers go back in completion order, correlated by ``id``: the serialized response, or
  ``(status_code, status_message)`` (:func:`meshserve.common.errors.wire_status`). One failed
  query fails only itself. An answer over the message limit is replaced by RESOURCE_EXHAUSTED.
- At most ``max_in_flight`` frames run at once; beyond that the stream stops reading (gRPC flow
  control pushes back on the client). One write at a time: a finished frame queues its answer,
  and whichever frame is writing sends the queued ones too (no lock, no wake per answer). When
  the client closes its side, the frames in flight finish and are answered, then the stream ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.context import Context

from meshserve.common.errors import (
    InvalidArgument,
    Malformed,
    ServicerContext,
    StatusError,
    wire_status,
)
from meshserve.common.params import PREFER
from meshserve.common.tenancy import set_tenant
from meshserve.common.tracing import context_from_map, context_from_metadata
from meshserve.node.rights import Check, Rights
from meshserve.node.service import InferenceHandler
from meshserve.protos import inference_pb2, mesh_pb2, mesh_pb2_grpc

__all__ = ["MuxServicer"]

_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
#: Room left in a frame for its id and status besides the answer's bytes.
_FRAME_SLACK = 1024
#: How long a refused stream waits for the caller's first message before its status goes out.
_REFUSAL_READ_S = 1.0


class MuxServicer(mesh_pb2_grpc.NodeInferenceServicer):
    """``NodeInference`` on the node's direct port (see the module contract)."""

    def __init__(
        self,
        handler: InferenceHandler,
        *,
        rights: Rights | None = None,
        max_in_flight: int = 1024,
        max_message_bytes: int = 64 << 20,
    ) -> None:
        self._handler = handler
        self._rights = rights
        self._max_in_flight = max(1, max_in_flight)
        self._max_answer = max(1, max_message_bytes - _FRAME_SLACK)
        self._limit = max_message_bytes

    async def Infer(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[mesh_pb2.MuxRequests],
        context: ServicerContext,
    ) -> None:
        try:
            check = self._rights.stream_of(context) if self._rights is not None else None
        except StatusError:
            # Refused (no key, a wrong one, no rights yet): read what the caller sent first, so
            # its first write is done before the status goes out; refused at once, the write
            # could fail in the client's gRPC core ("INTERNAL: Internal error from Core") and
            # hide the status behind it.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(anext(aiter(request_iterator)), _REFUSAL_READ_S)
            raise
        parent = context_from_metadata(context.invocation_metadata())  # type: ignore[arg-type]
        rights, decided = self._rights, list[str | None]()

        def scope(frame: mesh_pb2.MuxRequest) -> None:
            """Whose query ``frame`` is: the stream's caller's, or the caller a router names
            (decided once the node has its rights)."""
            if rights is None:
                return
            if not decided and rights.received:
                decided.append(rights.tenant_of(context))
            who = decided[0] if decided else ""
            set_tenant(rights.forwarded(frame.trace_context.items()) if who is None else who)

        slots = asyncio.Semaphore(self._max_in_flight)
        outbox: collections.deque[mesh_pb2.MuxResponse] = collections.deque()
        writing = False
        limit = self._max_answer
        tasks: set[asyncio.Task[None]] = set()

        async def one(frame: mesh_pb2.MuxRequest) -> None:
            nonlocal writing
            try:
                scope(frame)  # this frame's task: its predictions' tenant
                out = await self._answer(frame, check, parent)
            finally:
                slots.release()
            outbox.append(out)
            if writing:  # the frame writing now sends this answer too, after its own
                return
            writing = True  # one write at a time: this frame drains what the others queued
            try:
                while outbox:  # every answer waiting goes in one message (bounded)
                    batch = mesh_pb2.MuxResponses()
                    frames, size = batch.frames, 0
                    while outbox and (size == 0 or size + len(outbox[0].response) < limit):
                        answer = outbox.popleft()
                        frames.append(answer)
                        size += len(answer.response) + _FRAME_SLACK
                    await context.write(batch)
            finally:
                writing = False

        try:
            async for batch in request_iterator:
                if isinstance(batch, Malformed):  # the message itself did not decode: no ids
                    raise InvalidArgument(f"a MuxRequests message does not decode: {batch.reason}")
                for frame in batch.frames:
                    await slots.acquire()
                    task = asyncio.create_task(one(frame))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _answer(
        self, frame: mesh_pb2.MuxRequest, check: Check | None, parent: Context | None
    ) -> mesh_pb2.MuxResponse:
        out = mesh_pb2.MuxResponse(id=frame.id)
        try:
            try:
                request = inference_pb2.ModelInferRequest.FromString(frame.request)
            except DecodeError as exc:
                raise InvalidArgument(f"the request message does not decode: {exc}") from None
            if check is not None:
                check(request.model_name)
            if frame.variant:
                request.model_version = frame.variant
            if frame.prefer:
                request.parameters[PREFER].string_param = frame.prefer
            if frame.trace_context:
                parent = context_from_map(frame.trace_context)
            if not frame.timeout_ms:
                response = await self._handler.infer(request, parent, hop="mux")
            else:
                timeout = frame.timeout_ms / 1000.0
                deadline = time.monotonic() + timeout
                async with asyncio.timeout(timeout):
                    response = await self._handler.infer(
                        request, parent, hop="mux", deadline=deadline
                    )
            data = response.SerializeToString()
            if len(data) > self._max_answer:
                out.status_code = _EXHAUSTED
                out.status_message = (
                    f"the answer is {len(data)} bytes, over the {self._limit}-byte message "
                    f"limit of node {self._handler.node_id}'s stream"
                )
            else:
                out.response = data
        except TimeoutError:
            out.status_code = _DEADLINE
            out.status_message = (
                f"deadline of {frame.timeout_ms} ms exceeded on node {self._handler.node_id}"
            )
        except Exception as exc:
            out.status_code, out.status_message = wire_status(exc)
        return out
