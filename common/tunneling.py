"""Tunneled queries that waited together for a node's stream go in one message.

A node's stream to a replica carries one message per write, and each write costs a round trip
through gRPC's completion queue: under load, queries (and their answers) queue behind each other
one write at a time. :func:`take_frames` is the outbox's merge step on both ends (the replica's
``ControlMessage.infer_request`` -> ``infer_batch``; the node's ``NodeMessage.infer_response`` ->
``infer_answers``), used only when the other end said it reads batches
(``Hello.tunnel_batches``, ``Welcome.tunnel_batches``).

Contract: pops the first message of ``items``; when it carries ``single`` and the next ones do
too, pops them as well (in order, at most ``max_frames`` and about ``max_bytes`` of frames, the
first always) and returns one message of the same type whose ``batch`` field holds their frames.
Any other message, or a lone frame, is returned as it is. The order of the queue is kept.
"""

from __future__ import annotations

from collections import deque
from typing import Any, TypeVar

__all__ = ["MAX_BYTES", "MAX_FRAMES", "take_frames"]

#: Frames one batch carries at most.
MAX_FRAMES = 256
#: About the most bytes of frames one batch carries: batching pays for small queries (a write
#: each is most of their cost), not for large ones; and a batch stays far below any stream's
#: message limit (4 MiB is gRPC's default), whatever the two ends' own limits.
MAX_BYTES = 1 << 20

M = TypeVar("M", bound=Any)


def take_frames(
    items: deque[M],
    single: str,
    batch: str,
    max_bytes: int = MAX_BYTES,
    max_frames: int = MAX_FRAMES,
) -> M:
    first = items.popleft()
    kind = first.WhichOneof("body")
    if kind != single or not items or items[0].WhichOneof("body") != single:
        return first  # a lone frame or another message: sizes never computed (the common case)
    taken = [getattr(first, single)]
    size = taken[0].ByteSize()
    while items and len(taken) < max_frames and items[0].WhichOneof("body") == single:
        frame = getattr(items[0], single)
        size += frame.ByteSize() + 16  # + the frame's tag and length in the batch
        if size > max_bytes:
            break
        taken.append(frame)
        items.popleft()
    if len(taken) < 2:
        return first
    out: M = type(first)()
    getattr(out, batch).frames.extend(taken)
    return out
