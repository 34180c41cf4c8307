"""The copies a node holds: load (fetch → verify → onnxruntime), unload, look up, report.

Contract: :meth:`CopyManager.load` is idempotent — asking for a copy that is already loading or
ready with the same sha256 does nothing but re-announce its status, so several control-plane
replicas may send the same command. Every state change is announced to the listeners (the links
to the control plane). A copy is READY only once its session is loaded and verified; nothing is
ever served from a copy that is LOADING or FAILED. Commands carry the placement revision they
were decided at: a Load or Unload older than the newest one applied to that variant is ignored.
A FAILED copy is loaded again by a Load decided at a newer placement revision (the leader placed
it here again: a retry); its status says whether the failure was permanent (the artifact or the
request was refused, see :class:`~meshserve.node.store.StoreError`; a model onnxruntime cannot
load) or transient (the network or the source, worth retrying later).
Downloads run outside the load lock (the store serialises fetches per artifact only), so a slow
or stuck download never holds up another copy; only reading into onnxruntime and warming up take
the lock, one at a time, to bound memory spikes.
An unloaded or replaced copy is retired: its load cancelled, its cached answers dropped, its
in-flight queries given a bounded time (5 s), its batcher closed, its artifact pin released once.
The record of each copy and its status message are :mod:`meshserve.node.copy_entry`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

from meshserve.common.errors import NotFound, Unavailable
from meshserve.common.instruments import Reading
from meshserve.common.sketches import monitoring_digest
from meshserve.node.batcher import Batcher, BatchPolicy
from meshserve.node.cache import ResponseCache
from meshserve.node.copy_entry import CopyEntry
from meshserve.node.metrics import NodeMetrics, node_metrics
from meshserve.node.monitor import PredictionLog
from meshserve.node.runtime import LoadError, OnnxCopy, resident_bytes
from meshserve.node.store import ModelStore, StoreError
from meshserve.protos import mesh_pb2

__all__ = ["CopyEntry", "CopyManager"]

_log = logging.getLogger("meshserve.node.copies")
_tracer = trace.get_tracer("meshserve.node")

Listener = Callable[[mesh_pb2.CopyStatus], None]


def _warmup_sizes(serving: mesh_pb2.ServingConfig) -> list[int]:
    """Every batch size the batcher may use often: 1, the preferred sizes, the maximum."""
    batching = serving.batching
    if not batching.enabled:
        return [1]
    return [1, *batching.preferred_batch_sizes, batching.max_batch_size or 32]


def _format_profile(profile: list[tuple[int, float]]) -> str:
    """``b1=0.04ms b8=0.11ms``: a latency profile for a log line."""
    return " ".join(f"b{size}={seconds * 1e3:.2f}ms" for size, seconds in sorted(profile))


def _rows(inputs: dict[str, Any]) -> int:
    """The batch size of a (batched) input dict."""
    for array in inputs.values():
        return int(array.shape[0]) if array.ndim else 1
    return 0


def _cache_evictions(cache: ResponseCache) -> list[Reading]:
    return [(float(cache.stats().evictions), {})]


class CopyManager:
    def __init__(
        self,
        store: ModelStore,
        executor: concurrent.futures.Executor,
        *,
        intra_op_threads: int = 1,
        cache_bytes: int = 256 << 20,
        inline_max_us: float = 100.0,
        batch_concurrency: int = 1,
        metrics: NodeMetrics | None = None,
        prediction_log: PredictionLog | None = None,
    ) -> None:
        """``inline_max_us``: copies whose batch-1 run takes at most this long (median, measured
        after warm-up) run on the event loop itself. Handing a run to a worker thread and back
        costs tens of microseconds and GIL ping-pong; for such copies that is more than the
        run. 0 turns it off. ``batch_concurrency``: batches of one copy that may run at once
        (set it to the executor's worker count, so batching never leaves a core idle).
        ``metrics``: where copies report (default: the process's :func:`node_metrics`)."""
        self._store = store
        self.cache = ResponseCache(cache_bytes)
        self._metrics = metrics or node_metrics()
        self._metrics.memory.watch(self, CopyManager._memory_readings)
        self._metrics.cache_evictions.watch(self.cache, _cache_evictions)
        self.prediction_log = prediction_log  # None: predictions are never logged
        self._executor = executor
        self._inline_max_us = inline_max_us
        self._batch_concurrency = max(1, batch_concurrency)
        self._intra_op_threads = intra_op_threads
        self._copies: dict[tuple[str, str], CopyEntry] = {}
        self._listeners: list[Listener] = []
        self._revisions: dict[tuple[str, str], int] = {}  # newest placement revision applied
        self._stores: dict[tuple[str, str], str] = {}  # the store those revisions count in
        self._load_lock = asyncio.Lock()  # one session load + warm-up at a time: bounded memory
        self._ordered: set[tuple[str, str]] = set()  # every variant a Load named here
        self._retiring: set[asyncio.Task[None]] = set()  # replaced copies being released

    @property
    def executor(self) -> concurrent.futures.Executor:
        return self._executor

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def statuses(self) -> list[mesh_pb2.CopyStatus]:
        return [e.status() for e in self._copies.values()]

    def entries(self) -> list[CopyEntry]:
        return list(self._copies.values())

    def _announce(self, entry: CopyEntry) -> None:
        status = entry.status()
        for listener in list(self._listeners):
            listener(status)

    def _stale(self, key: tuple[str, str], revision: int, what: str, store_id: str = "") -> bool:
        """True (and the command is to be ignored) when a newer decision about ``key`` was
        already applied; otherwise remembers ``revision`` as the newest. Revisions compare only
        within one store: a command from another store (``store_id``: etcd lost its data and
        counts from 1 again) starts the variant's count afresh."""
        known = self._stores.get(key, "")
        if store_id and known and store_id != known:
            _log.warning(
                "%s %s/%s comes from another etcd store (%s, was %s): its revisions restart",
                what,
                key[0],
                key[1],
                store_id,
                known,
            )
            self._revisions.pop(key, None)
            entry = self._copies.get(key)
            if entry is not None:
                entry.revision = 0
        if store_id:
            self._stores[key] = store_id
        last = self._revisions.get(key, 0)
        if revision and revision < last:
            _log.info(
                "ignoring %s %s/%s: decided at revision %d, newer decision at %d",
                what,
                key[0],
                key[1],
                revision,
                last,
            )
            return True
        self._revisions[key] = max(last, revision)
        return False

    def load(self, cmd: mesh_pb2.LoadModel) -> None:
        key = (cmd.model, cmd.variant)
        if self._stale(key, cmd.placement_revision, "load", cmd.store_id):
            return
        self._ordered.add(key)
        entry = self._copies.get(key)
        retry = (
            entry is not None
            and entry.state == mesh_pb2.FAILED
            and (cmd.placement_revision == 0 or cmd.placement_revision > entry.revision)
        )
        if entry is not None and entry.sha256 == cmd.sha256.lower() and not retry:
            digest = monitoring_digest(cmd.serving.monitoring, cmd.drift_reference)
            if digest != monitoring_digest(entry.monitoring, entry.reference):
                entry.configure_monitoring(cmd.serving.monitoring, cmd.drift_reference)
                _log.info("monitoring of %s/%s reconfigured", entry.model, entry.variant)
            self._announce(entry)  # idempotent: re-announce, never load twice
            return
        if entry is not None:  # another artifact (or a retry) for the variant: the old copy goes
            entry.instruments.unloaded("replaced")
            self._retire_later(entry)
        entry = CopyEntry(
            cmd.model,
            cmd.variant,
            cmd.sha256.lower(),
            serving=cmd.serving,
            monitoring=cmd.serving.monitoring,
            reference=cmd.drift_reference,
            instruments=self._metrics.copy(cmd.model, cmd.variant),
        )
        entry.revision = cmd.placement_revision
        _log.info("loading %s/%s from %s", cmd.model, cmd.variant, cmd.artifact_uri)
        self._copies[key] = entry
        self._announce(entry)
        entry.task = asyncio.create_task(self._load(entry, cmd), name=f"load {key}")

    async def _load(self, entry: CopyEntry, cmd: mesh_pb2.LoadModel) -> None:
        providers = list(cmd.execution_providers) or ["CPUExecutionProvider"]
        with _tracer.start_as_current_span(
            "node load",
            attributes={"meshserve.model": entry.model, "meshserve.variant": entry.variant},
        ) as span:
            started = time.perf_counter()
            try:
                self._store.pin(entry.sha256)  # a loaded copy's artifact is never evicted
                entry.pinned = True
                path = await self._store.fetch(
                    cmd.artifact_uri, cmd.sha256, progress=self._progress_reporter(entry)
                )
                async with self._load_lock:
                    before = resident_bytes()
                    copy = await asyncio.to_thread(
                        OnnxCopy.load, path, providers, intra_op_threads=self._intra_op_threads
                    )
                    entry.load_seconds = time.perf_counter() - started
                    if not entry.serving.skip_warmup:
                        sizes = _warmup_sizes(entry.serving)
                        with _tracer.start_as_current_span(
                            "node warmup", attributes={"meshserve.batch_sizes": sizes}
                        ) as warmup:
                            warm_started = time.perf_counter()
                            await asyncio.get_running_loop().run_in_executor(
                                self._executor, copy.warmup_blocking, sizes
                            )
                            entry.warmup_seconds = time.perf_counter() - warm_started
                            warmup.set_attribute("meshserve.warmup_seconds", entry.warmup_seconds)
                    profile = await asyncio.get_running_loop().run_in_executor(
                        self._executor, copy.latency_profile, _warmup_sizes(entry.serving)
                    )
                    entry.latency_profile = profile
                    entry.run_seconds = dict(profile)[1]
                    entry.execution_provider = copy.execution_provider
                    entry.inline = entry.run_seconds * 1e6 <= self._inline_max_us
                    # Measured after warm-up: onnxruntime's arenas are allocated by then.
                    entry.memory_bytes = max(0, resident_bytes() - before)
            except (StoreError, LoadError) as exc:
                self._unpin(entry)
                entry.state, entry.reason = mesh_pb2.FAILED, str(exc)
                entry.permanent = isinstance(exc, LoadError) or exc.permanent
                span.set_status(trace.StatusCode.ERROR, entry.reason)
                _log.warning("copy %s/%s failed: %s", entry.model, entry.variant, exc)
                self._announce(entry)
                return
            except Exception as exc:
                self._unpin(entry)
                entry.state, entry.reason = mesh_pb2.FAILED, f"unexpected load error: {exc!r}"
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR, entry.reason)
                _log.exception("copy %s/%s failed", entry.model, entry.variant)
                self._announce(entry)
                return
            entry.copy = copy
            entry.configure_monitoring(entry.monitoring, entry.reference)
            entry.batcher = self._batcher_for(entry, copy)
            entry.state = mesh_pb2.READY
            self._loaded(entry, span)
            _log.info(
                "copy %s/%s ready: load %.3fs, warm-up %.3fs, %.1f MiB, run %.0f us (%s), "
                "profile %s on %s",
                entry.model,
                entry.variant,
                entry.load_seconds,
                entry.warmup_seconds,
                entry.memory_bytes / (1 << 20),
                entry.run_seconds * 1e6,
                "inline" if entry.inline else "worker threads",
                _format_profile(entry.latency_profile),
                entry.execution_provider,
            )
            self._announce(entry)

    @staticmethod
    def _loaded(entry: CopyEntry, span: trace.Span) -> None:
        """Report a copy that just became READY: load span attributes and histograms."""
        warmed = not entry.serving.skip_warmup
        entry.instruments.loaded(entry.load_seconds, entry.warmup_seconds if warmed else None)
        if span.is_recording():
            span.set_attributes(
                {
                    "meshserve.load_seconds": entry.load_seconds,
                    "meshserve.warmup_seconds": entry.warmup_seconds,
                    "meshserve.memory_bytes": entry.memory_bytes,
                    "meshserve.execution_provider": entry.execution_provider,
                    "meshserve.batched": entry.batcher is not None,
                }
            )

    def _memory_readings(self) -> list[Reading]:
        """Resident bytes per READY copy (read on the metrics thread: one copy of the table)."""
        return [
            (float(e.memory_bytes), e.instruments.attributes)
            for e in list(self._copies.values())
            if e.state == mesh_pb2.READY
        ]

    def _progress_reporter(self, entry: CopyEntry) -> Callable[[int, int | None], None]:
        """A download progress callback (called from the store's worker thread) that announces
        the copy's status at most every 0.5 s, on the event loop."""
        loop = asyncio.get_running_loop()
        last = [0.0]

        def report(done: int, total: int | None) -> None:
            now = time.monotonic()
            if now - last[0] < 0.5 and done != total:
                return
            last[0] = now

            def update() -> None:
                entry.bytes_fetched, entry.bytes_total = done, total or 0
                if entry.state == mesh_pb2.LOADING:
                    self._announce(entry)

            loop.call_soon_threadsafe(update)

        return report

    def _batcher_for(self, entry: CopyEntry, copy: OnnxCopy) -> Batcher | None:
        config = entry.serving.batching
        if not config.enabled or not copy.batch_axis:
            return None  # models without a dynamic batch axis are never batched
        loop = asyncio.get_running_loop()
        names = copy.all_outputs

        async def execute(inputs: dict[str, Any]) -> dict[str, Any]:
            # Small batches of an inline copy run inline too (cost ~ rows x batch-1 cost), after
            # one turn of the loop: requests that arrived meanwhile queue behind this batch and
            # leave together in the next (a batch that ran at once would never let them gather).
            if entry.inline and entry.run_seconds * _rows(inputs) * 1e6 <= self._inline_max_us:
                await asyncio.sleep(0)
                return copy.run_blocking(inputs, names)
            return await loop.run_in_executor(self._executor, copy.run_blocking, inputs, names)

        policy = BatchPolicy(
            max_batch_size=config.max_batch_size or 32,
            max_queue_delay_us=config.max_queue_delay_us,
            preferred_batch_sizes=tuple(config.preferred_batch_sizes),
            max_queue=config.max_queue or 1024,
            adaptive=config.adaptive and config.latency_slo_ms > 0,
            latency_slo_ms=config.latency_slo_ms or None,
            max_concurrent_batches=1 if entry.inline else self._batch_concurrency,
        )
        return Batcher(
            execute, policy, name=f"{entry.model}/{entry.variant}", observer=entry.instruments
        )

    async def unload(
        self, model: str, variant: str, placement_revision: int = 0, store_id: str = ""
    ) -> None:
        """Unload a copy (no-op if absent or if ``placement_revision`` is older than the last
        decision applied for it in the same store); in-flight requests get a bounded time to
        finish."""
        if self._stale((model, variant), placement_revision, "unload", store_id):
            return
        entry = self._copies.pop((model, variant), None)
        if entry is None:
            return
        entry.instruments.unloaded("placement")
        await self._retire(entry)
        entry.state = mesh_pb2.UNLOADED
        self._announce(entry)

    async def _retire(self, entry: CopyEntry) -> None:
        """Release a copy no longer in the table: cancel its load, drop its cached answers, let
        in-flight requests finish (bounded wait), close its batcher, release its artifact pin."""
        if entry.task is not None and not entry.task.done():
            entry.task.cancel()
        self.cache.invalidate(entry.model, entry.variant)
        for _ in range(100):
            if entry.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        if entry.batcher is not None:
            await entry.batcher.close()
        self._unpin(entry)
        entry.copy, entry.batcher = None, None

    def _retire_later(self, entry: CopyEntry) -> None:
        task = asyncio.create_task(self._retire(entry), name=f"retire {entry.model}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _unpin(self, entry: CopyEntry) -> None:
        """Release ``entry``'s pin once, however many paths end it (failure, unload, replace)."""
        if entry.pinned:
            entry.pinned = False
            self._store.unpin(entry.sha256)

    def ready(self, model: str, variant: str) -> CopyEntry:
        """The READY copy to serve ``model`` (``variant`` may be empty if only one is ready).
        A copy this node held (or was told to load) and no longer holds is UNAVAILABLE: the mesh
        routes by a view that may lag a move (drain, eviction, rollout) by a moment, and the
        query is retriable elsewhere. A model never ordered here is NOT_FOUND, as a standalone
        OIP server answers for a model it does not serve."""
        if variant:
            entry = self._copies.get((model, variant))
            if entry is None:
                if (model, variant) in self._ordered:
                    raise Unavailable(
                        f"model {model!r} variant {variant!r} is no longer loaded on this node "
                        "(moved elsewhere); retry through the mesh"
                    )
                raise NotFound(f"model {model!r} variant {variant!r} is not served by this node")
        else:
            candidates = [e for (m, _), e in self._copies.items() if m == model]
            if not candidates:
                if any(m == model for m, _ in self._ordered):
                    raise Unavailable(
                        f"model {model!r} is no longer loaded on this node (moved elsewhere); "
                        "retry through the mesh"
                    )
                raise NotFound(f"model {model!r} is not served by this node")
            ready = [e for e in candidates if e.state == mesh_pb2.READY]
            entry = ready[0] if ready else candidates[0]
        if entry.state != mesh_pb2.READY or entry.copy is None:
            # Never the reason: callers are tenants, and a load failure names the artifact's
            # URI, the hash of what was read, OS errors. Admins see it (explain, events).
            state = mesh_pb2.CopyState.Name(entry.state)  # type: ignore[arg-type]
            raise Unavailable(f"model {model!r} variant {entry.variant!r} is {state}")
        return entry

    async def close(self) -> None:
        await asyncio.gather(
            *(e.batcher.close() for e in self._copies.values() if e.batcher is not None),
            return_exceptions=True,
        )
        tasks = [e.task for e in self._copies.values() if e.task is not None and not e.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, *self._retiring, return_exceptions=True)
        self._copies.clear()
