"""Which variant a query gets and which copies may answer it (pure; no I/O).

Everything here is a function of an immutable :class:`~meshserve.controlplane.snapshot.Snapshot`,
the facts of one query (model, the version it names, its canary draw, its SLO) and small explicit
inputs: ``linked``, the ids of the nodes whose stream the router holds (it can tunnel to them; a
router without streams, such as an SDK, passes an empty set), and the router's live measurements
of each copy (:class:`CopyFacts`, looked up by a ``facts`` function, or :class:`LiveLoad` as
data). No I/O, no clock, no randomness, and no import of a server, the hub or etcd: the gateway
uses it now, the SDK can route with the same code later.

Contract:

- :func:`candidates`: the nodes a new query for a variant may go to, in node-id order: its READY
  copies the router can reach (the node has a direct address, or is in ``linked``), narrowed to
  those the placement still wants on nodes not draining, else those not draining, else every
  reachable one (an evicted or drained copy finishes what it has and is queried only while it is
  the last). Empty when no copy can answer.
- :func:`resolve_version`: the version a query naming ``name`` resolves to (a model has versions;
  a version has variants; a variant registered without a version belongs to
  :data:`IMPLICIT_VERSION`) and the variants that may answer it. An alias's name (or no name,
  when the model has the ``live`` alias) follows the alias (:func:`~.rollout.resolve` on
  :func:`version_states`, the canary drawn by ``draw``); a version's name selects it; a
  variant's name pins that one variant (direct pinning, no switching); no name and no alias:
  the model's only version. Raises :class:`~meshserve.common.errors.NotFound` (empty or unknown
  model, unknown name) or :class:`~meshserve.common.errors.FailedPrecondition` (an alias
  pointing at a version that is not registered; several versions and no ``live`` alias), each
  with a message a user can act on. :func:`resolve_variant`: the variant without switching
  (:func:`best_variant` of the version).
- :func:`serving_variant` / :func:`serving_version` / :func:`alias_state`: the same view without
  drawing the canary (readiness, metadata and the Admin API describe the serving version).
- :func:`uses_switching`: a query picks among the variants of its version by SLO
  (:mod:`.switching`) when it has an SLO or a minimum accuracy and pinned no variant, whether it
  followed an alias or named a version (rollouts and switching compose);
  :func:`variant_options` and :func:`copy_load` are what the switcher needs of each variant;
  :func:`explain_switching` answers "what would a query get now, and why" from the same inputs.
- :func:`no_copy`: the UNAVAILABLE error for a variant without a candidate, telling the
  placement's story (that its copies failed to load, or where it is loading), or, given
  ``linked``, that its READY copies are not reachable from this router (so a client retries
  another replica). Its callers are tenants: why a copy failed (the artifact's URI, the hash of
  what the node read, an OS error) is never in it; admins read it in ``meshctl explain
  placement`` and the placement events.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field

from meshserve.common.errors import FailedPrecondition, NotFound, StatusError, Unavailable
from meshserve.common.routing.balance import CopyKey
from meshserve.common.routing.rollout import (
    DEFAULT_ALIAS,
    IMPLICIT_VERSION,
    Route,
    VersionState,
    alias_for,
    alias_status,
    resolve,
    version_of,
    versions_of,
)
from meshserve.common.routing.switching import (
    Choice,
    CopyLoad,
    VariantOption,
    choose_variant,
    predict_seconds,
)
from meshserve.common.routing.view import NodeView, Snapshot
from meshserve.protos import mesh_pb2

__all__ = [
    "IDLE",
    "IMPLICIT_VERSION",
    "CopyFacts",
    "FactsOf",
    "LiveLoad",
    "Resolution",
    "alias_state",
    "best_variant",
    "cached_alternatives",
    "candidates",
    "copy_load",
    "default_slo",
    "explain_switching",
    "no_copy",
    "resolve_variant",
    "resolve_version",
    "serving_variant",
    "serving_version",
    "uses_switching",
    "variant_options",
    "version_of",
    "version_states",
    "versions",
]


@dataclass(frozen=True, slots=True)
class CopyFacts:
    """What a router measures of one copy beyond the snapshot."""

    in_flight: int = 0  # queries this router has in flight on the copy
    reported: int = 0  # queries in flight on the copy by the node's latest telemetry
    max_batch: int = 0  # the copy's batch limit by the node's telemetry (0: not reported)
    observed_s: float = 0.0  # this router's recent latency on the copy (0: never measured)
    slowdown: float = 1.0  # observed / predicted latency (see switching.Calibration)


#: The facts of a copy the router has measured nothing of.
IDLE = CopyFacts()

#: The router's live facts of one copy, by (node, model, variant); read only.
FactsOf = Callable[[CopyKey], CopyFacts]


@dataclass(frozen=True, slots=True)
class LiveLoad:
    """A router's live measurements of one model, as data (what the Admin API explains from)."""

    copies: Mapping[CopyKey, CopyFacts] = field(default_factory=dict)
    level: float | None = None  # the accuracy switching last settled on (any version)
    levels: Mapping[str, float] = field(default_factory=dict)  # the same, per version

    def facts(self, key: CopyKey) -> CopyFacts:
        return self.copies.get(key, IDLE)


