"""Drift and accuracy alarms of one control-plane replica: the hand-off from live telemetry to
:class:`~meshserve.controlplane.observe.health.ModelHealth`, and from its alarms to alarm
episodes (:mod:`~meshserve.controlplane.observe.episodes`) and the event log.

Contract:

* :meth:`Alarms.on_telemetry` is the hub's telemetry hook: it scores every drift window a node's
  telemetry carries against the variant's spec in the current snapshot, with the settings of the
  policy in force (read once per message, only when a window is present). It never raises for
  data a node sent and never blocks: scoring is pure arithmetic on small count vectors.
* :meth:`Alarms.check_accuracy` is one step of the replica's maintenance pass (leader only):
  feedback counters summed over the nodes this replica holds streams to (every node links to
  every replica) are judged by :func:`~.episodes.judge_accuracy`, not before ``grace_s`` after
  this replica took the lead (the nodes that hold the data need time to link to a new leader).
  After the grace it also closes the episodes of variants no longer registered (nor served).
* **Once per episode.** An alarm is recorded as an event (kind ``drift`` or ``accuracy``) by the
  **leader only**, and only after its episode was opened in the store (``open_alarm``, a
  transaction that refuses when one is open or the caller no longer leads); a clearing is
  recorded only after the episode was closed there (``close_alarm``). So a restarted replica or
  the next leader never raises an open episode again, and it clears once. The webhook follows
  the events. Without a registry (unit tests) the episodes live in this object.
* A reference captured from production windows (a variant with no profile) is stored with the
  variant by the leader (``keep_captured_reference``: only while it has none), so a restarted
  replica does not capture a new one from windows that may be drifting.
* Every replica keeps its drift state in step with the stored episodes (the ``alarms/`` mirror
  read at ``episodes``; adopted whenever its revision moves, and when this replica takes the
  lead), so ``meshctl model accuracy`` shows *drifting* on any replica and after a restart.
* :meth:`Alarms.watch` exports the live scores as gauges read at collection time:
  ``meshserve.model.accuracy`` (``model``, ``variant``) and ``meshserve.drift.psi`` (``model``,
  ``variant``, ``signal``: ``output`` or ``max_feature``). The gauges hold the alarms weakly.
* Store writes run in tasks (at most one at a time per episode key, in order); a failed write is
  logged and the alarm is judged again later. Everything else arrives through the callables
  given at construction, which are read at call time (the replica builds its parts after this
  object).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from opentelemetry import metrics

from meshserve.common.instruments import Reading, SharedObservable
from meshserve.common.policy.config import MonitoringSpec
from meshserve.common.sketches import merge_counts
from meshserve.controlplane.observe import episodes
from meshserve.controlplane.observe.episodes import (
    Episode,
    EpisodeKey,
    Feedback,
    Verdict,
    open_episodes,
)
from meshserve.controlplane.observe.events import EventSink
from meshserve.controlplane.observe.health import (
    Alarm,
    HealthSettings,
    ModelHealth,
    feedback_totals,
)
from meshserve.controlplane.registry import Registry
from meshserve.controlplane.snapshot import VariantKey
from meshserve.protos import mesh_pb2

__all__ = ["Alarms", "EpisodeKey", "health_settings", "open_episodes"]

_log = logging.getLogger("meshserve.alarms")

#: The ``alarms/`` mirror as read: ``(revision, key -> stored value)``.
EpisodeView = tuple[int, Mapping[str, bytes]]


def health_settings(monitoring: MonitoringSpec) -> HealthSettings:
    """The scoring settings a policy's ``monitoring`` section asks for."""
    return HealthSettings(
        psi_threshold=monitoring.drift_psi_threshold,
        windows=monitoring.drift_windows,
        capture_windows=monitoring.capture_windows,
        min_accuracy=monitoring.min_accuracy,
        min_feedback=monitoring.min_feedback,
    )


def feedback_by_variant(telemetry: Mapping[str, mesh_pb2.Telemetry]) -> dict[VariantKey, Feedback]:
    """Feedback per variant summed over nodes, with the nodes that have labels joined."""
    totals = feedback_totals(telemetry.values())
    nodes: dict[VariantKey, set[str]] = {}
    for node_id, t in telemetry.items():
        for m in t.models:
            if m.feedback_joined:
                nodes.setdefault((m.model, m.variant), set()).add(node_id)
    return {
        key: Feedback(h.feedback_joined, h.accuracy, frozenset(nodes.get(key, ())))
        for key, h in totals.items()
    }


