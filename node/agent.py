"""The node's side of the mesh: its outbound links to the control plane and the state they share.

Contract: the node dials out (no inbound port needed). :class:`Agent` keeps one
:class:`~meshserve.node.link.Link` (one bidirectional stream, reconnected with backoff) per
control-plane replica it knows: the seeds at start, then every replica named in a Welcome or a
pushed ReplicaSet (sent by the replicas whenever the set changes) that the node has no connected
stream to yet (:meth:`Agent.learn`); a second link to a replica that already has one stands by.
The latest set received is the replica list: a link to an address it no longer names (a replica
that stopped, or whose lease expired) is dropped once its stream is down, i.e. at once when it
is not connected, else when its stream ends; the seeds are never dropped (a replica restarting
at a seed address is dialled again). :func:`plan_links` is that decision, pure. Every link
starts with a Hello carrying the node's complete state (:meth:`Agent.hello`), so a reconnect
re-synchronises everything.

The agent owns what the links share: the node's labels and hardware, the copy manager, the
drain notice (:meth:`Agent.drain`, told to every link now and to any linked later) and telemetry.
:meth:`Agent.summarise` builds one Telemetry (one aggregate entry per copy); each link sends
what changed of it (its own :class:`~meshserve.node.telemetry.ChangeFilter`: a full message
after each connect and every ``telemetry_heartbeat_s``, deltas in between, nothing from an idle
node), bounded by its own :class:`~meshserve.node.telemetry.TelemetryBudget`, and the agent
counts the bytes each wrote (:attr:`Agent.telemetry_bytes_sent`). While no link is connected the
node keeps summarising into a bounded :class:`~meshserve.node.telemetry.OfflineBuffer`; the first
link to connect sends those summaries first, oldest first, then live telemetry resumes.
:meth:`Agent.close` cancels the loops and closes every link, awaited.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from meshserve.common.security import JOIN_TOKEN_HEADER, TLSFiles, channel_credentials
from meshserve.node.copies import CopyManager
from meshserve.node.link import Link, channel_options
from meshserve.node.metrics import node_metrics
from meshserve.node.rights import Rights
from meshserve.node.runtime import CpuMeter, available_providers, resident_bytes
from meshserve.node.service import InferenceHandler
from meshserve.node.telemetry import HEARTBEAT_S, OfflineBuffer, TelemetryBudget
from meshserve.protos import mesh_pb2

__all__ = ["Agent", "LinkView", "channel_options", "plan_links"]

_log = logging.getLogger("meshserve.node.agent")


def _memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True, slots=True)
class LinkView:
    """What :func:`plan_links` needs of one link."""

    replica_id: str  # the replica it reached last ("" before any Welcome)
    connected: bool


def plan_links(
    links: Mapping[str, LinkView],
    seeds: Collection[str],
    replicas: Sequence[mesh_pb2.ReplicaInfo],
) -> tuple[list[str], list[str]]:
    """The addresses to dial and the links to drop (by address) once ``replicas`` is the
    replica list: dial every listed replica that no connected link reaches and no link dials
    yet; drop every link whose address is neither listed nor a seed and that is not connected
    (a connected one is dropped when its stream ends: see :meth:`Agent.wants`)."""
    held = {v.replica_id for v in links.values() if v.connected and v.replica_id}
    listed = {r.address for r in replicas if r.address}
    dial = [
        r.address
        for r in replicas
        if r.address and r.replica_id not in held and r.address not in links
    ]
    drop = [
        address
        for address, view in links.items()
        if address not in listed and address not in seeds and not view.connected
    ]
    return list(dict.fromkeys(dial)), drop


class Agent:
    def __init__(
        self,
        *,
        node_id: str,
        labels: dict[str, str],
        direct_address: str,
        seeds: Sequence[str],
        copies: CopyManager,
        handler: InferenceHandler,
        max_message_bytes: int,
        max_in_flight: int = 1024,
        backoff_base_s: float = 0.2,
        backoff_cap_s: float = 10.0,
        memory_bytes: int = 0,
        keepalive_ms: int = 10_000,
        telemetry_max_bytes_per_s: int = 2048,
        telemetry_buffer_bytes: int = 64 << 10,
        telemetry_log_s: float = 0.0,
        telemetry_heartbeat_s: float = HEARTBEAT_S,
        tls: TLSFiles | None = None,
        join_token: str | None = None,
        insecure_join: bool = False,
        rights: Rights | None = None,
    ) -> None:
        """``memory_bytes``: memory offered to the mesh for model copies (0: all of the
        machine's, as /proc/meminfo reports it). ``telemetry_max_bytes_per_s``: the telemetry
        budget of each link (0: unbounded); ``telemetry_buffer_bytes``: the bound of the offline
        buffer; ``telemetry_log_s``: log the telemetry bytes each link sent this often (0: never);
        ``telemetry_heartbeat_s``: each link sends a full telemetry message at least this often
        (between them only what changed).
        ``tls``: dial the replicas with TLS (their CA; this node's certificate, which must name
        its id); ``join_token``: sent on every Connect (metadata ``x-meshserve-join-token``),
        without TLS only to loopback replicas unless ``insecure_join`` (see
        :mod:`meshserve.node.link`).
        ``rights``: the tenant rights the direct port enforces, updated from every replica's
        TenantRights (default: a new one, failing closed with TLS; see
        :mod:`meshserve.node.rights`); kept across reconnects.
        """
        self.credentials = channel_credentials(tls)
        self.connect_metadata = ((JOIN_TOKEN_HEADER, join_token),) if join_token else None
        self.insecure_join = insecure_join
        self.node_id = node_id
        self.rights = rights if rights is not None else Rights(node_id, fail_closed=tls is not None)
        self.labels = labels
        self.direct_address = direct_address
        self._seeds = list(dict.fromkeys(seeds))
        self.copies = copies
        self._cpu = CpuMeter()  # the cpu_percent telemetry reports
        self.handler = handler
        self.max_message_bytes = max_message_bytes
        self.max_in_flight = max_in_flight
        self.backoff = (backoff_base_s, backoff_cap_s)
        self.keepalive_ms = keepalive_ms
        self.telemetry_max_bytes_per_s = telemetry_max_bytes_per_s
        self.telemetry_log_s = telemetry_log_s
        if telemetry_heartbeat_s <= 0:
            raise ValueError("telemetry_heartbeat_s must be > 0")
        self.telemetry_heartbeat_s = telemetry_heartbeat_s
        self.offline = OfflineBuffer(telemetry_buffer_bytes)
        # the interval the control plane asks for; the last Welcome's (before any: the default)
        self.telemetry_interval_s = 2.0
        self._links: dict[str, Link] = {}
        self._listed: set[str] | None = None  # addresses of the latest replica list (None: none)
        self._dropped: list[Link] = []  # stopped links, awaited by close()
        self._closing = False
        self.draining_ms = 0  # > 0 once the node is shutting down (SIGTERM): told to every link
        self._tasks: list[asyncio.Task[None]] = []
        self.hardware = mesh_pb2.Hardware(
            cpu_cores=os.cpu_count() or 1,
            memory_bytes=memory_bytes or _memory_bytes(),
            execution_providers=available_providers(),
        )
        node_metrics().watch_telemetry(self)

    def start(self) -> None:
        for address in self._seeds:
            self._spawn(address)
        self._tasks.append(asyncio.create_task(self._offline_loop(), name="telemetry offline"))
        if self.telemetry_log_s > 0:
            self._tasks.append(asyncio.create_task(self._log_loop(), name="telemetry log"))

    def _spawn(self, address: str) -> None:
        if self._closing or address in self._links:
            return
        link = Link(self, address)
        self._links[address] = link
        link.start()

    def hello(self) -> mesh_pb2.Hello:
        return mesh_pb2.Hello(
            node_id=self.node_id,
            labels=self.labels,
            hardware=self.hardware,
            direct_address=self.direct_address,
            version="0.1.0",
            copies=self.copies.statuses(),
            tunnel_batches=True,  # infer_batch read (link.Link._dispatch)
        )

    def connected_replicas(self, exclude: Link | None = None) -> set[str]:
        return {
            link.replica_id
            for link in self._links.values()
            if link is not exclude and link.connected and link.replica_id
        }

    def drain(self, timeout_s: float) -> None:
        """Tell every replica (now, and any linked later) that this node is shutting down."""
        self.draining_ms = max(1, int(timeout_s * 1000))
        for link in list(self._links.values()):
            if link.connected:
                link.say_draining()

    def learn(self, replicas: Sequence[mesh_pb2.ReplicaInfo]) -> None:
        """``replicas`` (a Welcome's or a pushed ReplicaSet) is now the replica list: dial
        the new ones, drop the links to the gone ones (:func:`plan_links`). An empty list is
        ignored (a replica that has not loaded its view yet)."""
        if not replicas:
            return
        self._listed = {r.address for r in replicas if r.address}
        views = {a: LinkView(link.replica_id, link.connected) for a, link in self._links.items()}
        dial, drop = plan_links(views, self._seeds, replicas)
        self._dropped = [link for link in self._dropped if not link.done]  # bounded by churn
        for address in drop:
            link = self._links.pop(address)
            link.stop()
            self._dropped.append(link)
            self._left(link)
        for address in dial:
            self._spawn(address)

    def wants(self, address: str) -> bool:
        """Whether a link to ``address`` should keep reconnecting: a seed, or listed by the
        latest replica list (before any list: every link)."""
        return self._listed is None or address in self._listed or address in self._seeds

    def retire(self, link: Link) -> None:
        """``link``'s stream ended and its replica is no longer listed: forget it (its task
        ends by itself)."""
        if self._links.get(link.address) is link:
            del self._links[link.address]
            self._left(link)

    @staticmethod
    def _left(link: Link) -> None:
        _log.info(
            "replica %s at %s left the mesh; link dropped", link.replica_id or "?", link.address
        )

    @property
    def links(self) -> dict[str, Link]:
        return dict(self._links)

    @property
    def telemetry_bytes_sent(self) -> dict[str, int]:
        """Telemetry bytes written per link (by address), as :func:`wire_size` counts them."""
        return {address: link.telemetry_bytes_sent for address, link in self._links.items()}

    def summarise(
        self, windows_sent: dict[tuple[str, str], int] | None = None
    ) -> mesh_pb2.Telemetry:
        """One Telemetry: the node's counters now, one aggregate entry per copy. With
        ``windows_sent`` (a link's newest drift window sequence per copy), each entry also
        carries the copy's newest closed drift window that link has not sent."""
        telemetry = mesh_pb2.Telemetry(
            unix_ms=int(time.time() * 1000),
            rss_bytes=resident_bytes(),
            cpu_percent=round(self._cpu.percent(), 1),
        )
        cache = self.copies.cache.stats()
        log = self.copies.prediction_log
        for e in self.copies.entries():
            model = telemetry.models.add(
                model=e.model,
                variant=e.variant,
                in_flight=e.in_flight,
                requests=e.requests,
                errors=e.errors,
                cache_hits=cache.hits,
                cache_misses=cache.misses,
            )
            model.latency_p50_ms, model.latency_p99_ms = e.latency.percentiles()
            if e.batcher is not None:
                stats = e.batcher.stats
                model.queue_depth = e.batcher.queue_depth
                model.batches = stats.batches
                model.batched_rows = stats.rows
                model.max_batch_size = e.batcher.current_max_batch_size
            if e.monitor is not None and windows_sent is not None:
                window = e.monitor.window_after(windows_sent.get((e.model, e.variant), 0))
                if window is not None:
                    model.drift.CopyFrom(window)
            counts = log.counts.get((e.model, e.variant)) if log is not None else None
            if counts is not None:
                model.feedback_joined = counts.joined
                model.feedback_correct = counts.correct
                model.feedback_abs_error = counts.abs_error
                model.predictions_logged = counts.logged
        return telemetry

    def join_feedback(self, batch: mesh_pb2.FeedbackBatch) -> int:
        """Join outcomes to this node's logged predictions of the batch's tenant (see
        :class:`~meshserve.node.monitor.PredictionLog`); returns how many joined."""
        log = self.copies.prediction_log
        if log is None:
            return 0
        return sum(log.join(batch.model, item, batch.tenant) for item in batch.items)

    async def _offline_loop(self) -> None:
        """While no link is connected, summarise into the offline buffer (under the budget)."""
        budget = TelemetryBudget(self.telemetry_max_bytes_per_s)
        while True:
            interval = self.telemetry_interval_s
            await asyncio.sleep(interval)
            if self.connected_replicas():
                continue
            telemetry = budget.apply(self.summarise(), interval)
            if telemetry is not None:
                self.offline.append(telemetry)

    async def _log_loop(self) -> None:
        """Log, per link, the telemetry bytes it wrote since the last line."""
        last: dict[str, int] = {}
        last_messages: dict[str, int] = {}
        since = time.monotonic()
        while True:
            await asyncio.sleep(self.telemetry_log_s)
            now = time.monotonic()
            for address, link in list(self._links.items()):
                total = link.telemetry_bytes_sent
                sent = total - last.get(address, 0)
                last[address] = total
                if not sent and not link.connected:
                    last_messages[address] = link.telemetry_messages_sent
                    continue
                messages = link.telemetry_messages_sent
                _log.info(
                    "telemetry: %d bytes in %.3f s to %s (%d messages; %d total; %d messages "
                    "total, %d full, %d quiet ticks; %d entries dropped, %d drift windows left "
                    "out, %d ticks skipped; %d buffered offline)",
                    sent,
                    now - since,
                    address,
                    messages - last_messages.get(address, 0),
                    total,
                    messages,
                    link.changes.full_sent,
                    link.changes.quiet,
                    link.budget.dropped_entries,
                    link.budget.dropped_windows,
                    link.budget.skipped,
                    len(self.offline),
                )
                last_messages[address] = messages
            since = now

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        links = [*self._links.values(), *self._dropped]
        await asyncio.gather(
            *self._tasks, *(link.close() for link in links), return_exceptions=True
        )