# -- copies --------------------------------------------------------------------------------------


def candidates(
    snapshot: Snapshot, spec: mesh_pb2.ModelSpec, linked: Container[str]
) -> list[NodeView]:
    """The nodes a new query for ``spec`` may go to (see the module's contract)."""
    key = (spec.name, spec.variant)
    reachable = [n for n in snapshot.ready_nodes(key) if n.direct_address or n.node_id in linked]
    placement = snapshot.placements.get(key)
    wanted = set(placement.nodes) if placement is not None else set()
    serving = [n for n in reachable if n.node_id not in snapshot.draining]
    preferred = [n for n in serving if n.node_id in wanted]
    return preferred or serving or reachable


def no_copy(
    snapshot: Snapshot, spec: mesh_pb2.ModelSpec, linked: Container[str] | None = None
) -> StatusError:
    """The error for a query to ``spec`` when no copy can answer it. With ``linked`` (the
    router's streams), READY copies the router cannot reach are told as such: they are not
    "not ready", and another replica (one the node is linked to) can answer."""
    key = (spec.name, spec.variant)
    if linked is not None:
        unreachable = [
            n.node_id
            for n in snapshot.ready_nodes(key)
            if not n.direct_address and n.node_id not in linked
        ]
        if unreachable:
            return Unavailable(
                f"model {spec.name!r} variant {spec.variant!r} is ready on "
                f"{', '.join(unreachable)}, not reachable from this replica (no direct address "
                "and no stream to it here yet); retry through another replica"
            )
    placement = snapshot.placements.get(key)
    detail = ""
    if placement is not None and placement.failed:
        return Unavailable(
            f"model {spec.name!r} variant {spec.variant!r} is not available: its copy failed to "
            f"load (an admin sees why with `meshctl explain placement {spec.name}`)"
        )
    if placement is not None and placement.nodes:
        detail = f"; placed on {', '.join(placement.nodes)}, not ready yet"
    return Unavailable(f"model {spec.name!r} variant {spec.variant!r} has no ready copy{detail}")


# -- versions and aliases ------------------------------------------------------------------------


def versions(snapshot: Snapshot, model: str) -> dict[str, list[mesh_pb2.ModelSpec]]:
    """The model's tree: each version's variants (by variant name), versions by name. Built
    once per snapshot and model (every query resolves through it); callers must not mutate it."""

    def build() -> dict[str, list[mesh_pb2.ModelSpec]]:
        out: dict[str, list[mesh_pb2.ModelSpec]] = {}
        for spec in sorted(snapshot.variants(model), key=lambda s: s.variant):
            out.setdefault(version_of(spec), []).append(spec)
        return dict(sorted(out.items()))

    return snapshot.derived(f"versions/{model}", build)


@dataclass(frozen=True, slots=True)
class Resolution:
    """The version a query resolves to and the variants it may be answered by."""

    version: str
    variants: tuple[mesh_pb2.ModelSpec, ...]  # the version's variants; one when pinned
    route: Route | None = None  # the alias route followed (None: none)
    pinned: bool = False  # the query named one variant directly (no switching)


def best_variant(
    snapshot: Snapshot, variants: Sequence[mesh_pb2.ModelSpec], linked: Container[str]
) -> mesh_pb2.ModelSpec:
    """The most accurate of ``variants`` (not empty) with a candidate, any of them when none has
    one; ties go to ``default``, then to the greater name."""
    ready = [s for s in variants if candidates(snapshot, s, linked)]
    pool = ready or variants
    return max(pool, key=lambda s: (s.accuracy, s.variant == "default", s.variant))


