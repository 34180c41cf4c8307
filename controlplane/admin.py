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
from controlplane.hub import Hub
from controlplane.policies.config import Policy, PolicyError, parse_policy
from controlplane.scheduler import explain_variant
from controlplane.snapshot import Snapshot
from protos import mesh_pb2, mesh_pb2_grpc
from protos.status import InvalidArgument, NotFound, ServicerContext

__all__ = ["AdminService", "validate_spec"]

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
    return out


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
    ) -> None:
        self._etcd = etcd
        self._snapshot = snapshot
        self._hub = hub
        self._policy = policy
        self._events = events
        self._gateway = gateway

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
