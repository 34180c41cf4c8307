"""The routing feed, publisher side: what a replica pushes to SDKs and standalone gateways.

Contract:

- :class:`FeedPublisher` turns the replica's :class:`Snapshot` and the live load its node
  sessions report into feed entries (keys as in :mod:`meshserve.common.routing.feed`): models
  (without what routers do not need), placements (model, variant, nodes, desired copies),
  aliases, and one ``node/<id>`` entry per node holding at least one READY copy (its READY copies
  without sketches or reasons, their live load, draining, hardware).
- :meth:`FeedPublisher.notify` (every snapshot change) marks the view dirty; one task recomputes
  the entries at most once per ``min_interval_s`` (and on that interval while anyone subscribes,
  since live load is not part of the snapshot), diffs them by serialized bytes, and when anything
  changed bumps :attr:`FeedPublisher.revision` and records which keys changed or went. That
  history is bounded (``history_revisions`` revisions and ``history_bytes`` of keys); it holds
  keys only: a delta is sent with the current entries of the keys changed since the subscriber's
  revision, which brings it exactly to the current revision.
- :class:`FeedService` (``RoutingFeed``): ``Subscribe`` sends a full view (what the caller may
  see: its tenant's models, intersected with the models it asked for), then, whenever the
  revision advances, the merged delta since what it was sent last, or a fresh full view when
  that fell out of the history; an empty update (a heartbeat) when nothing was sent for
  ``heartbeat_s``. No queue per subscriber: a slow one blocks only in its own write, and later
  gets a merged delta or a full view. :meth:`FeedPublisher.close` ends every stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from meshserve.common.errors import ServicerContext
from meshserve.common.routing.feed import (
    ALIAS,
    MODEL,
    NODE,
    PLACEMENT,
    alias_key,
    model_key,
    node_key,
    placement_key,
)
from meshserve.common.routing.view import NodeView, Snapshot, VariantKey
from meshserve.protos import mesh_pb2, mesh_pb2_grpc

__all__ = [
    "EntryBuilder",
    "FeedHistory",
    "FeedPublisher",
    "FeedService",
    "build_entries",
    "diff_entries",
    "filter_entry",
    "node_entry",
]

_log = logging.getLogger("meshserve.feed")

LoadLookup = Callable[[str, VariantKey], "mesh_pb2.ModelTelemetry | None"]
Allowed = Callable[[str], bool] | None  # may the subscriber see this model? (None: every model)

#: Per history revision, counted against the byte cap besides its keys.
_REVISION_OVERHEAD = 64


# -- entries (pure) ----------------------------------------------------------------------------


def model_entry(spec: mesh_pb2.ModelSpec) -> mesh_pb2.FeedEntry:
    lean = mesh_pb2.ModelSpec()
    lean.CopyFrom(spec)
    lean.ClearField("drift_reference")
    lean.ClearField("retry_requests")
    return mesh_pb2.FeedEntry(key=model_key(spec.name, spec.variant), model=lean)


def placement_entry(placement: mesh_pb2.Placement) -> mesh_pb2.FeedEntry:
    lean = mesh_pb2.Placement(
        model=placement.model,
        variant=placement.variant,
        nodes=placement.nodes,
        desired_copies=placement.desired_copies,
    )
    return mesh_pb2.FeedEntry(key=placement_key(placement.model, placement.variant), placement=lean)


def alias_entry(alias: mesh_pb2.Alias) -> mesh_pb2.FeedEntry:
    return mesh_pb2.FeedEntry(key=alias_key(alias.model, alias.alias), alias=alias)


def _lean_copy(status: mesh_pb2.CopyStatus) -> mesh_pb2.CopyStatus:
    return mesh_pb2.CopyStatus(
        model=status.model,
        variant=status.variant,
        state=status.state,
        inputs=status.inputs,
        outputs=status.outputs,
        batched=status.batched,
        latency_profile=status.latency_profile,
        execution_provider=status.execution_provider,
    )


def _lean_load(t: mesh_pb2.ModelTelemetry) -> mesh_pb2.ModelTelemetry:
    return mesh_pb2.ModelTelemetry(
        model=t.model,
        variant=t.variant,
        in_flight=t.in_flight,
        queue_depth=t.queue_depth,
        latency_p50_ms=t.latency_p50_ms,
        max_batch_size=t.max_batch_size,
    )


def node_entry(
    view: NodeView,
    draining: bool,
    load: Callable[[VariantKey], mesh_pb2.ModelTelemetry | None],
) -> mesh_pb2.FeedEntry | None:
    """``node/<id>`` for a node with READY copies (None: it has none, a router cannot use it)."""
    ready = sorted(key for key, status in view.copies.items() if status.state == mesh_pb2.READY)
    if not ready:
        return None
    node = mesh_pb2.FeedNode(
        node_id=view.node_id,
        labels=view.labels,
        direct_address=view.direct_address,
        replicas=sorted(view.replicas),
        draining=draining,
        hardware=view.hardware,
    )
    for key in ready:
        node.copies.append(_lean_copy(view.copies[key]))
        telemetry = load(key)
        if telemetry is not None:
            node.load.append(_lean_load(telemetry))
    return mesh_pb2.FeedEntry(key=node_key(view.node_id), node=node)


def _figures(t: mesh_pb2.ModelTelemetry | None) -> tuple[int, int, float, int] | None:
    return None if t is None else (t.in_flight, t.queue_depth, t.latency_p50_ms, t.max_batch_size)


class EntryBuilder:
    """The feed entries of a snapshot, each with its serialized bytes, rebuilt only where the
    source changed: the replica's snapshot keeps unchanged specs, placements, aliases and node
    views as the same objects, so an entry is reused when its source is the same object (and,
    for a node, its draining flag and live load figures are equal). A tick with nothing changed
    costs lookups, no protobuf work."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[object, object, mesh_pb2.FeedEntry, bytes]] = {}

    def build(
        self, snapshot: Snapshot, load: LoadLookup
    ) -> dict[str, tuple[mesh_pb2.FeedEntry, bytes]]:
        fresh: dict[str, tuple[object, object, mesh_pb2.FeedEntry, bytes]] = {}

        def keep(
            key: str,
            source: object,
            extra: object,
            make: Callable[[], mesh_pb2.FeedEntry | None],
        ) -> None:
            held = self._held.get(key)
            if held is not None and held[0] is source and held[1] == extra:
                fresh[key] = held
                return
            entry = make()
            if entry is not None:
                fresh[key] = (source, extra, entry, entry.SerializeToString(deterministic=True))

        for spec in snapshot.models.values():
            keep(model_key(spec.name, spec.variant), spec, None, partial(model_entry, spec))
        for placement in snapshot.placements.values():
            key = placement_key(placement.model, placement.variant)
            keep(key, placement, None, partial(placement_entry, placement))
        for alias in snapshot.aliases.values():
            key = alias_key(alias.model, alias.alias)
            keep(key, alias, None, partial(alias_entry, alias))
        for node_id, view in snapshot.nodes.items():
            ready = [k for k, status in view.copies.items() if status.state == mesh_pb2.READY]
            if not ready:
                continue  # no entry: a router cannot use it
            draining = node_id in snapshot.draining
            figures = tuple(_figures(load(node_id, k)) for k in ready)
            make = partial(node_entry, view, draining, partial(load, node_id))
            keep(node_key(node_id), view, (draining, figures), make)
        self._held = fresh
        return {key: (held[2], held[3]) for key, held in fresh.items()}