def version_states(
    snapshot: Snapshot, model: str, alias: mesh_pb2.Alias, linked: Container[str]
) -> dict[str, VersionState]:
    """Ready and wanted copies of each registered version ``alias`` may route to, summed over
    the version's variants. Ready: their candidates; wanted: the nodes each placement names
    (copies that cannot be placed are not waited for), else its registered copies (at least 1)."""
    tree = versions(snapshot, model)
    out = {}
    for name in versions_of(alias):
        ready = wanted = 0
        for spec in tree.get(name, ()):
            placement = snapshot.placements.get((model, spec.variant))
            placed = len(placement.nodes) if placement is not None else 0
            wanted += placed or max(1, spec.copies)
            ready += len(candidates(snapshot, spec, linked))
        if name in tree:
            out[name] = VersionState(ready, wanted)
    return out


def alias_state(
    snapshot: Snapshot, model: str, alias: mesh_pb2.Alias, linked: Container[str]
) -> mesh_pb2.AliasStatus:
    """What ``alias`` serves now, and each of its versions' readiness and variants."""
    tree = {v: [s.variant for s in specs] for v, specs in versions(snapshot, model).items()}
    return alias_status(alias, version_states(snapshot, model, alias, linked), tree)


def resolve_version(
    snapshot: Snapshot, model: str, name: str, draw: float, linked: Container[str]
) -> Resolution:
    """The version a query naming ``name`` gets and the variants that may answer it. ``name``:
    an alias (followed, its canary drawn by ``draw`` in [0, 100): below the canary percent
    selects it; 100: never), a version, a variant (pinned: that variant only), or "" (the
    ``live`` alias; without one, the model's only version). Raises NotFound (empty or unknown
    model, unknown name) or FailedPrecondition (an alias pointing at a version that is not
    registered; several versions and no ``live`` alias), each saying what to do."""
    if not model:
        raise NotFound("model name is empty")
    tree = versions(snapshot, model)
    if not tree:
        raise NotFound(f"unknown model {model!r}")
    alias = alias_for(snapshot.aliases, model, name)
    if alias is not None:
        route = resolve(alias, version_states(snapshot, model, alias, linked), draw)
        if route.version not in tree:
            raise FailedPrecondition(
                f"alias {alias.alias!r} of model {model!r} points at version "
                f"{route.version!r}, which is not registered; roll the alias out to a "
                f"registered version (meshctl model rollout {model} VERSION)"
            )
        return Resolution(route.version, tuple(tree[route.version]), route)
    if name in tree:
        return Resolution(name, tuple(tree[name]))
    if name:
        spec = snapshot.models.get((model, name))
        if spec is not None:
            return Resolution(version_of(spec), (spec,), pinned=True)
        raise NotFound(
            f"model {model!r} has no version, alias or variant {name!r} (versions: "
            f"{', '.join(tree)}; meshctl models list)"
        )
    if len(tree) == 1:
        only = next(iter(tree))
        return Resolution(only, tuple(tree[only]))
    raise FailedPrecondition(
        f"model {model!r} has versions {', '.join(tree)} and no {DEFAULT_ALIAS!r} alias for "
        f"queries that name none; name a version, or point {DEFAULT_ALIAS!r} at one (meshctl "
        f"model rollout {model} VERSION)"
    )


def resolve_variant(
    snapshot: Snapshot, model: str, version: str, draw: float, linked: Container[str]
) -> tuple[mesh_pb2.ModelSpec, Route | None]:
    """The variant a query naming ``version`` gets without switching (the pinned variant, else
    :func:`best_variant` of the version it resolves to) and the alias route it followed.
    Raises like :func:`resolve_version`."""
    found = resolve_version(snapshot, model, version, draw, linked)
    if found.pinned:
        return found.variants[0], found.route
    return best_variant(snapshot, found.variants, linked), found.route


def serving_variant(
    snapshot: Snapshot, model: str, version: str, linked: Container[str]
) -> mesh_pb2.ModelSpec:
    """The variant a query naming ``version`` gets, an alias's canary never drawn (what
    readiness and metadata describe). Raises like :func:`resolve_variant`."""
    return resolve_variant(snapshot, model, version, 100.0, linked)[0]


def serving_version(snapshot: Snapshot, model: str, version: str, linked: Container[str]) -> str:
    """The version a query naming ``version`` resolves to, the canary never drawn; "" when a
    query would get none."""
    try:
        return resolve_version(snapshot, model, version, 100.0, linked).version
    except StatusError:
        return ""


# -- SLO switching -------------------------------------------------------------------------------


def default_slo(variants: Sequence[mesh_pb2.ModelSpec]) -> float | None:
    """A model's latency budget in seconds: that of its most accurate variant (None: none)."""
    if not variants:
        return None
    best = max(variants, key=lambda s: (s.accuracy, s.variant))
    return best.slo_ms / 1000.0 if best.slo_ms > 0 else None


