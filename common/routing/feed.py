"""The routing feed, subscriber side: the view a router outside a replica routes from.

Contract:

- :class:`FeedState` holds what a replica's ``RoutingFeed.Subscribe`` stream said so far.
  :meth:`FeedState.apply` takes each :class:`~meshserve.protos.mesh_pb2.FeedUpdate` in order: a
  ``full`` update replaces everything held, any other upserts its entries and drops its
  ``removed`` keys (a heartbeat changes nothing but ``received_at``). :meth:`FeedState.snapshot`
  is the same :class:`~meshserve.common.routing.view.Snapshot` type the replica's gateway routes
  over (models, placements, nodes with their READY copies, draining, aliases), built lazily once
  per change; :meth:`FeedState.load` is a copy's live load as the publishing replica last heard
  it. Pure: no I/O.
- :class:`FeedClient` (asyncio) keeps one subscription open to one replica of ``targets``; on an
  error, an ended stream or a stream silent for three heartbeats it moves to the next target
  (round robin over the targets given and the replica addresses the feed announced, with a
  jittered backoff of at most ~1 s). The state survives a move: the new replica's first message
  is a full view that replaces it. A refused key (UNAUTHENTICATED / PERMISSION_DENIED) is
  remembered and raised by :meth:`FeedClient.wait_ready`.

Entry keys (see mesh.proto ``FeedEntry``): ``model/<name>/<variant>``,
``placement/<name>/<variant>``, ``alias/<model>/<alias>``, ``node/<id>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any, Final

import grpc
from grpc import aio

from meshserve.common.errors import PermissionDenied, StatusError, Unauthenticated, Unavailable
from meshserve.common.routing.view import NodeView, Snapshot, VariantKey
from meshserve.common.security import TLSFiles, aio_channel
from meshserve.protos import mesh_pb2, mesh_pb2_grpc

__all__ = [
    "ALIAS",
    "MODEL",
    "NODE",
    "PLACEMENT",
    "FeedClient",
    "FeedState",
    "alias_key",
    "model_key",
    "node_key",
    "placement_key",
]

_log = logging.getLogger("meshserve.feed")

MODEL: Final = "model/"
PLACEMENT: Final = "placement/"
ALIAS: Final = "alias/"
NODE: Final = "node/"


def model_key(name: str, variant: str) -> str:
    return f"{MODEL}{name}/{variant}"


def placement_key(name: str, variant: str) -> str:
    return f"{PLACEMENT}{name}/{variant}"


def alias_key(model: str, alias: str) -> str:
    return f"{ALIAS}{model}/{alias}"


def node_key(node_id: str) -> str:
    return f"{NODE}{node_id}"


def _node_view(node: mesh_pb2.FeedNode) -> NodeView:
    return NodeView(
        node_id=node.node_id,
        labels=MappingProxyType(dict(node.labels)),
        hardware=node.hardware,
        direct_address=node.direct_address,
        replicas=frozenset(node.replicas),
        copies=MappingProxyType({(c.model, c.variant): c for c in node.copies}),
    )


class FeedState:
    """What the feed said so far (see the module contract). Not thread-safe."""

    def __init__(self) -> None:
        self.revision = 0
        self.replica_id = ""
        self.replicas: list[mesh_pb2.ReplicaInfo] = []
        self.heartbeat_s = 1.0
        self.received_at: float | None = None  # time.monotonic() of the last message
        self.has_view = False  # a full view has been applied
        self._models: dict[VariantKey, mesh_pb2.ModelSpec] = {}
        self._placements: dict[VariantKey, mesh_pb2.Placement] = {}
        self._aliases: dict[tuple[str, str], mesh_pb2.Alias] = {}
        self._nodes: dict[str, mesh_pb2.FeedNode] = {}
        self._views: dict[str, NodeView] = {}
        self._load: dict[str, dict[VariantKey, mesh_pb2.ModelTelemetry]] = {}
        # entry key -> the map and map key it is held under (to drop it by its feed key)
        self._where: dict[str, tuple[dict[Any, Any], Any]] = {}
        self._snapshot: Snapshot | None = None

    # -- applying updates ----------------------------------------------------------------------

    def apply(self, update: mesh_pb2.FeedUpdate) -> bool:
        """Apply one update (in stream order); True when the view changed."""
        self.received_at = time.monotonic()
        self.revision = update.revision
        if update.replica_id:
            self.replica_id = update.replica_id
        self.replicas = list(update.replicas)
        if update.heartbeat_ms:
            self.heartbeat_s = update.heartbeat_ms / 1000.0
        if update.full:
            self._clear()
            self.has_view = True
        elif not update.entries and not update.removed:
            return False
        for key in update.removed:
            self._drop(key)
        for entry in update.entries:
            self._put(entry)
        self._snapshot = None
        return True

    def _clear(self) -> None:
        for held in (self._models, self._placements, self._aliases, self._nodes, self._views):
            held.clear()
        self._load.clear()
        self._where.clear()

    def _drop(self, key: str) -> None:
        where = self._where.pop(key, None)
        if where is None:
            return
        where[0].pop(where[1], None)
        if key.startswith(NODE):
            self._views.pop(where[1], None)
            self._load.pop(where[1], None)

    def _put(self, entry: mesh_pb2.FeedEntry) -> None:
        kind = entry.WhichOneof("value")
        self._drop(entry.key)
        if kind == "model":
            spec = entry.model
            self._models[(spec.name, spec.variant)] = spec
            self._where[entry.key] = (self._models, (spec.name, spec.variant))
        elif kind == "placement":
            placement = entry.placement
            key = (placement.model, placement.variant)
            self._placements[key] = placement
            self._where[entry.key] = (self._placements, key)
        elif kind == "alias":
            alias = entry.alias
            self._aliases[(alias.model, alias.alias)] = alias
            self._where[entry.key] = (self._aliases, (alias.model, alias.alias))
        elif kind == "node":
            node = entry.node
            self._nodes[node.node_id] = node
            self._views[node.node_id] = _node_view(node)
            self._load[node.node_id] = {(t.model, t.variant): t for t in node.load}
            self._where[entry.key] = (self._nodes, node.node_id)
        # an entry of a kind this version does not know: ignored (a newer replica)

    # -- reading -------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The routing view (rebuilt only after a change; shared: do not mutate)."""
        if self._snapshot is None:
            self._snapshot = Snapshot(
                models=MappingProxyType(dict(self._models)),
                placements=MappingProxyType(dict(self._placements)),
                nodes=MappingProxyType(dict(self._views)),
                draining=frozenset(n for n, node in self._nodes.items() if node.draining),
                aliases=MappingProxyType(dict(self._aliases)),
            )
        return self._snapshot

    def load(self, node_id: str, key: VariantKey) -> mesh_pb2.ModelTelemetry | None:
        """The live load of ``node_id``'s copy of ``key`` (in_flight, queue_depth,
        latency_p50_ms, max_batch_size), as the publishing replica last heard it."""
        by_copy = self._load.get(node_id)
        return None if by_copy is None else by_copy.get(key)

    def node(self, node_id: str) -> mesh_pb2.FeedNode | None:
        """The feed's entry for ``node_id`` (None: no READY copy there, or unknown)."""
        return self._nodes.get(node_id)

    def keys(self) -> set[str]:
        """Every entry key held (for tests and debugging)."""
        return set(self._where)


