"""MeshClient / AsyncMeshClient: the Python SDK of a meshserve mesh (or any OIP server).

Routing: with ``routing="direct"`` (the default) the client subscribes to the mesh's routing
feed and sends each query straight to a node that holds a copy (no gateway hop), falling back to
a gateway for what it cannot route itself (see :mod:`meshserve.client._routed` for the rules:
tunnel-only copies, a feed not ready or silent, an unknown model, every direct copy failed).
``routing="gateway"`` sends every query through the gateway at ``target`` (any OIP server).

Shared logic lives once in :class:`_Base` (request building, response decoding, error
translation) and in :mod:`meshserve.client._routed` (the routed path); the sync and async twins
differ only in how they call gRPC. Each call opens an OpenTelemetry CLIENT span
(``client ModelInfer``), with a ``client route`` child per send whose W3C trace context is the
one the node (or gateway) receives.

Errors: every failed call raises :class:`MeshError` (a
:class:`meshserve.common.errors.StatusError`) with
the server's status code and message, e.g. ``NotFound``, ``InvalidArgument``, ``Unavailable``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import numpy.typing as npt
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry import trace

from meshserve.client._admin import feedback_items
from meshserve.client._embedded import (
    EmbeddedModel,
    EmbeddedOptions,
    EmbeddedStatus,
    embedded_models,
)
from meshserve.client._retry import (
    NO_RETRY,
    RetryPolicy,
    call_async,
    call_sync,
    service_config,
    translate,
)
from meshserve.client._routed import (
    FIRST_WAIT_S,
    MODEL_INFER,
    FeedThread,
    Query,
    RoutedCore,
    Routing,
    Step,
    Transport,
    feed_targets,
    warm,
)
from meshserve.common.codec import (
    ParameterValue,
    build_request,
    decode_response_outputs,
    get_parameter,
)
from meshserve.common.errors import StatusError, Unavailable
from meshserve.common.mux import MuxChannel
from meshserve.common.params import CLIENT_ZONE
from meshserve.common.routing.feed import FeedClient
from meshserve.common.security import TLSFiles, aio_channel, sync_channel
from meshserve.common.tracing import NO_SPAN, metadata_with_context, sdk_installed
from meshserve.protos import inference_pb2, inference_pb2_grpc, mesh_pb2, mesh_pb2_grpc

if TYPE_CHECKING:
    from meshserve.client._member import Member

__all__ = [
    "NO_RETRY",
    "AsyncMeshClient",
    "InferResult",
    "MeshClient",
    "MeshError",
    "RetryPolicy",
    "channel_target",
]

_tracer = trace.get_tracer("meshserve.client")
MeshError = StatusError


class InferResult(dict[str, npt.NDArray[Any]]):
    """Outputs by name, plus the response's parameters (e.g. which node and variant answered)."""

    def __init__(
        self,
        outputs: Mapping[str, npt.NDArray[Any]],
        parameters: Mapping[str, ParameterValue],
        model_version: str,
        request_id: str = "",
    ) -> None:
        super().__init__(outputs)
        self.parameters = dict(parameters)
        self.model_version = model_version
        self.request_id = request_id  # for feedback (assigned by the node when logging)

    @property
    def node(self) -> str:
        return str(self.parameters.get("meshserve_node", ""))

    @property
    def variant(self) -> str:
        """The variant that answered (the router, this client or the gateway, may switch
        variants to meet an SLO)."""
        return str(self.parameters.get("meshserve_variant", self.model_version))

    @property
    def slo_met(self) -> bool | None:
        """Whether the answer came within the query's SLO (its ``slo_ms``, else its version's
        default), as measured by the router that sent it: the SDK (routed directly) or the
        gateway. None: no SLO."""
        value = self.parameters.get("meshserve_slo_met")
        return None if value is None else bool(value)


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def _with_routing(
    parameters: Mapping[str, ParameterValue] | None,
    slo_ms: float | None,
    min_accuracy: float | None,
    zone: str | None,
) -> Mapping[str, ParameterValue] | None:
    """``parameters`` plus the routing hints the gateway reads (unchanged when none is given)."""
    if slo_ms is None and min_accuracy is None and not zone:
        return parameters
    out = dict(parameters or {})
    if slo_ms is not None:
        out["slo_ms"] = float(slo_ms)
    if min_accuracy is not None:
        out["min_accuracy"] = float(min_accuracy)
    if zone:
        out[CLIENT_ZONE] = str(zone)
    return out