def build_entries(snapshot: Snapshot, load: LoadLookup) -> dict[str, mesh_pb2.FeedEntry]:
    """Every feed entry of ``snapshot`` with the live load ``load(node_id, key)``."""
    return {key: entry for key, (entry, _) in EntryBuilder().build(snapshot, load).items()}


def diff_entries(old: Mapping[str, bytes], new: Mapping[str, bytes]) -> tuple[list[str], list[str]]:
    """(keys added or changed, keys removed) from ``old`` to ``new`` (serialized entries)."""
    changed = [key for key, value in new.items() if old.get(key) != value]
    removed = [key for key in old if key not in new]
    return changed, removed


def entry_model(key: str) -> str:
    """The model a feed key belongs to ("" for a node entry, which spans models)."""
    for prefix in (MODEL, PLACEMENT, ALIAS):
        if key.startswith(prefix):
            return key[len(prefix) :].rsplit("/", 1)[0]
    return ""


def filter_entry(entry: mesh_pb2.FeedEntry, allowed: Allowed) -> mesh_pb2.FeedEntry | None:
    """``entry`` as a subscriber limited to ``allowed`` models sees it (None: not at all). A
    node keeps only the copies and load of allowed models (None when none is left)."""
    if allowed is None:
        return entry
    kind = entry.WhichOneof("value")
    if kind == "node":
        node = entry.node
        copies = [c for c in node.copies if allowed(c.model)]
        if not copies:
            return None
        if len(copies) == len(node.copies):
            return entry
        lean = mesh_pb2.FeedNode()
        lean.CopyFrom(node)
        del lean.copies[:]
        del lean.load[:]
        lean.copies.extend(copies)
        lean.load.extend(t for t in node.load if allowed(t.model))
        return mesh_pb2.FeedEntry(key=entry.key, node=lean)
    if kind == "model":
        name = entry.model.name
    elif kind == "placement":
        name = entry.placement.model
    elif kind == "alias":
        name = entry.alias.model
    else:
        return None
    return entry if allowed(name) else None