def uses_switching(resolution: Resolution, slo_s: float | None, min_accuracy: float | None) -> bool:
    """Whether a query picks among the variants of the version it resolves to by SLO (else
    :func:`best_variant`): not when it pinned one variant, nor without an SLO or a minimum
    accuracy. Whether it named a version or an alias, or followed ``live``, does not matter:
    rollouts choose the version, switching the variant."""
    return not (resolution.pinned or (slo_s is None and min_accuracy is None))


def copy_load(node: NodeView, spec: mesh_pb2.ModelSpec, facts: CopyFacts) -> CopyLoad:
    """What the switcher knows of one ready copy: its latency profile and how it runs (from the
    snapshot), its queue (the larger of the router's and the node's count) and the router's
    latency (used without a profile) and slowdown."""
    status = node.copies.get((spec.name, spec.variant))
    profile = {p.batch_size: p.seconds for p in status.latency_profile} if status else {}
    inline = bool(profile) and profile.get(1, 1.0) <= 100e-6
    return CopyLoad(
        node_id=node.node_id,
        profile=profile,
        queued=max(facts.in_flight, facts.reported),
        batched=bool(status and status.batched),
        max_batch=facts.max_batch or spec.serving.batching.max_batch_size or 32,
        parallel=1 if inline else max(1, int(node.hardware.cpu_cores)),
        observed_s=0.0 if profile else facts.observed_s,
        slowdown=facts.slowdown,
    )


def variant_options(
    snapshot: Snapshot,
    variants: Sequence[mesh_pb2.ModelSpec],
    linked: Container[str],
    facts: FactsOf,
) -> list[VariantOption]:
    """Each of ``variants`` with the load of each of its candidates."""
    return [
        VariantOption(
            spec,
            [
                copy_load(node, spec, facts((node.node_id, spec.name, spec.variant)))
                for node in candidates(snapshot, spec, linked)
            ],
        )
        for spec in variants
    ]


def cached_alternatives(
    options: Sequence[VariantOption], choice: Choice, min_accuracy: float | None
) -> list[str]:
    """More accurate variants than the one chosen (at least ``min_accuracy``), with ready copies
    that cache answers, most accurate first: a node holding one of them may have this exact
    answer cached, a better answer for free."""
    floor = min_accuracy or 0.0
    better = sorted(
        (
            o.spec
            for o in options
            if o.copies
            and o.spec.serving.cache
            and o.spec.accuracy > choice.spec.accuracy
            and o.spec.accuracy >= floor
        ),
        key=lambda s: -s.accuracy,
    )
    return [s.variant for s in better]


def explain_switching(
    snapshot: Snapshot,
    model: str,
    slo_ms: float,
    min_accuracy: float,
    *,
    linked: Container[str],
    live: LiveLoad,
    version: str = "",
) -> mesh_pb2.ExplainSwitchingResponse:
    """What a query to ``model`` naming ``version`` ("": none; else a version, alias or variant)
    with ``slo_ms`` (0: the version's default) and ``min_accuracy`` (0: none) would get now, as
    the gateway decides it: the version it resolves to (the canary not drawn), then the variant
    among that version's variants, with each one's prediction. Moves no hysteresis level."""
    found = resolve_version(snapshot, model, version, 100.0, linked)
    slo_s = slo_ms / 1000.0 if slo_ms > 0 else default_slo(found.variants)
    options = variant_options(snapshot, found.variants, linked, live.facts)
    level = live.levels.get(found.version, live.level)
    if uses_switching(found, slo_s, min_accuracy or None):
        choice = choose_variant(model, options, slo_s, min_accuracy or None, level=level)
        chosen, reason = choice.spec.variant, choice.reason
    else:
        chosen = resolve_variant(snapshot, model, version, 100.0, linked)[0].variant
        reason = "pinned variant" if found.pinned else "most accurate ready (no SLO)"
    out = mesh_pb2.ExplainSwitchingResponse(
        chosen=chosen,
        reason=reason,
        slo_ms=(slo_s or 0.0) * 1000,
        version=found.version,
        route=found.route.reason if found.route is not None else "",
    )
    for option in sorted(options, key=lambda o: -o.spec.accuracy):
        best = min(option.copies, key=predict_seconds, default=None)
        predicted = predict_seconds(best) if best is not None else math.inf
        out.variants.add(
            variant=option.spec.variant,
            accuracy=option.spec.accuracy,
            predicted_ms=predicted * 1000 if math.isfinite(predicted) else -1.0,
            ready_copies=len(option.copies),
            queued=best.queued if best is not None else 0,
            slowdown=best.slowdown if best is not None else 1.0,
        )
    return out