#: Backoff before the next target: base, growth factor and cap (seconds; jittered down by half).
_BACKOFF_S: Final = (0.05, 2.0, 1.0)
#: A stream is given up when silent this many heartbeats (and at least _SILENT_MIN_S).
_SILENT_HEARTBEATS: Final = 3.0
_SILENT_MIN_S: Final = 2.0
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

Callback = Callable[[mesh_pb2.FeedUpdate], None]


class FeedClient:
    """Keeps a :class:`FeedState` current from any replica of ``targets`` (asyncio)."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        tls: TLSFiles | None = None,
        api_key: str | None = None,
        models: Sequence[str] = (),
        options: Sequence[tuple[str, Any]] = (
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ),
    ) -> None:
        given = [t.strip() for target in targets for t in target.split(",") if t.strip()]
        if not given:
            raise ValueError("FeedClient needs at least one replica address")
        self.targets: list[str] = list(dict.fromkeys(given))
        self.state = FeedState()
        self._tls = tls
        self._api_key = api_key
        self._models = list(models)
        self._options = list(options)
        self._channels: dict[str, aio.Channel] = {}
        self._callbacks: list[Callback] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()  # set on every message and on a refusal
        self._refused: StatusError | None = None
        self._no_feed: set[str] = set()  # targets that answered UNIMPLEMENTED
        self._last_error = ""
        self._next = 0
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start subscribing (idempotent; needs a running event loop)."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="routing-feed")

    async def wait_ready(self, timeout: float) -> None:
        """Wait until a full view arrived (starting the client if needed). Raises the refusal
        (Unauthenticated / PermissionDenied) a replica answered with, or :class:`Unavailable`
        naming the targets after ``timeout`` seconds."""
        self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._ready.is_set():
            if self._refused is not None:
                raise type(self._refused)(self._refused.message)
            left = deadline - loop.time()
            if left <= 0:
                detail = f" (last error: {self._last_error})" if self._last_error else ""
                raise Unavailable(
                    f"no routing feed from {', '.join(self._candidates())} within "
                    f"{timeout:g}s{detail}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        if self._refused is not None and not self.state.has_view:
            raise type(self._refused)(self._refused.message)

    async def close(self) -> None:
        """Stop the subscription and close every channel (awaited)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        channels = list(self._channels.values())
        self._channels.clear()
        await asyncio.gather(*(c.close(None) for c in channels), return_exceptions=True)

    async def __aenter__(self) -> FeedClient:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- reading -------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return self.state.snapshot()

    def age_s(self) -> float:
        """Seconds since the last message (heartbeats included); inf before the first."""
        at = self.state.received_at
        return math.inf if at is None else time.monotonic() - at

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback(update)`` after every applied update (heartbeats included); returns
        a function that unsubscribes it. A callback must not block (it runs on the loop)."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return unsubscribe

    # -- the subscription loop -----------------------------------------------------------------

    def _candidates(self) -> list[str]:
        learned = [r.address for r in self.state.replicas if r.address]
        return list(dict.fromkeys([*self.targets, *learned]))

    def _channel(self, target: str) -> aio.Channel:
        channel = self._channels.get(target)
        if channel is None:
            channel = aio_channel(target, self._tls, self._api_key, self._options)
            self._channels[target] = channel
        return channel

    async def _run(self) -> None:
        failures = 0
        while not self._closed:
            candidates = self._candidates()
            target = candidates[self._next % len(candidates)]
            self._next += 1
            try:
                if await self._follow(target):
                    failures = 0
            except asyncio.CancelledError:
                raise
            except aio.AioRpcError as exc:
                self._last_error = f"{target}: {exc.code().name}: {exc.details()}"
                if exc.code() in _REFUSED:
                    cls = Unauthenticated if exc.code() == _REFUSED[0] else PermissionDenied
                    self._refused = cls(f"routing feed at {target}: {exc.details()}")
                    self._changed.set()
                    failures = max(failures, 8)  # the key will not fix itself quickly
                elif exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    # a plain OIP server or a standalone gateway: it serves no feed, and will
                    # not start to; once no target does, say so rather than keep the caller
                    # waiting, and ask again only rarely
                    self._no_feed.add(target)
                    if self._no_feed.issuperset(candidates) and not self.state.has_view:
                        self._refused = Unavailable(
                            f"no routing feed at {', '.join(candidates)} (UNIMPLEMENTED: not a "
                            "control-plane replica); pass feed=<replica addresses>"
                        )
                        self._changed.set()
                    failures = max(failures, 8)
                _log.debug("routing feed from %s failed: %s", target, self._last_error)
            except Exception as exc:  # a broken channel or target: try the next one
                self._last_error = f"{target}: {exc!r}"
                _log.debug("routing feed from %s failed: %r", target, exc)
            if self._closed:
                return
            base, factor, cap = _BACKOFF_S
            delay = min(cap, base * factor**failures)
            failures += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _follow(self, target: str) -> bool:
        """Read one subscription to its end; True when it delivered at least a message."""
        stub = mesh_pb2_grpc.RoutingFeedStub(self._channel(target))
        call = stub.Subscribe(mesh_pb2.FeedRequest(models=self._models))
        got = False
        try:
            while True:
                silent = max(_SILENT_MIN_S, _SILENT_HEARTBEATS * self.state.heartbeat_s)
                try:
                    update = await asyncio.wait_for(call.read(), silent)
                except TimeoutError:
                    self._last_error = f"{target}: silent for {silent:g}s"
                    _log.debug("routing feed from %s silent for %.1fs", target, silent)
                    return got
                if update is aio.EOF:  # type: ignore[attr-defined]
                    self._last_error = f"{target}: the stream ended"
                    return got
                if not got and not update.full:
                    # a subscription starts with a full view; anything else is a protocol
                    # error: drop this stream rather than apply a delta to a foreign view
                    self._last_error = f"{target}: first update was not a full view"
                    return got
                got = True
                self._deliver(update)
        finally:
            call.cancel()

    def _deliver(self, update: mesh_pb2.FeedUpdate) -> None:
        self.state.apply(update)
        self._refused = None
        if update.full:
            self._ready.set()
        self._changed.set()
        for callback in list(self._callbacks):
            try:
                callback(update)
            except Exception:
                _log.exception("routing feed callback %r failed", callback)
