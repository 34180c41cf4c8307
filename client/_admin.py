"""AdminClient: a thin blocking wrapper over the Admin API (used by meshctl and tests)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import grpc

from meshserve.common.errors import StatusError, from_code
from meshserve.common.security import TLSFiles, sync_channel
from meshserve.protos import mesh_pb2, mesh_pb2_grpc

__all__ = ["RETRIABLE", "AdminClient", "feedback_items"]

#: Statuses :meth:`AdminClient.follow_events` waits out (the control plane is restarting, a
#: leader is changing, the network is cut): everything else ends the follow.
RETRIABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def feedback_items(outcomes: Mapping[str, int | str | float]) -> list[mesh_pb2.FeedbackItem]:
    """Feedback items from ``{request_id: truth}``: an int (or bool) is a class label, a str a
    text label, a float a value."""
    items = []
    for request_id, truth in outcomes.items():
        item = mesh_pb2.FeedbackItem(request_id=request_id)
        if isinstance(truth, str):
            item.text_label = truth
        elif isinstance(truth, float):
            item.value = truth
        else:
            item.label = int(truth)
        items.append(item)
    return items


class AdminClient:
    def __init__(
        self,
        target: str,
        *,
        timeout: float = 10.0,
        tls: TLSFiles | None = None,
        token: str | None = None,
    ) -> None:
        """``tls``: dial with TLS (see :class:`meshserve.common.security.TLSFiles`). ``token``: the
        admin
        token, sent as ``authorization: Bearer <token>`` (only over TLS or to loopback)."""
        self._dial = (target, tls, token)
        self._channel = sync_channel(target, tls, token)
        self._stub = mesh_pb2_grpc.AdminStub(self._channel)
        self._timeout = timeout

    def _redial(self) -> None:
        """A fresh channel (a channel that failed backs off reconnecting on its own schedule,
        up to minutes; a new one dials at once)."""
        self._channel.close()
        self._channel = sync_channel(*self._dial)
        self._stub = mesh_pb2_grpc.AdminStub(self._channel)

    def _call(self, method: str, request: object) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
            raise from_code(code.value[0], exc.details() or code.name) from None  # type: ignore[attr-defined]

    def register_model(
        self,
        name: str,
        artifact_uri: str,
        sha256: str,
        *,
        variant: str = "",
        version: str = "",
        copies: int = 1,
        node_selector: Mapping[str, str] | None = None,
        size_bytes: int = 0,
        accuracy: float = 0.0,
        serving: mesh_pb2.ServingConfig | None = None,
        autoscaling: mesh_pb2.Autoscaling | None = None,
        slo_ms: float = 0.0,
        execution_providers: Sequence[str] = (),
    ) -> mesh_pb2.RegisterModelResponse:
        spec = mesh_pb2.ModelSpec(
            name=name,
            variant=variant,
            version=version,
            artifact_uri=artifact_uri,
            sha256=sha256,
            copies=copies,
            node_selector=node_selector or {},
            size_bytes=size_bytes,
            accuracy=accuracy,
            serving=serving,
            autoscaling=autoscaling,
            slo_ms=slo_ms,
            execution_providers=list(execution_providers),
        )
        return self.register_spec(spec)

    def register_spec(self, spec: mesh_pb2.ModelSpec) -> mesh_pb2.RegisterModelResponse:
        """Register (or update) a complete ModelSpec as is."""
        out = self._call("RegisterModel", mesh_pb2.RegisterModelRequest(model=spec))
        assert isinstance(out, mesh_pb2.RegisterModelResponse)
        return out

    def list_models(self) -> list[mesh_pb2.ModelSpec]:
        out = self._call("ListModels", mesh_pb2.ListModelsRequest())
        assert isinstance(out, mesh_pb2.ListModelsResponse)
        return list(out.models)

    def remove_model(self, name: str, variant: str = "") -> int:
        out = self._call("RemoveModel", mesh_pb2.RemoveModelRequest(name=name, variant=variant))
        assert isinstance(out, mesh_pb2.RemoveModelResponse)
        return int(out.removed)

    def list_nodes(self) -> list[mesh_pb2.NodeInfo]:
        out = self._call("ListNodes", mesh_pb2.ListNodesRequest())
        assert isinstance(out, mesh_pb2.ListNodesResponse)
        return list(out.nodes)

    def list_placements(self, model: str = "") -> list[mesh_pb2.Placement]:
        out = self._call("ListPlacements", mesh_pb2.ListPlacementsRequest(model=model))
        assert isinstance(out, mesh_pb2.ListPlacementsResponse)
        return list(out.placements)

    def explain_placement(self, model: str, variant: str = "") -> list[mesh_pb2.VariantExplanation]:
        request = mesh_pb2.ExplainPlacementRequest(model=model, variant=variant)
        out = self._call("ExplainPlacement", request)
        assert isinstance(out, mesh_pb2.ExplainPlacementResponse)
        return list(out.variants)

    def explain_switching(
        self, model: str, *, slo_ms: float = 0.0, min_accuracy: float = 0.0, version: str = ""
    ) -> mesh_pb2.ExplainSwitchingResponse:
        """``version``: a version, alias or variant ("": what a query naming none gets)."""
        request = mesh_pb2.ExplainSwitchingRequest(
            model=model, slo_ms=slo_ms, min_accuracy=min_accuracy, version=version
        )
        out = self._call("ExplainSwitching", request)
        assert isinstance(out, mesh_pb2.ExplainSwitchingResponse)
        return out

    def apply_policy(
        self, yaml_text: str, *, dry_run: bool = False
    ) -> mesh_pb2.ApplyPolicyResponse:
        out = self._call(
            "ApplyPolicy", mesh_pb2.ApplyPolicyRequest(yaml=yaml_text, dry_run=dry_run)
        )
        assert isinstance(out, mesh_pb2.ApplyPolicyResponse)
        return out

    def get_policy(self) -> mesh_pb2.GetPolicyResponse:
        out = self._call("GetPolicy", mesh_pb2.GetPolicyRequest())
        assert isinstance(out, mesh_pb2.GetPolicyResponse)
        return out

    def list_events(self, limit: int = 50, kind: str = "", model: str = "") -> list[mesh_pb2.Event]:
        request = mesh_pb2.ListEventsRequest(limit=limit, kind=kind, model=model)
        out = self._call("ListEvents", request)
        assert isinstance(out, mesh_pb2.ListEventsResponse)
        return list(out.events)

    def follow_events(
        self,
        limit: int = 50,
        kind: str = "",
        model: str = "",
        *,
        interval_s: float = 1.0,
        max_backoff_s: float = 5.0,
        on_state: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Iterator[list[mesh_pb2.Event]]:
        """Poll the event log for as long as the caller iterates: one list per answered poll,
        the first with the newest ``limit`` events, each later one with the events recorded
        after the last one yielded (by ``seq``, oldest first; possibly empty).

        A retriable status (:data:`RETRIABLE`) is waited out: the channel is redialled with
        backoff (``interval_s`` doubling to ``max_backoff_s``, with jitter) and polling resumes
        after the last event yielded. ``on_state`` hears one line when the control plane becomes
        unreachable and one when it answers again (never one per attempt). A sequence that went
        backwards (the event log was lost) starts over from the ring as it is.

        :raises StatusError: any other status.
        """
        last: int | None = None
        delay = interval_s
        down = False
        while True:
            try:
                events = self.list_events(limit, kind, model)
            except StatusError as exc:
                if exc.code not in RETRIABLE:
                    raise
                if not down and on_state is not None:
                    on_state(
                        f"control plane unreachable ({exc.code.name}: {exc.message}); retrying"
                    )
                down = True
                sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, max_backoff_s)
                self._redial()
                continue
            if down and on_state is not None:
                on_state("control plane reachable again; following")
            down, delay = False, interval_s
            newest = max((e.seq for e in events), default=0)
            if last is not None and newest < last:
                last = 0  # the ring restarted from 1: show what it holds now
            fresh = [e for e in events if last is None or e.seq > last]
            last = max(newest, last or 0)
            yield fresh
            sleep(interval_s)

    def retry_placements(
        self, model: str, *, variant: str = "", node_id: str = ""
    ) -> list[mesh_pb2.RetriedCopy]:
        """Clear the failure records of ``model``'s copies (one variant / node, or all): the
        leader places them there again; returns the failures that were cleared."""
        request = mesh_pb2.RetryPlacementsRequest(model=model, variant=variant, node_id=node_id)
        out = self._call("RetryPlacements", request)
        assert isinstance(out, mesh_pb2.RetryPlacementsResponse)
        return list(out.retried)

    def confirm_unloads(self) -> mesh_pb2.ConfirmUnloadsResponse:
        """Confirm the mass unload the safety floor holds back: every replica releases the
        episode it holds now; the answer says what the answering replica released."""
        out = self._call("ConfirmUnloads", mesh_pb2.ConfirmUnloadsRequest())
        assert isinstance(out, mesh_pb2.ConfirmUnloadsResponse)
        return out

    def label_node(
        self,
        node_id: str,
        labels: Mapping[str, str] | None = None,
        *,
        remove: Sequence[str] = (),
    ) -> dict[str, str]:
        """Set (``labels``) or remove (``remove``) a node's admin-side labels, the ones placement
        matches; returns the node's admin labels now."""
        request = mesh_pb2.LabelNodeRequest(node_id=node_id, set=labels or {}, remove=remove)
        out = self._call("LabelNode", request)
        assert isinstance(out, mesh_pb2.LabelNodeResponse)
        return dict(out.labels)

    def drain_node(self, node_id: str, *, undrain: bool = False) -> bool:
        out = self._call("DrainNode", mesh_pb2.DrainNodeRequest(node_id=node_id, undrain=undrain))
        assert isinstance(out, mesh_pb2.DrainNodeResponse)
        return out.draining

    def feedback(
        self, model: str, outcomes: Mapping[str, int | str | float]
    ) -> mesh_pb2.FeedbackResponse:
        """True labels (int or str) or values (float) for answered queries, by request id."""
        request = mesh_pb2.FeedbackRequest(model=model, items=feedback_items(outcomes))
        out = self._call("Feedback", request)
        assert isinstance(out, mesh_pb2.FeedbackResponse)
        return out

    def model_health(self, model: str) -> list[mesh_pb2.VariantHealth]:
        out = self._call("ModelHealth", mesh_pb2.ModelHealthRequest(model=model))
        assert isinstance(out, mesh_pb2.ModelHealthResponse)
        return list(out.variants)

    def set_drift_profile(
        self, model: str, variant: str, profile: mesh_pb2.DriftProfile
    ) -> mesh_pb2.SetDriftProfileResponse:
        request = mesh_pb2.SetDriftProfileRequest(model=model, variant=variant, profile=profile)
        out = self._call("SetDriftProfile", request)
        assert isinstance(out, mesh_pb2.SetDriftProfileResponse)
        return out

    def rollout(
        self, model: str, version: str, *, alias: str = "", canary_percent: float = 0.0
    ) -> mesh_pb2.AliasStatus:
        """Point ``alias`` (default "live") at ``version``; with ``canary_percent`` in (0, 100)
        send that share of its queries to ``version`` instead (see docs/rollout.md)."""
        request = mesh_pb2.RolloutRequest(
            model=model, alias=alias, version=version, canary_percent=canary_percent
        )
        out = self._call("Rollout", request)
        assert isinstance(out, mesh_pb2.RolloutResponse)
        return out.status

    def rollback(self, model: str, *, alias: str = "") -> mesh_pb2.AliasStatus:
        """Drop the alias's canary, else point it back at its previous version."""
        out = self._call("Rollback", mesh_pb2.RollbackRequest(model=model, alias=alias))
        assert isinstance(out, mesh_pb2.RollbackResponse)
        return out.status

    def list_aliases(self, model: str) -> list[mesh_pb2.AliasStatus]:
        out = self._call("ListAliases", mesh_pb2.ListAliasesRequest(model=model))
        assert isinstance(out, mesh_pb2.ListAliasesResponse)
        return list(out.aliases)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
