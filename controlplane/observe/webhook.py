"""Webhook: POST decision events (drift, accuracy) as JSON to a configured URL.

Contract:

* :meth:`Webhook.offer` never blocks and never raises: it drops (and counts) an event whose kind
  the spec does not name, one that comes within ``min_interval_s`` of the last one sent for the
  same (kind, model, variant) (rate limit), and one that finds the queue (:data:`_QUEUE`) full.
* A background task POSTs queued events one at a time, each with ``timeout_s``; a failed POST
  (connection error or a non-2xx status) is retried ``max_retries`` times with backoff (0.5 s
  doubling), then dropped and logged. The HTTP call runs in a worker thread (the standard
  library's client): never on the event loop.
* :meth:`Webhook.close` cancels the task; queued events are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from google.protobuf import json_format

from meshserve.common.policy.config import WebhookSpec
from meshserve.protos import mesh_pb2

__all__ = ["Webhook"]

_log = logging.getLogger("meshserve.webhook")
_QUEUE = 100


class Webhook:
    def __init__(
        self, spec: Callable[[], WebhookSpec | None], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """``spec``: the webhook in force now (the policy is hot-reloaded; None: no webhook)."""
        self._spec = spec
        self._clock = clock
        self._queue: asyncio.Queue[tuple[WebhookSpec, mesh_pb2.Event]] = asyncio.Queue(_QUEUE)
        self._last: dict[tuple[str, str, str], float] = {}
        self._task: asyncio.Task[None] | None = None
        self.stats = {"sent": 0, "failed": 0, "rate_limited": 0, "dropped": 0}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhook")

    def offer(self, event: mesh_pb2.Event) -> None:
        spec = self._spec()
        if spec is None or event.kind not in spec.kinds:
            return
        key = (event.kind, event.model, event.variant)
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < spec.min_interval_s:
            self.stats["rate_limited"] += 1
            return
        try:
            self._queue.put_nowait((spec, event))
        except asyncio.QueueFull:
            self.stats["dropped"] += 1
            return
        self._last[key] = now

    async def _run(self) -> None:
        while True:
            spec, event = await self._queue.get()
            body = json.dumps(
                {"event": json_format.MessageToDict(event, preserving_proto_field_name=True)}
            ).encode()
            delay = 0.5
            for attempt in range(spec.max_retries + 1):
                try:
                    status = await asyncio.to_thread(_post, spec.url, body, spec.timeout_s)
                except (OSError, urllib.error.URLError) as exc:
                    outcome = repr(exc)
                else:
                    if 200 <= status < 300:
                        self.stats["sent"] += 1
                        break
                    outcome = f"HTTP {status}"
                if attempt == spec.max_retries:
                    self.stats["failed"] += 1
                    _log.warning(
                        "webhook %s: %s event dropped after %d attempts (%s)",
                        spec.url,
                        event.kind,
                        attempt + 1,
                        outcome,
                    )
                    break
                await asyncio.sleep(delay)
                delay *= 2

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _post(url: str, body: bytes, timeout: float) -> int:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
