"""The Admin API (used by meshctl): models, nodes, placements and their explanations, the
placement policy, draining, and the decision events.

Every write is validated here first, so nothing malformed ever reaches etcd.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import urllib.parse
from collections.abc import Callable

from meshserve.common.datatypes import DATATYPES
from meshserve.common.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServicerContext,
    Unavailable,
)
from meshserve.common.policy.config import Policy, PolicyError, parse_policy
from meshserve.common.sketches import MAX_CLASSES, MAX_FEATURES
from meshserve.controlplane.dataplane.resolve import (
    LiveLoad,
    alias_state,
    explain_switching,
    serving_version,
)
from meshserve.controlplane.dataplane.rollout import DEFAULT_ALIAS, plan_rollback, plan_rollout
from meshserve.controlplane.link.hub import Hub
from meshserve.controlplane.observe.events import EventLog
from meshserve.controlplane.observe.health import ModelHealth, feedback_totals
from meshserve.controlplane.placement.scheduler import explain_variant
from meshserve.controlplane.registry import Registry
from meshserve.controlplane.snapshot import Snapshot
from meshserve.protos import mesh_pb2, mesh_pb2_grpc

__all__ = ["AdminService", "validate_profile", "validate_spec"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_COPIES = 1000
MAX_FEEDBACK_ITEMS = 10_000


def validate_spec(spec: mesh_pb2.ModelSpec) -> mesh_pb2.ModelSpec:
    """A normalised copy of ``spec``, or InvalidArgument saying what is wrong."""
    out = mesh_pb2.ModelSpec()
    out.CopyFrom(spec)
    out.variant = out.variant or "default"
    out.sha256 = out.sha256.lower()
    out.copies = out.copies or 1
    for field, value in (("name", out.name), ("variant", out.variant)):
        if not _NAME.match(value):
            raise InvalidArgument(
                f"invalid model {field} {value!r}: 1-128 of [A-Za-z0-9_.-], starting with a "
                "letter or digit"
            )
    scheme = urllib.parse.urlparse(out.artifact_uri).scheme
    if scheme not in ("file", "http", "https"):
        raise InvalidArgument(
            f"artifact_uri {out.artifact_uri!r} must be a file://, http:// or https:// URI"
        )
    if not _SHA256.match(out.sha256):
        raise InvalidArgument(f"sha256 {spec.sha256!r} is not 64 hex characters")
    if out.copies > MAX_COPIES:
        raise InvalidArgument(f"copies={out.copies} is over the limit of {MAX_COPIES}")
    for tensor in [*out.inputs, *out.outputs]:
        if tensor.datatype not in DATATYPES:
            raise InvalidArgument(f"tensor {tensor.name!r}: unknown datatype {tensor.datatype!r}")
    if not (math.isfinite(out.slo_ms) and out.slo_ms >= 0):
        raise InvalidArgument(f"slo_ms={out.slo_ms} must be a finite number >= 0")
    if not (math.isfinite(out.accuracy) and 0 <= out.accuracy <= 1):
        raise InvalidArgument(f"accuracy={out.accuracy} must be between 0 and 1")
    if out.HasField("autoscaling"):
        scale = out.autoscaling
        if scale.max_copies > MAX_COPIES:
            raise InvalidArgument(f"autoscaling.max_copies={scale.max_copies} is over {MAX_COPIES}")
        if scale.max_copies and scale.min_copies > scale.max_copies:
            raise InvalidArgument(
                f"autoscaling.min_copies={scale.min_copies} exceeds max_copies={scale.max_copies}"
            )
        if not scale.target_in_flight >= 0:
            raise InvalidArgument("autoscaling.target_in_flight must be >= 0")
    monitoring = out.serving.monitoring
    if not (math.isfinite(monitoring.log_sample_rate) and 0 <= monitoring.log_sample_rate <= 1):
        raise InvalidArgument(
            f"monitoring.log_sample_rate={monitoring.log_sample_rate} must be between 0 and 1"
        )
    if out.HasField("drift_reference"):
        validate_profile(out.drift_reference)
    return out


MAX_PROFILE_BINS = 64


def validate_profile(profile: mesh_pb2.DriftProfile) -> None:
    """InvalidArgument unless ``profile`` is a well-formed, bounded reference."""
    if len(profile.features) > MAX_FEATURES:
        raise InvalidArgument(
            f"drift profile has {len(profile.features)} features; at most {MAX_FEATURES}"
        )
    if profile.features and not profile.input:
        raise InvalidArgument("drift profile has features but names no input tensor")
    for sketch in [*profile.features, profile.output]:
        edges = list(sketch.edges)
        if len(edges) >= MAX_PROFILE_BINS or len(sketch.counts) > MAX_CLASSES + MAX_PROFILE_BINS:
            raise InvalidArgument(f"drift profile sketch {sketch.name!r} has too many bins")
        if not all(math.isfinite(e) for e in edges) or edges != sorted(set(edges)):
            raise InvalidArgument(
                f"drift profile sketch {sketch.name!r}: edges must be finite and increasing"
            )
        if edges and len(sketch.counts) != len(edges) + 1:
            raise InvalidArgument(
                f"drift profile sketch {sketch.name!r}: {len(edges)} edges need "
                f"{len(edges) + 1} counts, got {len(sketch.counts)}"
            )


class AdminService(mesh_pb2_grpc.AdminServicer):
    def __init__(
        self,
        *,
        registry: Registry,
        snapshot: Callable[[], Snapshot],
        hub: Hub,
        policy: Callable[[], Policy],
        events: EventLog,
        live_load: Callable[[str], LiveLoad],
        health: ModelHealth,
    ) -> None:
        self._registry = registry  # every write, and the reads a write depends on
        self._snapshot = snapshot
        self._hub = hub
        self._policy = policy
        self._events = events
        self._live_load = live_load  # the gateway's live measurements of a model's copies
        self._health = health

    async def RegisterModel(
        self, request: mesh_pb2.RegisterModelRequest, context: ServicerContext
    ) -> mesh_pb2.RegisterModelResponse:
        spec = validate_spec(request.model)
        created = await self._registry.register_model(spec)  # refused if an alias has the name
        return mesh_pb2.RegisterModelResponse(model=spec, created=created)

    async def ListModels(
        self, request: mesh_pb2.ListModelsRequest, context: ServicerContext
    ) -> mesh_pb2.ListModelsResponse:
        snapshot = self._snapshot()
        return mesh_pb2.ListModelsResponse(
            models=[snapshot.models[k] for k in sorted(snapshot.models)]
        )

    async def RemoveModel(
        self, request: mesh_pb2.RemoveModelRequest, context: ServicerContext
    ) -> mesh_pb2.RemoveModelResponse:
        if not _NAME.match(request.name):
            raise InvalidArgument(f"invalid model name {request.name!r}")
        if request.variant:  # refused while an alias points at it
            removed = await self._registry.remove_variant(request.name, request.variant)
        else:  # every version and alias, in one write
            removed = await self._registry.remove_model(request.name)
        return mesh_pb2.RemoveModelResponse(removed=removed)

    async def ListNodes(
        self, request: mesh_pb2.ListNodesRequest, context: ServicerContext
    ) -> mesh_pb2.ListNodesResponse:
        snapshot = self._snapshot()
        out = mesh_pb2.ListNodesResponse()
        for node_id in sorted(snapshot.nodes):
            node = snapshot.nodes[node_id]
            info = out.nodes.add(
                node_id=node_id,
                labels=dict(node.labels),
                direct_address=node.direct_address,
                replicas=sorted(node.replicas),
            )
            info.hardware.CopyFrom(node.hardware)
            info.copies.extend(node.copies[k] for k in sorted(node.copies))
            session = self._hub.sessions.get(node_id)
            if session is not None:
                info.telemetry.CopyFrom(session.telemetry)
        return out

    async def ListPlacements(
        self, request: mesh_pb2.ListPlacementsRequest, context: ServicerContext
    ) -> mesh_pb2.ListPlacementsResponse:
        snapshot = self._snapshot()
        return mesh_pb2.ListPlacementsResponse(
            placements=[
                snapshot.placements[k]
                for k in sorted(snapshot.placements)
                if not request.model or k[0] == request.model
            ]
        )

    async def ExplainPlacement(
        self, request: mesh_pb2.ExplainPlacementRequest, context: ServicerContext
    ) -> mesh_pb2.ExplainPlacementResponse:
        snapshot = self._snapshot()
        wanted = [
            k
            for k in sorted(snapshot.models)
            if k[0] == request.model and (not request.variant or k[1] == request.variant)
        ]
        if not wanted:
            raise NotFound(
                f"model {request.model!r}"
                + (f" variant {request.variant!r}" if request.variant else "")
                + " is not registered"
            )
        out = mesh_pb2.ExplainPlacementResponse()
        for key in wanted:
            rule, desired, placed, verdicts = explain_variant(snapshot, key, self._policy())
            variant = out.variants.add(
                model=key[0],
                variant=key[1],
                desired_copies=desired,
                placed=placed,
                policy=rule.name,
            )
            for v in verdicts:
                variant.nodes.add(
                    node_id=v.node_id,
                    feasible=v.feasible,
                    filtered_by=v.filtered_by,
                    reason=v.reason,
                    score=v.score,
                    scores=v.scores,
                    selected=v.selected,
                )
        return out

    async def ApplyPolicy(
        self, request: mesh_pb2.ApplyPolicyRequest, context: ServicerContext
    ) -> mesh_pb2.ApplyPolicyResponse:
        try:
            policy = parse_policy(request.yaml)
        except PolicyError as exc:
            raise InvalidArgument(f"invalid policy: {exc}") from None
        if request.dry_run:
            return mesh_pb2.ApplyPolicyResponse(name=policy.name)
        revision = await self._registry.apply_policy(request.yaml)  # a blind replace: no race
        self._events.record("policy", message=f"policy {policy.name!r} applied (rev {revision})")
        return mesh_pb2.ApplyPolicyResponse(name=policy.name, revision=revision)

    async def GetPolicy(
        self, request: mesh_pb2.GetPolicyRequest, context: ServicerContext
    ) -> mesh_pb2.GetPolicyResponse:
        stored = await self._registry.policy()
        if stored is None:
            return mesh_pb2.GetPolicyResponse()
        return mesh_pb2.GetPolicyResponse(yaml=stored[0], revision=stored[1])

    async def ListEvents(
        self, request: mesh_pb2.ListEventsRequest, context: ServicerContext
    ) -> mesh_pb2.ListEventsResponse:
        events = await self._events.list(request.limit, request.kind, request.model)
        return mesh_pb2.ListEventsResponse(events=events)

    async def DrainNode(
        self, request: mesh_pb2.DrainNodeRequest, context: ServicerContext
    ) -> mesh_pb2.DrainNodeResponse:
        node_id = request.node_id
        if request.undrain:
            await self._registry.undrain(node_id)
            self._events.record("drain", node_id=node_id, message="undrained")
            return mesh_pb2.DrainNodeResponse(draining=False)
        if node_id not in self._snapshot().nodes:
            raise NotFound(f"node {node_id!r} is not linked to the mesh")
        await self._registry.drain(node_id)  # (a node that left meanwhile is drained if it returns)
        self._events.record("drain", node_id=node_id, message="draining: no new copies or queries")
        return mesh_pb2.DrainNodeResponse(draining=True)

    async def ExplainSwitching(
        self, request: mesh_pb2.ExplainSwitchingRequest, context: ServicerContext
    ) -> mesh_pb2.ExplainSwitchingResponse:
        for name, value in (("slo_ms", request.slo_ms), ("min_accuracy", request.min_accuracy)):
            if not (math.isfinite(value) and value >= 0):
                raise InvalidArgument(f"{name} must be a finite number >= 0, got {value}")
        return explain_switching(
            self._snapshot(),
            request.model,
            request.slo_ms,
            request.min_accuracy,
            linked=self._hub.sessions,
            live=self._live_load(request.model),
        )

    def _alias_status(self, model: str, alias: mesh_pb2.Alias) -> mesh_pb2.AliasStatus:
        """What ``alias`` serves now on this replica's view (as its gateway routes)."""
        return alias_state(self._snapshot(), model, alias, self._hub.sessions)

    async def Feedback(
        self, request: mesh_pb2.FeedbackRequest, context: ServicerContext
    ) -> mesh_pb2.FeedbackResponse:
        """Send outcomes to every linked node serving the model: the node that logged the
        prediction joins it (request ids are unique; the others ignore it)."""
        if not request.model:
            raise InvalidArgument("feedback needs the model name")
        if not request.items:
            raise InvalidArgument("feedback has no items")
        if len(request.items) > MAX_FEEDBACK_ITEMS:
            raise InvalidArgument(
                f"{len(request.items)} feedback items; send at most {MAX_FEEDBACK_ITEMS} per call"
            )
        for item in request.items:
            if not item.request_id:
                raise InvalidArgument("a feedback item has an empty request_id")
            if item.WhichOneof("truth") is None:
                raise InvalidArgument(f"feedback for {item.request_id!r} carries no label or value")
            if item.WhichOneof("truth") == "value" and not math.isfinite(item.value):
                raise InvalidArgument(f"feedback for {item.request_id!r}: value is not finite")
        if not self._snapshot().variants(request.model):
            raise NotFound(f"unknown model {request.model!r}")
        message = mesh_pb2.ControlMessage(
            feedback=mesh_pb2.FeedbackBatch(model=request.model, items=request.items)
        )
        sent = 0
        for session in list(self._hub.sessions.values()):
            if any(model == request.model for model, _ in session.copies):
                try:
                    session.send(message)
                    sent += 1
                except ResourceExhausted:  # a backed-up stream: the others still get it
                    continue
        if not sent:
            raise Unavailable(f"no node serving {request.model!r} is linked to this replica; retry")
        return mesh_pb2.FeedbackResponse(accepted=len(request.items), nodes=sent)

    async def ModelHealth(
        self, request: mesh_pb2.ModelHealthRequest, context: ServicerContext
    ) -> mesh_pb2.ModelHealthResponse:
        variants = self._snapshot().variants(request.model)
        if not variants:
            raise NotFound(f"unknown model {request.model!r}")
        totals = feedback_totals((s.telemetry for s in self._hub.sessions.values()), request.model)
        out = mesh_pb2.ModelHealthResponse()
        for spec in sorted(variants, key=lambda v: v.variant):
            key = (spec.name, spec.variant)
            health = out.variants.add()
            health.CopyFrom(
                totals.get(key)
                or mesh_pb2.VariantHealth(variant=spec.variant, accuracy=-1, mean_abs_error=-1)
            )
            health.registered_accuracy = spec.accuracy
            self._health.report(key, health)
        return out

    async def SetDriftProfile(
        self, request: mesh_pb2.SetDriftProfileRequest, context: ServicerContext
    ) -> mesh_pb2.SetDriftProfileResponse:
        validate_profile(request.profile)
        variant = request.variant or "default"
        # a compare-and-swap on the stored spec: a concurrent register is never undone
        await self._registry.set_drift_profile(request.model, variant, request.profile)
        return mesh_pb2.SetDriftProfileResponse(features=len(request.profile.features))

    # -- aliases and rollouts (docs/rollout.md) ---------------------------------------------------

    async def _change_alias(
        self,
        model: str,
        alias: str,
        plan: Callable[[mesh_pb2.Alias | None, list[str]], mesh_pb2.Alias],
    ) -> tuple[mesh_pb2.Alias, mesh_pb2.Alias | None]:
        """Apply ``plan(current alias, registered versions)`` as one compare-and-swap
        (:meth:`~meshserve.controlplane.registry.Registry.change_alias`, retried on a lost
        race); returns (new, old). ``plan`` returning the current record itself writes nothing."""
        for name, value in (("model", model), ("alias", alias)):
            if not _NAME.match(value):
                raise InvalidArgument(
                    f"invalid {name} name {value!r}: 1-128 of [A-Za-z0-9_.-], starting with a "
                    "letter or digit"
                )
        new, current = await self._registry.change_alias(model, alias, plan)
        if new is not current:
            await self._until_seen(model, alias, new)
        return new, current

    async def _until_seen(self, model: str, alias: str, record: mesh_pb2.Alias) -> None:
        """Wait (at most 2 s) until this replica's view holds ``record``: once a rollout or a
        rollback returns, this replica's gateway routes by it (others follow their watch)."""
        deadline = time.monotonic() + 2.0
        while self._snapshot().aliases.get((model, alias)) != record:
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.005)

    async def Rollout(
        self, request: mesh_pb2.RolloutRequest, context: ServicerContext
    ) -> mesh_pb2.RolloutResponse:
        model, alias, version = request.model, request.alias or DEFAULT_ALIAS, request.version
        if not version:
            raise InvalidArgument("rollout needs the version (a registered variant) to roll out")
        percent = request.canary_percent

        def plan(current: mesh_pb2.Alias | None, registered: list[str]) -> mesh_pb2.Alias:
            if current is not None:  # what answers now keeps answering while VERSION warms
                serving = self._alias_status(model, current).serving
            else:  # a new `live` alias takes over the queries that name no version
                serving = (
                    serving_version(self._snapshot(), model, "", self._hub.sessions)
                    if alias == DEFAULT_ALIAS
                    else ""
                )
            return plan_rollout(
                current,
                model=model,
                alias=alias,
                version=version,
                canary_percent=percent,
                registered=registered,
                serving_now=serving,
                now_ms=int(time.time() * 1000),
            )

        new, old = await self._change_alias(model, alias, plan)
        if new is not old:
            if new.canary_version and 0 < percent < 100:
                text = f"{alias}: canary {version} at {percent:g}% (stable {new.version})"
            else:
                was = old.version if old is not None else "unset"
                text = f"{alias} -> {version} (was {was})"
                if new.previous_version:
                    text += f"; {new.previous_version} serves until {version} is warm"
            self._events.record("rollout", model=model, variant=version, message=text)
        return mesh_pb2.RolloutResponse(status=self._alias_status(model, new))

    async def Rollback(
        self, request: mesh_pb2.RollbackRequest, context: ServicerContext
    ) -> mesh_pb2.RollbackResponse:
        model, alias = request.model, request.alias or DEFAULT_ALIAS

        def plan(current: mesh_pb2.Alias | None, registered: list[str]) -> mesh_pb2.Alias:
            return plan_rollback(
                current,
                model=model,
                alias=alias,
                registered=registered,
                now_ms=int(time.time() * 1000),
            )

        new, old = await self._change_alias(model, alias, plan)
        assert old is not None  # plan_rollback refuses a missing alias
        if old.canary_version:
            text = f"{alias}: canary {old.canary_version} dropped; {new.version} takes every query"
        else:
            text = f"{alias} -> {new.version} (rolled back from {old.version})"
        self._events.record("rollback", model=model, variant=new.version, message=text)
        return mesh_pb2.RollbackResponse(status=self._alias_status(model, new))

    async def ListAliases(
        self, request: mesh_pb2.ListAliasesRequest, context: ServicerContext
    ) -> mesh_pb2.ListAliasesResponse:
        if not _NAME.match(request.model):
            raise InvalidArgument(f"invalid model name {request.model!r}")
        aliases = await self._registry.aliases(request.model)
        if not aliases and not self._snapshot().variants(request.model):
            raise NotFound(f"unknown model {request.model!r}")
        return mesh_pb2.ListAliasesResponse(
            aliases=[self._alias_status(request.model, a) for a in aliases]
        )