class Alarms:
    """Scores telemetry into :attr:`health` and records the alarms it raises once per episode
    (see the module contract)."""

    def __init__(
        self,
        *,
        monitoring: Callable[[], MonitoringSpec],
        models: Callable[[], Mapping[VariantKey, mesh_pb2.ModelSpec]],
        telemetry: Callable[[], Mapping[str, mesh_pb2.Telemetry]],
        is_leader: Callable[[], bool],
        events: Callable[[], EventSink | None],
        health: ModelHealth | None = None,
        registry: Callable[[], Registry | None] = lambda: None,
        episodes: Callable[[], EpisodeView | None] = lambda: None,
        replica_id: str = "",
        grace_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``monitoring``: the policy's monitoring section in force; ``models``: the specs of the
        current snapshot; ``telemetry``: the latest telemetry of every node streaming to this
        replica, by node id (a copy: the gauges read it from the exporter's thread);
        ``is_leader``: whether this replica leads now; ``events``: the event log once it is
        started; ``registry`` and ``episodes``: where episodes are written and the mirror they
        are read back from (both None: kept in this object); ``grace_s``: how long a new leader
        waits before it judges accuracy."""
        self.health = health if health is not None else ModelHealth()
        self._monitoring = monitoring
        self._models = models
        self._telemetry = telemetry
        self._is_leader = is_leader
        self._events = events
        self._registry = registry
        self._episodes = episodes
        self._replica_id = replica_id
        self._grace_s = grace_s
        self._clock = clock
        self._memory: dict[EpisodeKey, Episode] = {}  # without a registry
        # Written (revision) or being written (0) by this replica, until the mirror shows it.
        self._local: dict[EpisodeKey, tuple[Episode | None, int]] = {}
        self._locks: dict[EpisodeKey, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._adopted = -1  # the mirror revision the drift state was last adopted from
        self._leading_since: float | None = None
        self._captures: set[VariantKey] = set()  # captured references stored (or being)

    def settings(self) -> HealthSettings:
        return health_settings(self._monitoring())

    # -- the stored episodes ------------------------------------------------------------------

    def episodes(self) -> dict[EpisodeKey, Episode]:
        """The open episodes as this replica knows them: the store's, with this replica's own
        writes that the mirror does not show yet."""
        view = self._episodes()
        if view is None:
            return dict(self._memory)
        revision, items = view
        out = open_episodes(items)
        for key, (episode, written) in list(self._local.items()):
            if written and revision >= written:
                del self._local[key]  # the mirror has caught up
            elif episode is None:
                out.pop(key, None)
            else:
                out[key] = episode
        return out

    def _adopt(self, force: bool = False) -> None:
        view = self._episodes()
        revision = view[0] if view is not None else 0
        if view is None or (revision == self._adopted and not force and not self._local):
            return
        self._adopted = revision
        drift = frozenset((m, v) for (k, m, v) in self.episodes() if k == "drift")
        self.health.adopt_drift(drift)

    # -- judging --------------------------------------------------------------------------------

    def on_telemetry(self, node_id: str, telemetry: mesh_pb2.Telemetry) -> None:
        """Score the drift windows a node's telemetry carries."""
        settings: HealthSettings | None = None
        models: Mapping[VariantKey, mesh_pb2.ModelSpec] | None = None
        for entry in telemetry.models:
            if not entry.HasField("drift"):
                continue
            if settings is None:
                self._adopt()
            settings = settings or self.settings()
            models = models if models is not None else self._models()
            spec = models.get((entry.model, entry.variant))
            alarm = self.health.observe(node_id, entry, spec, settings)
            if alarm is not None:
                self.record(alarm)
            self._keep_capture((entry.model, entry.variant), settings)

    def _keep_capture(self, key: VariantKey, settings: HealthSettings) -> None:
        """On the leader: store an output reference captured from production windows with the
        variant (once), so that a restarted replica scores against it instead of capturing
        again from windows that may be drifting."""
        state = self.health.drift.get(key)
        if (
            state is None
            or state.reference.output.counts
            or state.reference.features
            or len(state.captured) < settings.capture_windows
            or key in self._captures
            or not self._is_leader()
        ):
            return
        registry = self._registry()
        if registry is None:
            return
        self._captures.add(key)
        counts = merge_counts(state.captured)
        profile = mesh_pb2.DriftProfile(
            output=mesh_pb2.Sketch(counts=counts), rows=sum(counts), source="production"
        )

        async def keep() -> None:
            try:
                await registry.keep_captured_reference(*key, profile)
            except Exception as exc:
                self._captures.discard(key)  # tried again with the next window
                _log.warning("cannot store the captured reference of %s/%s: %r", *key, exc)

        task = asyncio.get_running_loop().create_task(keep(), name=f"capture-{'/'.join(key)}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def feedback(self) -> dict[VariantKey, mesh_pb2.VariantHealth]:
        """Feedback counters per variant, summed over the nodes streaming to this replica."""
        return feedback_totals(self._telemetry().values())

    def check_accuracy(self) -> None:
        """Raise or clear accuracy alarms from the feedback the nodes have joined so far (the
        leader only; not within ``grace_s`` of taking the lead)."""
        if not self._is_leader():
            self._leading_since = None
            self._adopt()
            return
        now = self._clock()
        if self._leading_since is None:
            self._leading_since = now
            self._adopt(force=True)  # start from the store, whatever this replica judged
        else:
            self._adopt()
        settings = self.settings()
        settled = now - self._leading_since >= self._grace_s
        open_now = self.episodes()
        figures = feedback_by_variant(self._telemetry())
        if settled:
            registered = self._models()
            for kind, model, variant in open_now:
                if (model, variant) not in registered and (model, variant) not in figures:
                    message = f"{kind} alarm closed: {model}/{variant} is no longer registered"
                    self.record(Alarm(kind, model, variant, False, message))
        for key, figure in figures.items():
            episode = open_now.get(("accuracy", *key))
            verdict = episodes.judge_accuracy(
                figure,
                episode,
                min_accuracy=settings.min_accuracy,
                min_feedback=settings.min_feedback,
                settled=settled,
            )
            if verdict is Verdict.RAISE:
                message = (
                    f"live accuracy {figure.accuracy:.4f} < {settings.min_accuracy:g} over "
                    f"{figure.labelled} labelled answers (from {len(figure.nodes)} nodes)"
                )
                nodes = tuple(sorted(figure.nodes))
                alarm = Alarm(
                    "accuracy", *key, True, message, figure.labelled, figure.accuracy, nodes
                )
                self.record(alarm)
            elif verdict is Verdict.CLEAR:
                message = (
                    f"live accuracy back to {figure.accuracy:.4f} over {figure.labelled} "
                    "labelled answers"
                )
                self.record(Alarm("accuracy", *key, False, message))

    # -- recording ------------------------------------------------------------------------------

    def record(self, alarm: Alarm) -> None:
        """Open or close ``alarm``'s episode and record it as an event, if this replica leads,
        its event log runs, and the episode is not already in that state."""
        events = self._events()
        if events is None or not self._is_leader():
            return
        key: EpisodeKey = (alarm.kind, alarm.model, alarm.variant)
        if (key in self.episodes()) == alarm.raised:
            return  # raised once per episode; cleared once
        episode = None
        if alarm.raised:
            episode = Episode(
                *key,
                message=alarm.message,
                labelled=alarm.labelled,
                accuracy=alarm.accuracy,
                nodes=alarm.nodes,
                unix_ms=time.time_ns() // 1_000_000,
                replica_id=self._replica_id,
            )
        registry = self._registry()
        if registry is None or self._episodes() is None:
            if episode is None:
                self._memory.pop(key, None)
            else:
                self._memory[key] = episode
            _emit(events, alarm)
            return
        self._local[key] = (episode, 0)
        task = asyncio.get_running_loop().create_task(
            self._commit(registry, events, key, alarm, episode), name=f"alarm-{'/'.join(key)}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _commit(
        self,
        registry: Registry,
        events: EventSink,
        key: EpisodeKey,
        alarm: Alarm,
        episode: Episode | None,
    ) -> None:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            try:
                if episode is not None:
                    written = await registry.open_alarm(
                        *key, episodes.encode(episode), self._replica_id
                    )
                else:
                    written = await registry.close_alarm(*key, self._replica_id)
            except Exception as exc:
                _log.warning("cannot store the %s alarm of %s/%s: %r", *key, exc)
                written = 0
            if self._local.get(key, (None, -1))[0] is episode:
                if written:
                    self._local[key] = (episode, written)
                else:
                    del self._local[key]  # refused or failed: the store's state stands
                    self._adopted = -1
            if written:
                _emit(events, alarm)

    async def close(self) -> None:
        """Wait for the store writes under way (bounded by the caller)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def watch(self) -> None:
        """Export this replica's scores as gauges for as long as this object lives."""
        accuracy, drift = _gauges()
        accuracy.watch(self, _accuracy_readings)
        drift.watch(self, _psi_readings)


def _emit(events: EventSink, alarm: Alarm) -> None:
    events.record(alarm.kind, model=alarm.model, variant=alarm.variant, message=alarm.message)


@functools.cache
def _gauges() -> tuple[SharedObservable, SharedObservable]:
    """The process's two health gauges (created on first use: one instrument per name)."""
    meter = metrics.get_meter("meshserve.controlplane")
    accuracy = SharedObservable(
        meter,
        "meshserve.model.accuracy",
        "gauge",
        "1",
        "live accuracy from feedback joined to logged predictions",
    )
    drift = SharedObservable(
        meter,
        "meshserve.drift.psi",
        "gauge",
        "1",
        "population stability index of the latest sketch window",
    )
    return accuracy, drift


def _accuracy_readings(alarms: Alarms) -> Iterable[Reading]:
    return [
        (h.accuracy, {"model": k[0], "variant": k[1]})
        for k, h in alarms.feedback().items()
        if h.feedback_joined
    ]


def _psi_readings(alarms: Alarms) -> Iterable[Reading]:
    out: list[Reading] = []
    for (model, variant), state in list(alarms.health.drift.items()):
        if state.output_psi >= 0:
            out.append((state.output_psi, {"model": model, "variant": variant, "signal": "output"}))
        if state.features:
            attrs = {"model": model, "variant": variant, "signal": "max_feature"}
            out.append((state.max_feature_psi, attrs))
    return out
