"""The Admin API (used by meshctl): models, nodes, placements and their explanations, the
placement policy, draining, feedback and health, aliases and rollouts, and the decision events.

Contract: every method reads as authorize → validate → registry call → event → answer.

* Authorization is not here: :class:`~meshserve.controlplane.auth.Guard` wraps this servicer
  (admin token, mTLS), and :func:`~meshserve.common.errors.map_errors` turns the typed errors
  raised below into gRPC status codes.
* Every request is validated first (:mod:`meshserve.controlplane.validation`, pure), so nothing
  malformed ever reaches etcd or a node; checks against the mesh's state (NotFound) follow, on
  this replica's snapshot.
* Every write goes through the registry seam (:class:`~meshserve.controlplane.registry.Registry`);
  racing writes are its transactions, never a read-then-write here.
* A change users should see later is recorded in the event log; answers are built by pure
  functions of the snapshot and the nodes' telemetry (``placement/explain.py``,
  ``observe/telemetry.py``, ``dataplane/resolve.py``, the helpers at the end of this module).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from meshserve.common.errors import NotFound, ResourceExhausted, ServicerContext, Unavailable
from meshserve.common.policy.config import Policy
from meshserve.common.routing.resolve import (
    LiveLoad,
    alias_state,
    explain_switching,
    serving_version,
)
from meshserve.common.routing.rollout import (
    DEFAULT_ALIAS,
    plan_rollback,
    plan_rollout,
    rollback_message,
    rollout_message,
    version_of,
)
from meshserve.controlplane import keys
from meshserve.controlplane.link.hub import Hub
from meshserve.controlplane.observe.events import EventLog
from meshserve.controlplane.observe.health import ModelHealth
from meshserve.controlplane.observe.telemetry import model_health, node_list
from meshserve.controlplane.observe.webhook import redact_policy, restore_policy
from meshserve.controlplane.placement.explain import explain_placement
from meshserve.controlplane.registry import Registry
from meshserve.controlplane.snapshot import Snapshot
from meshserve.controlplane.validation import (
    check_model_name,
    validate_alias_change,
    validate_feedback,
    validate_node_labels,
    validate_policy,
    validate_profile,
    validate_rollout,
    validate_spec,
    validate_switching,
)
from meshserve.protos import mesh_pb2, mesh_pb2_grpc

__all__ = ["AdminService"]

_log = logging.getLogger("meshserve.controlplane.admin")
#: How long a rollout or rollback waits for this replica's view to hold the alias it wrote.
_SEEN_WITHIN_S = 5.0


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
        # A new registration: failure records made under an earlier one no longer apply.
        spec.registered_unix_ms = int(time.time() * 1000)
        spec.ClearField("retry_requests")
        before = self._snapshot()
        first = not before.variants(spec.name) and (spec.name, DEFAULT_ALIAS) not in before.aliases
        # refused if an alias has the name; the model's first version becomes `live`
        created = await self._registry.register_model(spec)
        if created and first:
            version = version_of(spec)
            text = f"{DEFAULT_ALIAS} -> {version} (the model's first version)"
            self._events.record("rollout", model=spec.name, variant=version, message=text)
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
        check_model_name(request.name)
        if request.variant:  # refused while an alias points at it
            removed = await self._registry.remove_variant(request.name, request.variant)
        else:  # every version and alias, in one write
            removed = await self._registry.remove_model(request.name)
        return mesh_pb2.RemoveModelResponse(removed=removed)

    async def ListNodes(
        self, request: mesh_pb2.ListNodesRequest, context: ServicerContext
    ) -> mesh_pb2.ListNodesResponse:
        return node_list(self._snapshot(), self._hub.sessions)

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
        return explain_placement(self._snapshot(), self._policy(), request.model, request.variant)

    async def ApplyPolicy(
        self, request: mesh_pb2.ApplyPolicyRequest, context: ServicerContext
    ) -> mesh_pb2.ApplyPolicyResponse:
        stored = await self._registry.policy()  # its webhook URL, if the text names it redacted
        text = restore_policy(request.yaml, stored[0] if stored is not None else None)
        policy = validate_policy(text)
        if request.dry_run:
            return mesh_pb2.ApplyPolicyResponse(name=policy.name)
        revision = await self._registry.apply_policy(text)  # a blind replace: no race
        self._events.record("policy", message=f"policy {policy.name!r} applied (rev {revision})")
        return mesh_pb2.ApplyPolicyResponse(name=policy.name, revision=revision)

    async def GetPolicy(
        self, request: mesh_pb2.GetPolicyRequest, context: ServicerContext
    ) -> mesh_pb2.GetPolicyResponse:
        stored = await self._registry.policy()
        if stored is None:
            return mesh_pb2.GetPolicyResponse()
        return mesh_pb2.GetPolicyResponse(yaml=redact_policy(stored[0]), revision=stored[1])

    async def ListEvents(
        self, request: mesh_pb2.ListEventsRequest, context: ServicerContext
    ) -> mesh_pb2.ListEventsResponse:
        events = await self._events.list(request.limit, request.kind, request.model)
        return mesh_pb2.ListEventsResponse(events=events)

    async def RetryPlacements(
        self, request: mesh_pb2.RetryPlacementsRequest, context: ServicerContext
    ) -> mesh_pb2.RetryPlacementsResponse:
        check_model_name(request.model)
        before = self._snapshot()
        variants = await self._registry.request_retry(
            request.model, request.variant, request.node_id
        )
        out = mesh_pb2.RetryPlacementsResponse()
        for variant in variants:
            placement = before.placements.get((request.model, variant))
            if placement is None:
                continue
            for node_id in sorted(placement.failed):
                if request.node_id and node_id != request.node_id:
                    continue
                record = placement.failures.get(node_id)
                out.retried.add(
                    variant=variant,
                    node_id=node_id,
                    reason=placement.failed[node_id],
                    permanent=record is not None and record.permanent,
                )
            where = f"node {request.node_id}" if request.node_id else "every node"
            self._events.record(
                "placement",
                model=request.model,
                variant=variant,
                node_id=request.node_id,
                message=f"manual retry on {where}: failure records cleared",
            )
        return out

    async def ConfirmUnloads(
        self, request: mesh_pb2.ConfirmUnloadsRequest, context: ServicerContext
    ) -> mesh_pb2.ConfirmUnloadsResponse:
        floor = self._hub.floor
        held, unloads = floor.holding(), floor.unloads  # before the watch can release it
        value = await self._registry.confirm_unloads()
        self._hub.confirm_unloads(value)  # here at once; every replica through its watch
        replica = self._hub.replica_id
        count = keys.unload_confirmations(value)
        what = f"{unloads} held unloads released" if held else "nothing held"
        self._events.record(
            "unload_floor", message=f"confirmed by the operator (#{count}): {what} on {replica}"
        )
        return mesh_pb2.ConfirmUnloadsResponse(
            held=held, released=unloads if held else 0, replica_id=replica, confirmation=count
        )

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

    async def LabelNode(
        self, request: mesh_pb2.LabelNodeRequest, context: ServicerContext
    ) -> mesh_pb2.LabelNodeResponse:
        """Set or remove a node's admin-side labels, the ones placement matches (a node that is
        not linked yet may be labelled before it joins)."""
        validate_node_labels(request)
        labels = await self._registry.label_node(
            request.node_id, dict(request.set), list(request.remove)
        )
        text = ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "none"
        self._events.record("label", node_id=request.node_id, message=f"admin labels: {text}")
        return mesh_pb2.LabelNodeResponse(labels=labels)

    async def ExplainSwitching(
        self, request: mesh_pb2.ExplainSwitchingRequest, context: ServicerContext
    ) -> mesh_pb2.ExplainSwitchingResponse:
        validate_switching(request.slo_ms, request.min_accuracy)
        return explain_switching(
            self._snapshot(),
            request.model,
            request.slo_ms,
            request.min_accuracy,
            linked=self._hub.sessions,
            live=self._live_load(request.model),
            version=request.version,
        )

    def _alias_status(self, model: str, alias: mesh_pb2.Alias) -> mesh_pb2.AliasStatus:
        """What ``alias`` serves now on this replica's view (as its gateway routes)."""
        return alias_state(self._snapshot(), model, alias, self._hub.sessions)

    async def Feedback(
        self, request: mesh_pb2.FeedbackRequest, context: ServicerContext
    ) -> mesh_pb2.FeedbackResponse:
        """Send outcomes to every linked node serving the model: the node that logged the
        prediction joins it (request ids are unique per tenant; the others ignore it). A
        tenant's feedback names the tenant (the guard sets it from the API key): it joins only
        that tenant's predictions."""
        validate_feedback(request)
        if not self._snapshot().variants(request.model):
            raise NotFound(f"unknown model {request.model!r}")
        message = mesh_pb2.ControlMessage(
            feedback=mesh_pb2.FeedbackBatch(
                model=request.model, items=request.items, tenant=request.tenant
            )
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
        out = model_health(request.model, variants, self._hub.sessions)
        for health in out.variants:  # the accuracy gauges follow what was last asked
            self._health.report((request.model, health.variant), health)
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
        new, current = await self._registry.change_alias(model, alias, plan)
        if new is not current:
            await self._until_seen(model, alias, new)
        return new, current

    async def _until_seen(self, model: str, alias: str, record: mesh_pb2.Alias) -> None:
        """Wait (at most :data:`_SEEN_WITHIN_S`) until this replica's view holds ``record``: once
        a rollout or a rollback returns, this replica's gateway routes by it (others follow their
        watch). A view that lags longer (etcd or this process overloaded) is logged."""
        deadline = time.monotonic() + _SEEN_WITHIN_S
        while self._snapshot().aliases.get((model, alias)) != record:
            if time.monotonic() > deadline:
                _log.warning(
                    "alias %s/%s written but not in this replica's view after %.0f s; "
                    "returning anyway (the gateway follows when its watch delivers it)",
                    model,
                    alias,
                    _SEEN_WITHIN_S,
                )
                return
            await asyncio.sleep(0.005)

    async def Rollout(
        self, request: mesh_pb2.RolloutRequest, context: ServicerContext
    ) -> mesh_pb2.RolloutResponse:
        model, alias, version = request.model, request.alias or DEFAULT_ALIAS, request.version
        validate_rollout(model, alias, version)
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
                variants=[s.variant for s in self._snapshot().variants(model)],
            )

        new, old = await self._change_alias(model, alias, plan)
        if new is not old:
            text = rollout_message(alias, version, percent, new, old)
            self._events.record("rollout", model=model, variant=version, message=text)
        return mesh_pb2.RolloutResponse(status=self._alias_status(model, new))

    async def Rollback(
        self, request: mesh_pb2.RollbackRequest, context: ServicerContext
    ) -> mesh_pb2.RollbackResponse:
        model, alias = request.model, request.alias or DEFAULT_ALIAS
        validate_alias_change(model, alias)

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
        text = rollback_message(alias, new, old)
        self._events.record("rollback", model=model, variant=new.version, message=text)
        return mesh_pb2.RollbackResponse(status=self._alias_status(model, new))

    async def ListAliases(
        self, request: mesh_pb2.ListAliasesRequest, context: ServicerContext
    ) -> mesh_pb2.ListAliasesResponse:
        check_model_name(request.model)
        aliases = await self._registry.aliases(request.model)
        if not aliases and not self._snapshot().variants(request.model):
            raise NotFound(f"unknown model {request.model!r}")
        return mesh_pb2.ListAliasesResponse(
            aliases=[self._alias_status(request.model, a) for a in aliases]
        )
