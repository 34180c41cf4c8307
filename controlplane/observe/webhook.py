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
* The URL is a secret (a hook's path or query often carries its token): logs name it by
  :func:`redact_url` (scheme, host and port), and the policy the Admin API returns holds it
  that way (:func:`redact_policy`); applying a policy whose webhook URL is still that redacted
  form keeps the URL stored (:func:`restore_policy`), so "get, edit, apply" round-trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import yaml
from google.protobuf import json_format

from meshserve.common.policy.config import WebhookSpec
from meshserve.protos import mesh_pb2

__all__ = ["Webhook", "redact_policy", "redact_url", "restore_policy"]

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
                    outcome = repr(exc).replace(spec.url, redact_url(spec.url))
                else:
                    if 200 <= status < 300:
                        self.stats["sent"] += 1
                        break
                    outcome = f"HTTP {status}"
                if attempt == spec.max_retries:
                    self.stats["failed"] += 1
                    _log.warning(
                        "webhook %s: %s event dropped after %d attempts (%s)",
                        redact_url(spec.url),
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


_REDACTED = "\u2026"  # what stands for the rest of a redacted URL


def redact_url(url: str) -> str:
    """``url`` without what may be secret: ``scheme://host[:port]/…`` (no user, path, query)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return _REDACTED
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{f':{port}' if port is not None else ''}/{_REDACTED}"


def _webhook_url(text: str) -> str | None:
    """The webhook URL a policy's YAML sets (None: none, or not a policy that parses)."""
    try:
        data: Any = yaml.safe_load(text)
    except Exception:  # e.g. year 0, deep nesting: the policy parser names the error itself
        return None
    url = ((data or {}).get("monitoring") or {}).get("webhook") if isinstance(data, dict) else None
    url = url.get("url") if isinstance(url, dict) else None
    return url if isinstance(url, str) and url else None


def redact_policy(text: str) -> str:
    """A stored policy's YAML with its webhook URL :func:`redact_url`-ed (else unchanged)."""
    url = _webhook_url(text)
    if url is None:
        return text
    if url in text:
        return text.replace(url, redact_url(url))
    data = yaml.safe_load(text)  # written in a form we cannot find verbatim: dump it again
    data["monitoring"]["webhook"]["url"] = redact_url(url)
    return str(yaml.safe_dump(data, sort_keys=False))


def restore_policy(text: str, stored: str | None) -> str:
    """``text`` to apply, with the stored webhook URL put back when ``text`` names it in its
    redacted form (what :func:`redact_policy` returned); any other URL is applied as given."""
    url, old = _webhook_url(text), _webhook_url(stored) if stored is not None else None
    if url is None or old is None or url != redact_url(old) or url == old:
        return text
    return text.replace(url, old)