@dataclass(frozen=True, slots=True)
class _Revision:
    revision: int
    keys: tuple[str, ...]  # changed or removed at this revision
    size: int


class FeedHistory:
    """Which keys changed at each recent revision (bounded by count and bytes; pure)."""

    def __init__(self, max_revisions: int = 64, max_bytes: int = 1 << 20) -> None:
        self.max_revisions = max_revisions
        self.max_bytes = max_bytes
        self._revisions: deque[_Revision] = deque()
        self.bytes = 0
        self.floor = 0  # the oldest revision a delta can start from

    def __len__(self) -> int:
        return len(self._revisions)

    def append(self, revision: int, keys: Iterable[str]) -> None:
        held = tuple(keys)
        size = _REVISION_OVERHEAD + sum(len(k) for k in held)
        self._revisions.append(_Revision(revision, held, size))
        self.bytes += size
        while self._revisions and (
            len(self._revisions) > self.max_revisions or self.bytes > self.max_bytes
        ):
            dropped = self._revisions.popleft()
            self.bytes -= dropped.size
            self.floor = dropped.revision
        if not self._revisions:
            self.floor = revision

    def since(self, revision: int) -> set[str] | None:
        """Every key changed or removed after ``revision`` (None: no longer known; send a full
        view)."""
        if revision < self.floor:
            return None
        keys: set[str] = set()
        for held in reversed(self._revisions):
            if held.revision <= revision:
                break
            keys.update(held.keys)
        return keys


# -- the publisher -----------------------------------------------------------------------------