def channel_target(target: str) -> tuple[str, list[tuple[str, Any]]]:
    """The gRPC target for ``target`` ("host:port", or several comma-separated: the replicas
    of one mesh) and the channel options it needs. Several IP addresses become one channel that
    spreads calls round-robin over the live, serving ones (a replica that goes away or reports
    NOT_SERVING is skipped; the SDK's retries move a failed call to another); hostnames: the
    first is used."""
    parts = [p.strip() for p in target.split(",") if p.strip()]
    if len(parts) <= 1:
        return target, []
    hosts = [p.rsplit(":", 1)[0].strip("[]") for p in parts]
    if all(h.replace(".", "").isdigit() for h in hosts):
        return "ipv4:" + ",".join(parts), [("grpc.lb_policy_name", "round_robin")]
    if all(":" in h for h in hosts):
        return "ipv6:" + ",".join(parts), [("grpc.lb_policy_name", "round_robin")]
    return parts[0], []


class _Base:
    def __init__(
        self,
        target: str,
        *,
        timeout: float,
        max_message_bytes: int,
        retry: RetryPolicy | None = None,
        tls: TLSFiles | None = None,
        api_key: str | None = None,
        routing: Routing = "direct",
        feed: str | Sequence[str] | None = None,
        zone: str = "",
        embedded: Sequence[str | EmbeddedModel] = (),
        member: EmbeddedOptions | None = None,
    ) -> None:
        if routing not in ("direct", "gateway"):
            raise ValueError(f"routing must be 'direct' or 'gateway', got {routing!r}")
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.routing: Routing = routing
        self.zone = zone
        self._target, extra = channel_target(target)
        self._node_options = _options(max_message_bytes)
        self._options = self._node_options + extra
        # gRPC retries the idempotent reads itself; over several replicas it skips the ones
        # that are not serving (a stopping replica turns NOT_SERVING before it stops)
        if config := service_config(self.retry, balanced=bool(extra)):
            self._options.append(("grpc.service_config", config))
        self._max_message_bytes = max_message_bytes
        self._tls = tls
        self._node_tls = tls.for_nodes() if tls is not None else None  # direct node channels
        self._api_key = api_key
        self._feed_targets = feed_targets(feed, target) if routing == "direct" else []
        self._member: Member | None = None
        wants = embedded_models(embedded)
        if wants:  # embedded mode: the node's runtime (and onnxruntime), imported only now
            from meshserve.client._member import Member

            self._member = Member(
                seeds=feed_targets(feed, target),
                wants=wants,
                options=member or EmbeddedOptions(),
                tls=tls,
                max_message_bytes=max_message_bytes,
            )
            self._member.start()

    def _embedded(self, model: str) -> Member | None:
        """The member, when it runs ``model`` in this process (else None: the mesh answers)."""
        member = self._member
        return member if member is not None and model in member.wants else None

    def _embedded_infer(
        self,
        member: Member,
        model: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        outputs: Sequence[str] | None,
        version: str,
        timeout: float | None,
        slo_ms: float | None,
        min_accuracy: float | None,
        request_id: str,
    ) -> InferResult:
        """Answer in this process (:meth:`Member.infer`): the answer names the member as its
        node and the variant that ran, as a node's does."""
        result, variant, request_id = member.infer(
            model,
            inputs,
            outputs,
            version=version,
            slo_ms=slo_ms,
            min_accuracy=min_accuracy,
            request_id=request_id,
            timeout=timeout or self.timeout,
        )
        parameters = {"meshserve_node": member.member_id, "meshserve_variant": variant}
        return InferResult(result, parameters, variant, request_id)

    def embedded_status(self) -> EmbeddedStatus | None:
        """The embedded member's own report (None: no embedded models)."""
        return self._member.status() if self._member is not None else None

    def _feed_client(self) -> FeedClient:
        return FeedClient(self._feed_targets, tls=self._tls, api_key=self._api_key)

    def _request(
        self,
        model: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        outputs: Sequence[str] | None,
        version: str,
        parameters: Mapping[str, ParameterValue] | None,
        slo_ms: float | None = None,
        min_accuracy: float | None = None,
        zone: str | None = None,
        request_id: str = "",
    ) -> inference_pb2.ModelInferRequest:
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        parameters = _with_routing(parameters, slo_ms, min_accuracy, zone or self.zone)
        return build_request(
            model,
            arrays,
            outputs=outputs,
            version=version,
            parameters=parameters,
            request_id=request_id,
        )

    @staticmethod
    def _feedback_request(
        model: str, outcomes: Mapping[str, int | str | float]
    ) -> mesh_pb2.FeedbackRequest:
        return mesh_pb2.FeedbackRequest(model=model, items=feedback_items(outcomes))

    @staticmethod
    def _span(model: str) -> Any:
        if not sdk_installed():  # the API's no-op span only carries the current context on
            return NO_SPAN
        return _tracer.start_as_current_span(
            "client ModelInfer", kind=trace.SpanKind.CLIENT, attributes={"meshserve.model": model}
        )

    @staticmethod
    def _result(response: inference_pb2.ModelInferResponse) -> InferResult:
        params = {k: get_parameter(v) for k, v in response.parameters.items()}
        return InferResult(
            decode_response_outputs(response), params, response.model_version, response.id
        )


