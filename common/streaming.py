"""ModelStreamInfer, served the same way by the gateway and by the node's direct port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from meshserve.common.errors import Malformed, status_of
from meshserve.protos import inference_pb2

__all__ = ["serve_infer_stream"]

Infer = Callable[[inference_pb2.ModelInferRequest], Awaitable[inference_pb2.ModelInferResponse]]
Write = Callable[[inference_pb2.ModelStreamInferResponse], Awaitable[None]]


async def serve_infer_stream(
    requests: AsyncIterator[inference_pb2.ModelInferRequest],
    infer: Infer,
    write: Write,
    *,
    max_in_flight: int = 256,
) -> None:
    """Drive one ModelStreamInfer stream: answers go back in order of completion.

    Each request runs concurrently (at most ``max_in_flight``; beyond that the stream stops
    reading, which is gRPC flow control pushing back on the client). A failed request does not end
    the stream: its answer carries ``error_message`` and the request ``id`` to correlate it.
    """
    slots = asyncio.Semaphore(max_in_flight)
    write_lock = asyncio.Lock()
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: inference_pb2.ModelInferRequest) -> None:
        out = inference_pb2.ModelStreamInferResponse()
        try:
            if isinstance(request, Malformed):  # did not decode (see tolerant_decoding)
                raise request.error()
            out.infer_response.CopyFrom(await infer(request))
        except Exception as exc:
            code, message = status_of(exc)
            out.error_message = f"{code.name}: {message}"
            if not isinstance(request, Malformed):
                out.infer_response.id = request.id
                out.infer_response.model_name = request.model_name
        finally:
            slots.release()
        async with write_lock:
            await write(out)

    try:
        async for request in requests:
            await slots.acquire()
            task = asyncio.create_task(one(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