class FeedPublisher:
    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        load: LoadLookup,
        replicas: Callable[[], list[mesh_pb2.ReplicaInfo]],
        replica_id: str,
        *,
        min_interval_s: float = 0.1,
        heartbeat_s: float = 1.0,
        history_revisions: int = 64,
        history_bytes: int = 1 << 20,
    ) -> None:
        self._snapshot = snapshot
        self._load = load
        self._replicas = replicas
        self.replica_id = replica_id
        self.min_interval_s = min_interval_s
        self.heartbeat_s = heartbeat_s
        self.history = FeedHistory(history_revisions, history_bytes)
        self.revision = 0
        self.entries: dict[str, mesh_pb2.FeedEntry] = {}
        self._bytes: dict[str, bytes] = {}
        self._builder = EntryBuilder()
        self._computed = False
        self._dirty = asyncio.Event()
        self._tick = asyncio.Event()  # set (and replaced) at every new revision and on close
        self._task: asyncio.Task[None] | None = None
        self._streams: set[asyncio.Task[object]] = set()
        self.closed = False

    @property
    def subscribers(self) -> int:
        return len(self._streams)

    # -- recomputing -----------------------------------------------------------------------

    def notify(self) -> None:
        """The snapshot changed."""
        self._dirty.set()

    def publish(self) -> bool:
        """Recompute the entries now; True when a new revision was published."""
        built = self._builder.build(self._snapshot(), self._load)
        entries = {key: entry for key, (entry, _) in built.items()}
        encoded = {key: data for key, (_, data) in built.items()}
        changed, removed = diff_entries(self._bytes, encoded)
        self._computed = True
        if not changed and not removed:
            return False
        self.entries, self._bytes = entries, encoded
        self.revision += 1
        self.history.append(self.revision, [*changed, *removed])
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="feed")

    async def _run(self) -> None:
        while not self.closed:
            if not self._streams:
                await self._dirty.wait()  # nobody listening: only snapshot changes matter
            self._dirty.clear()
            try:
                self.publish()
            except Exception:
                _log.exception("routing feed: recomputing the view failed")
            await asyncio.sleep(self.min_interval_s)

    async def close(self, timeout_s: float = 1.0) -> None:
        """End every stream (they return; one stuck in a write is cancelled after
        ``timeout_s``) and the publishing task."""
        self.closed = True
        self._tick.set()
        self._dirty.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        streams = list(self._streams)
        if streams:
            _, stuck = await asyncio.wait(streams, timeout=timeout_s)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=timeout_s)

    # -- updates -----------------------------------------------------------------------------

    def _update(self, revision: int, *, full: bool = False) -> mesh_pb2.FeedUpdate:
        return mesh_pb2.FeedUpdate(
            revision=revision,
            full=full,
            replica_id=self.replica_id,
            replicas=self._replicas(),
            heartbeat_ms=round(self.heartbeat_s * 1000),
        )

    def full_view(self, allowed: Allowed) -> mesh_pb2.FeedUpdate:
        update = self._update(self.revision, full=True)
        for entry in self.entries.values():
            seen = filter_entry(entry, allowed)
            if seen is not None:
                update.entries.append(seen)
        return update

    def delta(self, since: int, allowed: Allowed) -> mesh_pb2.FeedUpdate | None:
        """What changed after revision ``since`` for this subscriber (None: too far behind)."""
        keys = self.history.since(since)
        if keys is None:
            return None
        update = self._update(self.revision)
        for key in sorted(keys):
            entry = self.entries.get(key)
            seen = None if entry is None else filter_entry(entry, allowed)
            if seen is not None:
                update.entries.append(seen)
            elif allowed is None or key.startswith(NODE) or allowed(entry_model(key)):
                update.removed.append(key)  # gone, or (a node) none of its copies is allowed
        return update

    async def stream(self, allowed: Allowed, context: ServicerContext) -> None:
        """One subscription until the client goes or the publisher closes."""
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        self._dirty.set()  # a subscriber: the publishing task recomputes on its interval
        try:
            if not self._computed:
                self.publish()
            loop = asyncio.get_running_loop()
            sent = self.revision
            await context.write(self.full_view(allowed))
            last = loop.time()
            while not self.closed:
                if self.revision == sent:
                    wait = self.heartbeat_s - (loop.time() - last)
                    if wait > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._tick.wait(), wait)
                        continue
                    update = self._update(sent)  # a heartbeat
                else:
                    revision = self.revision
                    delta = self.delta(sent, allowed)
                    update = self.full_view(allowed) if delta is None else delta
                    sent = revision
                    due = loop.time() - last >= self.heartbeat_s
                    if not update.full and not update.entries and not update.removed and not due:
                        continue  # nothing this subscriber may see changed
                await context.write(update)
                last = loop.time()
        finally:
            self._streams.discard(task)


def _allowed(tenant: Allowed, asked: Sequence[str]) -> Allowed:
    if not asked:
        return tenant
    wanted = frozenset(asked)
    if tenant is None:
        return wanted.__contains__
    return lambda model: model in wanted and tenant(model)


class FeedService(mesh_pb2_grpc.RoutingFeedServicer):
    """``RoutingFeed.Subscribe``: per caller, the models its API key may query."""

    def __init__(
        self,
        publisher: FeedPublisher,
        feed_filter: Callable[[ServicerContext], Allowed],
    ) -> None:
        self.publisher = publisher
        self._filter = feed_filter

    async def Subscribe(  # type: ignore[override]
        self, request: mesh_pb2.FeedRequest, context: ServicerContext
    ) -> None:
        allowed = _allowed(self._filter(context), list(request.models))
        await self.publisher.stream(allowed, context)