_INFER_DOC = """``slo_ms``: latency budget; the router (this client, or the gateway) answers with
        the most accurate variant it predicts within it. ``min_accuracy``: never a variant below
        this accuracy. ``zone``: the caller's zone (default: the client's ``zone``); copies on
        nodes labelled ``zone=<it>`` are preferred (any other copy answers when none there
        can). ``request_id``: the OIP request id (for :meth:`feedback`; a node logging
        predictions assigns one when it is empty, see ``InferResult.request_id``)."""


class MeshClient(_Base):
    """Blocking client. ``with MeshClient("127.0.0.1:8001") as c: c.infer("m", {"x": arr})``."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 10.0,
        max_message_bytes: int = 64 << 20,
        tls: TLSFiles | None = None,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
        routing: Routing = "direct",
        feed: str | Sequence[str] | None = None,
        zone: str = "",
        embedded: Sequence[str | EmbeddedModel] = (),
        member: EmbeddedOptions | None = None,
    ):
        """``target``: the mesh's gateway: one replica, or several comma-separated (calls spread
        over the live ones). ``routing``: ``"direct"`` (default) routes each query itself from
        the routing feed of ``feed`` (replica addresses, comma-separated or a list; default the
        ``target`` list) and sends it straight to a node, over one channel per node (unary
        ``ModelInfer``); it falls back to the gateway for tunnel-only copies, while the feed is
        not ready (the first query waits for it at most a second) or silent, for a model the
        feed does not know yet, and when every direct copy failed. ``"gateway"``: every query
        goes through ``target`` (any OIP server). The feed runs on a background thread, started
        by the first query and stopped by :meth:`close`. ``zone``: the zone this client runs
        in (copies there are preferred; a query's ``zone=`` overrides it).
        ``tls``: dial with TLS (``TLSFiles(ca=..., cert=..., key=..., node_ca=...)``: ``ca``
        the control plane's certificate chains to, for the gateway and the feed; ``node_ca``
        the nodes' (default ``ca``); a client certificate where one is required). ``api_key``:
        sent as ``authorization: Bearer <key>`` on every call, only over TLS or to a loopback
        address (see :mod:`meshserve.common.security`).
        ``retry``: how :meth:`infer` retries UNAVAILABLE (and RESOURCE_EXHAUSTED with a
        retry-after hint) inside the call's deadline, and whether it hedges a slow call
        (default :class:`RetryPolicy`: up to 5 attempts, no hedging; ``NO_RETRY``: one); a
        routed attempt first tries another copy, then the gateway, before it counts as
        failed.
        ``embedded``: models (names, or :class:`EmbeddedModel` to pin a version or follow
        another alias) this process runs itself, through the same :meth:`infer` (embedded
        mode, see :mod:`meshserve.client._member`): the client joins the mesh as a member of
        kind ``embedded`` at once (``member``: its :class:`EmbeddedOptions`)."""
        super().__init__(
            target,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            retry=retry,
            tls=tls,
            api_key=api_key,
            routing=routing,
            feed=feed,
            zone=zone,
            embedded=embedded,
            member=member,
        )
        self._channel = sync_channel(self._target, tls, api_key, self._options)
        self._stub = inference_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._admin = mesh_pb2_grpc.AdminStub(self._channel)
        self._core = RoutedCore(zone=zone, lock=threading.Lock())
        self._lock = threading.Lock()
        self._feed: FeedThread | None = None
        self._warmup: concurrent.futures.Future[None] | None = None
        self._nodes: dict[str, tuple[grpc.Channel, Callable[..., Any]]] = {}
        self._hedges: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        outputs: Sequence[str] | None = None,
        *,
        version: str = "",
        parameters: Mapping[str, ParameterValue] | None = None,
        timeout: float | None = None,
        slo_ms: float | None = None,
        min_accuracy: float | None = None,
        zone: str | None = None,
        request_id: str = "",
    ) -> InferResult:
        member = self._embedded(model)
        if member is not None:
            with self._span(model):
                return self._embedded_infer(
                    member, model, inputs, outputs, version, timeout, slo_ms, min_accuracy,
                    request_id,
                )  # fmt: skip
        request = self._request(
            model, inputs, outputs, version, parameters, slo_ms, min_accuracy, zone, request_id
        )
        with self._span(model):
            started = time.monotonic()
            if self.routing == "gateway":
                metadata = metadata_with_context()

                def attempt(remaining: float) -> Any:
                    return self._stub.ModelInfer.future(
                        request, timeout=remaining, metadata=metadata
                    )

            else:
                parent = otel_context.get_current()
                self._start_feed(timeout or self.timeout)

                def attempt(remaining: float) -> Any:
                    def run() -> inference_pb2.ModelInferResponse:
                        return self._routed(request, remaining, started, parent)

                    if self.retry.hedge_after_s is None:  # inline: an already done future
                        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
                        try:
                            done.set_result(run())
                        except StatusError as exc:
                            done.set_exception(exc)
                        return done
                    return self._hedge_pool().submit(run)

            response = call_sync(attempt, self.retry, timeout or self.timeout)
        return self._result(response)

    infer.__doc__ = _INFER_DOC

    # -- the routed path -------------------------------------------------------------------

    def _start_feed(self, timeout: float) -> None:
        """Start the feed on first use; the first queries wait for its view at most
        :data:`FIRST_WAIT_S` (then route through the gateway until it comes)."""
        if self._warmup is None:
            with self._lock:
                if self._closed:
                    raise Unavailable("the client is closed")
                if self._feed is None:
                    self._feed = FeedThread(self._feed_client, self._core)
                    self._warmup = self._feed.start()
        warmup = self._warmup
        if warmup is not None and not warmup.done():
            concurrent.futures.wait([warmup], timeout=min(FIRST_WAIT_S, timeout / 2))

    def _routed(
        self,
        request: inference_pb2.ModelInferRequest,
        remaining: float,
        started: float,
        parent: Any,
    ) -> inference_pb2.ModelInferResponse:
        query = Query(self._core, request, time.monotonic() + remaining, started, parent)
        step = query.first()
        while True:
            try:
                response = self._send(query, step)
            except grpc.RpcError as exc:
                step = query.failed(step, translate(exc))
            except StatusError as exc:
                step = query.failed(step, exc)
            except BaseException:
                query.abandoned(step)
                raise
            else:
                return query.answered(step, response)

    def _send(self, query: Query, step: Step) -> inference_pb2.ModelInferResponse:
        if step.node is None:
            answer: inference_pb2.ModelInferResponse = self._stub.ModelInfer(
                query.request, timeout=step.timeout, metadata=step.metadata
            )
            return answer
        call = self._node(step.node.direct_address)
        response: inference_pb2.ModelInferResponse = call(
            query.unary_payload(step), timeout=step.timeout, metadata=step.metadata
        )
        return response

    def _node(self, address: str) -> Callable[..., Any]:
        """The unary ModelInfer of the node at ``address`` (one channel per address)."""
        entry = self._nodes.get(address)
        if entry is None:
            with self._lock:
                entry = self._nodes.get(address)
                if entry is None:
                    channel = sync_channel(
                        address, self._node_tls, self._api_key, self._node_options
                    )
                    call = channel.unary_unary(
                        MODEL_INFER,
                        request_serializer=None,
                        response_deserializer=inference_pb2.ModelInferResponse.FromString,
                    )
                    entry = self._nodes[address] = (channel, call)
        if self._core.prune_due():
            with self._lock:
                if self._core.prune_due():
                    for gone in self._core.stale_addresses(list(self._nodes)):
                        if gone != address:
                            self._nodes.pop(gone)[0].close()
        return entry[1]

    def _hedge_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._hedges is None:
                self._hedges = concurrent.futures.ThreadPoolExecutor(
                    max_workers=16, thread_name_prefix="meshserve-hedge"
                )
            return self._hedges

    # -- the rest goes through the gateway -------------------------------------------------

    def model_ready(self, model: str, version: str = "", *, timeout: float | None = None) -> bool:
        try:
            response = self._stub.ModelReady(
                inference_pb2.ModelReadyRequest(name=model, version=version),
                timeout=timeout or self.timeout,
            )
        except grpc.RpcError as exc:
            raise translate(exc) from None
        return bool(response.ready)

    def model_metadata(
        self, model: str, version: str = "", *, timeout: float | None = None
    ) -> inference_pb2.ModelMetadataResponse:
        try:
            response: inference_pb2.ModelMetadataResponse = self._stub.ModelMetadata(
                inference_pb2.ModelMetadataRequest(name=model, version=version),
                timeout=timeout or self.timeout,
            )
        except grpc.RpcError as exc:
            raise translate(exc) from None
        return response

    def feedback(
        self,
        model: str,
        outcomes: Mapping[str, int | str | float],
        *,
        timeout: float | None = None,
    ) -> int:
        """Report true outcomes of answered queries (``{result.request_id: truth}``: an int is a
        class label, a str a text label, a float a value). The nodes join them to the logged
        predictions (models registered with prediction logging); returns the items accepted."""
        request = self._feedback_request(model, outcomes)
        try:
            response = self._admin.Feedback(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise translate(exc) from None
        return int(response.accepted)

    def close(self) -> None:
        """Stop the feed's thread and close every channel (the gateway's and the nodes')."""
        with self._lock:
            self._closed = True
            feed, self._feed = self._feed, None
            nodes, self._nodes = list(self._nodes.values()), {}
            hedges, self._hedges = self._hedges, None
        if feed is not None:
            feed.close()
        if hedges is not None:
            hedges.shutdown(wait=False)
        for channel, _ in nodes:
            channel.close()
        self._channel.close()
        if self._member is not None:
            self._member.close()

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncMeshClient(_Base):
    """asyncio client with the same methods as :class:`MeshClient`, awaited."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 10.0,
        max_message_bytes: int = 64 << 20,
        tls: TLSFiles | None = None,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
        routing: Routing = "direct",
        feed: str | Sequence[str] | None = None,
        zone: str = "",
        transport: Transport = "stream",
        embedded: Sequence[str | EmbeddedModel] = (),
        member: EmbeddedOptions | None = None,
    ):
        """As :class:`MeshClient` (the feed runs on the caller's event loop, started by the first
        query). ``transport``: how a routed query reaches a node: ``"stream"`` (default) over one
        multiplexed ``NodeInference.Infer`` stream per node (:class:`MuxChannel`, the fast
        path), ``"unary"`` as one OIP ``ModelInfer`` call each. ``embedded``, ``member``: as
        :class:`MeshClient` (a model fast enough runs on the caller's loop, else on a worker
        thread)."""
        if transport not in ("stream", "unary"):
            raise ValueError(f"transport must be 'stream' or 'unary', got {transport!r}")
        super().__init__(
            target,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            retry=retry,
            tls=tls,
            api_key=api_key,
            routing=routing,
            feed=feed,
            zone=zone,
            embedded=embedded,
            member=member,
        )
        self.transport: Transport = transport
        self._channel = aio_channel(self._target, tls, api_key, self._options)
        self._stub = inference_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._admin = mesh_pb2_grpc.AdminStub(self._channel)
        self._core = RoutedCore(zone=zone)
        self._warmup: asyncio.Task[None] | None = None
        self._nodes: dict[str, tuple[aio.Channel, Callable[..., Any], MuxChannel | None]] = {}
        self._closing: set[asyncio.Future[None]] = set()
        self._closed = False

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        outputs: Sequence[str] | None = None,
        *,
        version: str = "",
        parameters: Mapping[str, ParameterValue] | None = None,
        timeout: float | None = None,
        slo_ms: float | None = None,
        min_accuracy: float | None = None,
        zone: str | None = None,
        request_id: str = "",
    ) -> InferResult:
        member = self._embedded(model)
        if member is not None:
            args = (member, model, inputs, outputs, version, timeout, slo_ms, min_accuracy)
            with self._span(model):
                if member.inline(model):  # cheaper than a thread hand-off
                    return self._embedded_infer(*args, request_id)
                return await asyncio.to_thread(self._embedded_infer, *args, request_id)
        request = self._request(
            model, inputs, outputs, version, parameters, slo_ms, min_accuracy, zone, request_id
        )
        with self._span(model):
            started = time.monotonic()
            if self.routing == "gateway":
                metadata = metadata_with_context()

                async def attempt(remaining: float) -> inference_pb2.ModelInferResponse:
                    answer: inference_pb2.ModelInferResponse = await self._stub.ModelInfer(
                        request, timeout=remaining, metadata=metadata
                    )
                    return answer

            else:
                parent = otel_context.get_current()
                await self._start_feed(timeout or self.timeout)

                async def attempt(remaining: float) -> inference_pb2.ModelInferResponse:
                    return await self._routed(request, remaining, started, parent)

            response = await call_async(attempt, self.retry, timeout or self.timeout)
        return self._result(response)

    infer.__doc__ = f"As :meth:`MeshClient.infer`, awaited. {_INFER_DOC}"

    # -- the routed path -------------------------------------------------------------------

    async def _start_feed(self, timeout: float) -> None:
        warmup = self._warmup
        if warmup is None:
            if self._closed:
                raise Unavailable("the client is closed")
            feed = self._feed_client()
            self._core.attach(feed)
            feed.start()
            warmup = self._warmup = asyncio.ensure_future(warm(feed))
        if not warmup.done():
            await asyncio.wait({warmup}, timeout=min(FIRST_WAIT_S, timeout / 2))

    async def _routed(
        self,
        request: inference_pb2.ModelInferRequest,
        remaining: float,
        started: float,
        parent: Any,
    ) -> inference_pb2.ModelInferResponse:
        query = Query(self._core, request, time.monotonic() + remaining, started, parent)
        step = query.first()
        while True:
            try:
                response = await self._send(query, step)
            except grpc.RpcError as exc:
                step = query.failed(step, translate(exc))
            except StatusError as exc:
                step = query.failed(step, exc)
            except BaseException:
                query.abandoned(step)
                raise
            else:
                return query.answered(step, response)

    async def _send(self, query: Query, step: Step) -> inference_pb2.ModelInferResponse:
        if step.node is None:
            answer: inference_pb2.ModelInferResponse = await self._stub.ModelInfer(
                query.request, timeout=step.timeout, metadata=step.metadata
            )
            return answer
        address = step.node.direct_address
        channel, unary, mux = self._node(address)
        if mux is not None:
            try:
                data = await mux.call(
                    query.base,
                    variant=step.variant,
                    prefer=step.prefer,
                    trace_context=step.trace_context,
                    timeout=step.timeout,
                )
            except StatusError as exc:
                if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                # a node without the stream service: unary calls to it from now on
                self._nodes[address] = (channel, unary, None)
                self._track(asyncio.ensure_future(mux.close()))
            else:
                return inference_pb2.ModelInferResponse.FromString(data)
        response: inference_pb2.ModelInferResponse = await unary(
            query.unary_payload(step), timeout=step.timeout, metadata=step.metadata
        )
        return response

    def _node(self, address: str) -> tuple[aio.Channel, Callable[..., Any], MuxChannel | None]:
        """The channel, unary ModelInfer and stream of the node at ``address`` (one each)."""
        entry = self._nodes.get(address)
        if entry is None:
            channel = aio_channel(address, self._node_tls, self._api_key, self._node_options)
            unary = channel.unary_unary(
                MODEL_INFER,
                request_serializer=None,
                response_deserializer=inference_pb2.ModelInferResponse.FromString,
            )
            mux = None
            if self.transport == "stream":
                mux = MuxChannel(
                    channel, max_message_bytes=self._max_message_bytes, address=address
                )
            entry = self._nodes[address] = (channel, unary, mux)
        if self._core.prune_due():
            for gone in self._core.stale_addresses(list(self._nodes)):
                if gone != address:
                    self._track(asyncio.ensure_future(self._close_node(self._nodes.pop(gone))))
        return entry

    def _track(self, task: asyncio.Future[None]) -> None:
        """Keep a closing task referenced until it is done."""
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_node(entry: tuple[aio.Channel, Any, MuxChannel | None]) -> None:
        channel, _, mux = entry
        if mux is not None:
            await mux.close()
        await channel.close(None)

    # -- the rest goes through the gateway -------------------------------------------------

    async def model_ready(
        self, model: str, version: str = "", *, timeout: float | None = None
    ) -> bool:
        try:
            response = await self._stub.ModelReady(
                inference_pb2.ModelReadyRequest(name=model, version=version),
                timeout=timeout or self.timeout,
            )
        except grpc.RpcError as exc:
            raise translate(exc) from None
        return bool(response.ready)

    async def model_metadata(
        self, model: str, version: str = "", *, timeout: float | None = None
    ) -> inference_pb2.ModelMetadataResponse:
        try:
            response: inference_pb2.ModelMetadataResponse = await self._stub.ModelMetadata(
                inference_pb2.ModelMetadataRequest(name=model, version=version),
                timeout=timeout or self.timeout,
            )
        except grpc.RpcError as exc:
            raise translate(exc) from None
        return response

    async def feedback(
        self,
        model: str,
        outcomes: Mapping[str, int | str | float],
        *,
        timeout: float | None = None,
    ) -> int:
        """As :meth:`MeshClient.feedback`, awaited."""
        request = self._feedback_request(model, outcomes)
        try:
            response = await self._admin.Feedback(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise translate(exc) from None
        return int(response.accepted)

    async def close(self) -> None:
        """Stop the feed and close every stream and channel (the gateway's and the nodes')."""
        self._closed = True
        warmup, self._warmup = self._warmup, None
        if warmup is not None and not warmup.done():
            warmup.cancel()
        feed = self._core.feed
        if feed is not None:
            await feed.close()
        nodes, self._nodes = list(self._nodes.values()), {}
        await asyncio.gather(*(self._close_node(e) for e in nodes), return_exceptions=True)
        await self._channel.close(None)
        if self._member is not None:
            await asyncio.to_thread(self._member.close)

    async def __aenter__(self) -> AsyncMeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
