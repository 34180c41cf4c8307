"""One router's decisions: which variant answers a query and which copy it goes to.

The same :class:`Router` serves every place a query starts: the SDK (routing itself from the
routing feed), a standalone gateway (from the feed) and a replica's embedded gateway (from its
etcd view, with the node streams it holds). Everything it decides is a function of an immutable
:class:`~meshserve.common.routing.view.Snapshot` (the feed's or the replica's), the query's facts,
and what this router measures itself: its in-flight count and latency per copy
(:class:`~meshserve.common.routing.balance.Balancer`), each copy's learned slowdown
(:class:`~meshserve.common.routing.switching.Calibration`), the accuracy level SLO switching has
settled on (:class:`~meshserve.common.routing.switching.Switcher`), and the live load nodes
report (``telemetry``: the node streams in a replica, the feed elsewhere). No I/O here: sending
is the caller's (gateway forwarder, SDK), which brackets every attempt with :meth:`begin` /
:meth:`end`.

Contract:

- :meth:`Router.decide`: the version (a named version, alias with its canary drawn from the
  request id, a pinned variant, else ``live``; :func:`~.resolve.resolve_version`), then the
  variant: SLO switching when the query or its version has a budget or a minimum accuracy
  (:func:`~.resolve.uses_switching`), else the most accurate variant with a candidate. Raises the
  resolution's domain errors (NotFound, FailedPrecondition) unchanged.
- :meth:`Router.select`: a candidate copy of the variant not in ``tried`` (it is added there):
  the query's zone first (:func:`~.locality.prefer_local`), then power of two choices on this
  router's in-flight count plus the node's reported queue; None when none is left.
- :meth:`Router.predicted_s`: when a new query on one copy would complete
  (:func:`~.switching.predict_seconds` of :func:`~.resolve.copy_load`: the copy's latency profile,
  its parallelism and learned slowdown, with this router's in-flight count plus the node's
  reported queue as the queries ahead: a stale reported in-flight count would hold back a copy
  that is draining); inf without a profile or an observed latency. A router that asks starts
  learning the copy's slowdown (as SLO switching does), so its predictions hold under load.
- :meth:`Router.begin` / :meth:`Router.end`: bracket exactly one attempt on a copy; ``end`` is
  called once per ``begin``, with ``ok=False`` only for a copy fault (not for a caller's bad
  input), so a failing copy looks slow until it answers well again; only an answered attempt
  (``answered``) calibrates the copy's slowdown (a quick refusal is not a fast copy).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Container
from dataclasses import dataclass

from meshserve.common.routing.balance import Balancer, CopyKey
from meshserve.common.routing.locality import prefer_local
from meshserve.common.routing.resolve import (
    CopyFacts,
    LiveLoad,
    best_variant,
    cached_alternatives,
    candidates,
    copy_load,
    default_slo,
    resolve_version,
    uses_switching,
    variant_options,
)
from meshserve.common.routing.rollout import canary_draw
from meshserve.common.routing.switching import Calibration, Switcher, predict_seconds
from meshserve.common.routing.view import NodeView, Snapshot, VariantKey
from meshserve.protos import mesh_pb2

__all__ = ["Attempt", "Decision", "Router", "Telemetry"]

#: The live load a node last reported for one of its copies (None: nothing heard).
Telemetry = Callable[[str, VariantKey], "mesh_pb2.ModelTelemetry | None"]


def _no_telemetry(node_id: str, key: VariantKey) -> mesh_pb2.ModelTelemetry | None:
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    """Which variant answers a query, and why."""

    spec: mesh_pb2.ModelSpec
    reason: str  # the route span's reason: "p2c", "alias ...", "switch: ..."
    predicted_s: float  # predicted completion on the best copy (inf: no prediction)
    slo_s: float | None  # the query's budget: its own, else its version's default
    version: str  # the version it resolved to
    alias: str = ""  # the alias it followed ("": none)
    switch_reason: str = ""  # SLO switching's reason ("": not switched)
    prefer: str = ""  # more accurate variants whose cached answer may be returned instead


@dataclass(slots=True)
class Attempt:
    """One attempt on one copy, between :meth:`Router.begin` and :meth:`Router.end`."""

    key: CopyKey
    started: float
    baseline_s: float  # the uncalibrated prediction at dispatch (0: not calibrating)


class Router:
    def __init__(
        self,
        *,
        linked: Container[str] = frozenset(),
        telemetry: Telemetry = _no_telemetry,
        zone: str = "",
        balancer: Balancer | None = None,
    ) -> None:
        """``linked``: the nodes this router can tunnel to (a replica's node streams; empty
        elsewhere, where tunnel-only copies are not candidates). ``telemetry``: the live load
        nodes report. ``zone``: preferred for queries that name none ("": none)."""
        self.linked = linked
        self.zone = zone
        self.balancer = balancer or Balancer()
        self.calibration = Calibration()
        self.switcher = Switcher()
        self._telemetry = telemetry
        self._calibrated: set[str] = set()  # models queried with an SLO

    # -- what this router knows of a copy ------------------------------------------------------

    def facts(self, key: CopyKey) -> CopyFacts:
        """What this router measures of one copy now (with what its node reports)."""
        node_id, model, variant = key
        m = self._telemetry(node_id, (model, variant))
        return CopyFacts(
            in_flight=self.balancer.in_flight(key),
            reported=int(m.in_flight) if m is not None else 0,
            max_batch=int(m.max_batch_size) if m is not None else 0,
            observed_s=self.balancer.observed(key, decay_s=1.0),
            slowdown=self.calibration.factor(key),
        )

    def live_load(self, snapshot: Snapshot, model: str) -> LiveLoad:
        """This router's measurements of ``model``'s candidate copies, as data (the Admin API
        explains switching from it)."""
        copies = {
            (node.node_id, spec.name, spec.variant): self.facts(
                (node.node_id, spec.name, spec.variant)
            )
            for spec in snapshot.variants(model)
            for node in candidates(snapshot, spec, self.linked)
        }
        return LiveLoad(copies=copies, levels=self.switcher.levels(model))

    def forget(self, keep: Callable[[CopyKey], bool]) -> None:
        """Drop what is measured of copies ``keep`` rejects (bounded as copies come and go)."""
        self.balancer.forget(keep)
        self.calibration.forget(keep)  # type: ignore[arg-type]

    # -- decisions -----------------------------------------------------------------------------

    def candidates(self, snapshot: Snapshot, spec: mesh_pb2.ModelSpec) -> list[NodeView]:
        return candidates(snapshot, spec, self.linked)

    def decide(
        self,
        snapshot: Snapshot,
        model: str,
        name: str,
        request_id: str,
        slo_s: float | None,
        min_accuracy: float | None,
    ) -> Decision:
        """The variant for a query to ``model`` naming ``name`` (see the module contract)."""
        linked = self.linked
        found = resolve_version(snapshot, model, name, canary_draw(request_id), linked)
        alias = found.route.alias if found.route is not None else ""
        routed = f"alias {found.route.reason}" if found.route is not None else ""
        if slo_s is None and not found.pinned:  # the version's default budget
            slo_s = default_slo(found.variants)
        if not uses_switching(found, slo_s, min_accuracy):
            spec = (
                found.variants[0]
                if found.pinned
                else best_variant(snapshot, found.variants, linked)
            )
            return Decision(spec, routed or "p2c", math.inf, slo_s, found.version, alias)
        self._calibrated.add(model)
        options = variant_options(snapshot, found.variants, linked, self.facts)
        choice = self.switcher.choose(model, options, slo_s, min_accuracy, version=found.version)
        prefer = ",".join(cached_alternatives(options, choice, min_accuracy))
        reason = f"switch: {choice.reason}" + (f" ({routed})" if routed else "")
        return Decision(
            choice.spec,
            reason,
            choice.predicted_s,
            slo_s,
            found.version,
            alias,
            choice.reason,
            prefer,
        )

    def select(
        self, snapshot: Snapshot, spec: mesh_pb2.ModelSpec, zone: str, tried: set[str]
    ) -> tuple[NodeView | None, int]:
        """A copy of ``spec`` not in ``tried`` (added there) and how many were left to choose
        from; (None, 0) when none is left. A retry narrows to the zone after removing the tried
        copies, so it may leave the zone."""
        found = [n for n in candidates(snapshot, spec, self.linked) if n.node_id not in tried]
        if not found:
            return None, 0
        variant = (spec.name, spec.variant)
        telemetry = self._telemetry

        def key(node: NodeView) -> CopyKey:
            return (node.node_id, spec.name, spec.variant)

        def queue_depth(node: NodeView) -> int:
            m = telemetry(node.node_id, variant)
            return int(m.queue_depth) if m is not None else 0

        node = self.balancer.pick(prefer_local(found, zone or self.zone), key, queue_depth)
        tried.add(node.node_id)
        return node, len(found)

    def predicted_s(self, node: NodeView, spec: mesh_pb2.ModelSpec) -> float:
        """When a new query on ``node``'s copy of ``spec`` would complete, in seconds from now
        (see the module contract)."""
        self._calibrated.add(spec.name)
        key = (node.node_id, spec.name, spec.variant)
        m = self._telemetry(node.node_id, (spec.name, spec.variant))
        balancer = self.balancer
        facts = CopyFacts(  # the queries ahead: ours, plus those the node says are queued
            in_flight=balancer.in_flight(key) + (int(m.queue_depth) if m is not None else 0),
            max_batch=int(m.max_batch_size) if m is not None else 0,
            observed_s=balancer.observed(key, decay_s=1.0),
            slowdown=self.calibration.factor(key),
        )
        return predict_seconds(copy_load(node, spec, facts))

    # -- attempts ------------------------------------------------------------------------------

    def begin(self, node: NodeView, spec: mesh_pb2.ModelSpec) -> Attempt:
        """Start one attempt on ``node``'s copy of ``spec``."""
        key = (node.node_id, spec.name, spec.variant)
        baseline = 0.0
        if spec.name in self._calibrated:  # the prediction at dispatch, uncalibrated
            load = copy_load(node, spec, self.facts(key))
            if load.profile:
                baseline = predict_seconds(dataclasses.replace(load, slowdown=1.0))
        self.balancer.started(key)
        return Attempt(key, time.monotonic(), baseline)

    def end(self, attempt: Attempt, ok: bool, answered: bool = True) -> float:
        """Finish ``attempt`` (``ok=False``: a copy fault; ``answered=False``: it ended without
        an answer, e.g. refused or past its deadline, so its time teaches the calibration
        nothing); returns its latency in seconds."""
        elapsed = time.monotonic() - attempt.started
        self.balancer.finished(attempt.key, elapsed, ok)
        if ok and answered and attempt.baseline_s:
            self.calibration.observe(attempt.key, attempt.baseline_s, elapsed)
        return elapsed
