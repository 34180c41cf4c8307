"""The Admin API (used by meshctl): models, nodes, placements and their explanations, the
placement policy, draining, and the decision events.

Every write is validated here first, so nothing malformed ever reaches etcd.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Callable
from typing import Any

from controlplane import keys
from controlplane.events import EventLog
from controlplane.gateway import Gateway
from controlplane.health import ModelHealth, feedback_totals
from controlplane.hub import Hub
from controlplane.policies.config import Policy, PolicyError, parse_policy
from controlplane.scheduler import explain_variant
from controlplane.snapshot import Snapshot
from protos import mesh_pb2, mesh_pb2_grpc
from protos.sketches import MAX_CLASSES, MAX_FEATURES
from protos.status import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServicerContext,
    Unavailable,
)

__all__ = ["AdminService", "validate_profile", "validate_spec"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_OIP_TYPES = {
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
}
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
        if tensor.datatype not in _OIP_TYPES:
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
        etcd: Any,
        snapshot: Callable[[], Snapshot],
        hub: Hub,
        policy: Callable[[], Policy],
        events: EventLog,
        gateway: Gateway,
        health: ModelHealth,
    ) -> None:
        self._etcd = etcd
        self._snapshot = snapshot
        self._hub = hub
        self._policy = policy
        self._events = events
        self._gateway = gateway
        self._health = health

    async def RegisterModel(
        self, request: mesh_pb2.RegisterModelRequest, context: ServicerContext
    ) -> mesh_pb2.RegisterModelResponse:
        spec = validate_spec(request.model)
        key = keys.model_key(spec.name, spec.variant).encode()
        previous = await self._etcd.put(key, keys.encode(spec), prev_kv=True)
        created = not getattr(previous, "prev_kv", None)
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
        if request.variant:
            deleted = await self._etcd.delete(
                keys.model_key(request.name, request.variant).encode()
            )
            removed = 1 if deleted else 0
        else:
            result = await self._etcd.delete_prefix(f"{keys.MODELS}{request.name}/".encode())
            removed = int(getattr(result, "deleted", 0))
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
        result = await self._etcd.put(keys.POLICY.encode(), request.yaml.encode())
        revision = int(result.header.revision)
        self._events.record("policy", message=f"policy {policy.name!r} applied (rev {revision})")
        return mesh_pb2.ApplyPolicyResponse(name=policy.name, revision=revision)

    async def GetPolicy(
        self, request: mesh_pb2.GetPolicyRequest, context: ServicerContext
    ) -> mesh_pb2.GetPolicyResponse:
        kv = await self._etcd.get(keys.POLICY.encode())
        if kv is None:
            return mesh_pb2.GetPolicyResponse()
        return mesh_pb2.GetPolicyResponse(
            yaml=bytes(kv.value).decode("utf-8", "replace"), revision=int(kv.mod_revision)
        )

    async def ListEvents(
        self, request: mesh_pb2.ListEventsRequest, context: ServicerContext
    ) -> mesh_pb2.ListEventsResponse:
        events = await self._events.list(request.limit, request.kind, request.model)
        return mesh_pb2.ListEventsResponse(events=events)

    async def DrainNode(
        self, request: mesh_pb2.DrainNodeRequest, context: ServicerContext
    ) -> mesh_pb2.DrainNodeResponse:
        node_id = request.node_id
        key = f"{keys.DRAINING}{node_id}".encode()
        if request.undrain:
            await self._etcd.delete(key)
            self._events.record("drain", node_id=node_id, message="undrained")
            return mesh_pb2.DrainNodeResponse(draining=False)
        if node_id not in self._snapshot().nodes:
            raise NotFound(f"node {node_id!r} is not linked to the mesh")
        await self._etcd.put(key, b"")
        self._events.record("drain", node_id=node_id, message="draining: no new copies or queries")
        return mesh_pb2.DrainNodeResponse(draining=True)

    async def ExplainSwitching(
        self, request: mesh_pb2.ExplainSwitchingRequest, context: ServicerContext
    ) -> mesh_pb2.ExplainSwitchingResponse:
        for name, value in (("slo_ms", request.slo_ms), ("min_accuracy", request.min_accuracy)):
            if not (math.isfinite(value) and value >= 0):
                raise InvalidArgument(f"{name} must be a finite number >= 0, got {value}")
        return self._gateway.explain_switching(request.model, request.slo_ms, request.min_accuracy)

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
        key = keys.model_key(request.model, variant).encode()
        current = self._snapshot().models.get((request.model, variant))
        if current is None:
            raise NotFound(f"model {request.model!r} has no variant {variant!r}")
        spec = mesh_pb2.ModelSpec()
        spec.CopyFrom(current)
        spec.drift_reference.CopyFrom(request.profile)
        await self._etcd.put(key, keys.encode(spec))
        return mesh_pb2.SetDriftProfileResponse(features=len(request.profile.features))
