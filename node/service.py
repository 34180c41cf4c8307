"""The node's inference path, shared by its direct OIP port and by tunneled queries.

:class:`InferenceHandler` turns one ``ModelInferRequest`` into one ``ModelInferResponse`` (or a
``StatusError``). :class:`NodeInferenceServicer` exposes it as ``inference.GRPCInferenceService``
for nodes started with ``--listen`` (tenant rights checked by :mod:`meshserve.node.rights`), next
to the multiplexed stream of :mod:`meshserve.node.mux`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from numpy.typing import NDArray
from opentelemetry import trace
from opentelemetry.context import Context

from meshserve.common.codec import (
    DECODE_OFF_LOOP_BYTES,
    check_request_inputs,
    decode_request_inputs,
    encode_response_outputs,
)
from meshserve.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    ServicerContext,
    StatusError,
)
from meshserve.common.instruments import Labels, RequestMetrics
from meshserve.common.params import PREFER
from meshserve.common.streaming import serve_infer_stream
from meshserve.common.tenancy import current_tenant, set_tenant
from meshserve.common.tracing import context_from_metadata, server_span
from meshserve.node import repository
from meshserve.node.cache import ResponseCache, inputs_digest, key_for
from meshserve.node.copies import CopyEntry, CopyManager
from meshserve.node.monitor import monitor_answer
from meshserve.node.rights import Rights
from meshserve.node.runtime import OnnxCopy
from meshserve.protos import inference_pb2, inference_pb2_grpc

__all__ = ["InferenceHandler", "NodeInferenceServicer"]

_tracer = trace.get_tracer("meshserve.node")
_VERSION = "0.1.0"


#: Deadline shedding admits a query only if its estimated answer comes within this share of
#: the time it has left: the estimate misses the hops before and after the node.
_HEADROOM = 0.75
#: At most this many variants of ``meshserve_prefer`` are looked up (a gateway names the few more
#: accurate than the one it picked).
_MAX_PREFER = 16


class _Key:
    """A query's cache keys: its inputs hashed at most once (only if a cache is asked), then
    bound to each copy looked up (:func:`meshserve.node.cache.key_for`)."""

    __slots__ = ("_digest", "_inputs")

    def __init__(self, inputs: dict[str, NDArray[Any]]) -> None:
        self._inputs = inputs
        self._digest: bytes | None = None

    def of(self, entry: CopyEntry) -> bytes:
        if self._digest is None:
            self._digest = inputs_digest(self._inputs)
        return key_for(entry.model, entry.variant, entry.sha256, self._digest)


class InferenceHandler:
    def __init__(
        self,
        node_id: str,
        copies: CopyManager,
        *,
        fault_delay_s: float = 0.0,
        max_in_flight_per_copy: int = 256,
        parallelism: int = 1,
        shed_late: bool = True,
    ) -> None:
        """Admission on the node: a copy holds at most ``max_in_flight_per_copy`` queries (0:
        no limit), and a query that would wait longer than its remaining deadline (in-flight
        queries x the copy's measured run time / ``parallelism``, the worker threads) is refused
        at once; both with RESOURCE_EXHAUSTED and a retry-after hint, so the gateway tries
        another copy and callers back off instead of queueing work that cannot finish in time.
        A query whose deadline passed while it waited for a worker is dropped unrun.
        ``shed_late=False`` turns the deadline rules off (the overload benchmark's baseline)."""
        self.node_id = node_id
        self._copies = copies
        self._fault_delay_s = fault_delay_s
        self._max_in_flight = max_in_flight_per_copy
        self._parallelism = max(1, parallelism)
        self._shed_late = shed_late
        self._metrics = RequestMetrics(hop="node")
        self.refused = 0

    async def infer(
        self,
        request: inference_pb2.ModelInferRequest,
        parent: Context | None,
        hop: str,
        deadline: float | None = None,
    ) -> inference_pb2.ModelInferResponse:
        """Answer one query. ``deadline`` is absolute (``time.monotonic()``); None = no limit."""
        labels = Labels(node=self.node_id)
        call = self._infer(request, parent, hop, deadline, labels)
        return await self._metrics.measure(call, labels)

    async def _infer(
        self,
        request: inference_pb2.ModelInferRequest,
        parent: Context | None,
        hop: str,
        deadline: float | None,
        labels: Labels,
    ) -> inference_pb2.ModelInferResponse:
        """``labels``: filled in with the copy found (the query's metrics record only that)."""
        with server_span(
            _tracer,
            "node ModelInfer",
            parent,
            {
                "meshserve.model": request.model_name,
                "meshserve.node": self.node_id,
                "meshserve.hop": hop,
            },
        ) as span:
            if not request.model_name:
                raise InvalidArgument("model_name is empty")
            entry = self._copies.ready(request.model_name, request.model_version)
            copy = entry.copy
            assert copy is not None
            labels.model, labels.variant = entry.model, entry.variant
            span.set_attribute("meshserve.variant", entry.variant)
            # The header first (names, datatypes, shapes, sizes against the model), then the
            # contents: a large payload on a worker thread, never on this loop.
            payload = check_request_inputs(request, copy.inputs)
            if payload > DECODE_OFF_LOOP_BYTES:
                inputs = await asyncio.to_thread(decode_request_inputs, request)
            else:
                inputs = decode_request_inputs(request)
            copy.validate(inputs, {t.name: t.datatype for t in request.inputs})
            names = copy.output_names([o.name for o in request.outputs])
            key = _Key(inputs)
            better = self._cached_better(request, key, names)
            if better is not None:  # a more accurate variant already answered exactly this
                entry, outputs = better
                labels.variant = entry.variant
                hit = True
                entry.requests += 1
                span.set_attribute("meshserve.variant", entry.variant)
                span.set_attribute("meshserve.cache_hit", True)
            else:
                self._admit(entry, deadline)
                entry.in_flight += 1
                entry.requests += 1
                started = time.monotonic()
                try:
                    if self._fault_delay_s:
                        await asyncio.sleep(self._fault_delay_s)
                    outputs, hit = await self._compute(entry, inputs, key, names, deadline, span)
                except Exception:
                    entry.errors += 1
                    raise
                finally:
                    entry.in_flight -= 1
                entry.latency.record(time.monotonic() - started)
            request_id = self._monitor(entry, request.id, inputs, outputs)
            response = inference_pb2.ModelInferResponse(
                model_name=request.model_name, model_version=entry.variant, id=request_id
            )
            encode_response_outputs(response, outputs)
            response.parameters["meshserve_node"].string_param = self.node_id
            response.parameters["meshserve_variant"].string_param = entry.variant
            if entry.serving.cache:
                response.parameters["meshserve_cache_hit"].bool_param = hit
            return response

    def _admit(self, entry: CopyEntry, deadline: float | None) -> None:
        """Refuse a query this copy cannot take now (see the constructor)."""
        waiting = entry.in_flight if entry.batcher is None else entry.batcher.queue_depth
        per_run = max(entry.run_seconds, entry.run_ewma_s)
        wait = waiting * per_run / self._parallelism
        if self._max_in_flight and entry.in_flight >= self._max_in_flight:
            self.refused += 1
            raise ResourceExhausted(
                f"node {self.node_id}: {entry.model}/{entry.variant} holds {entry.in_flight} "
                f"queries (limit {self._max_in_flight})",
                max(0.01, wait),
            )
        if deadline is None or not per_run or entry.batcher is not None or not self._shed_late:
            return  # the batcher sheds by deadline itself
        remaining = deadline - time.monotonic()
        if wait + per_run > _HEADROOM * remaining:
            self.refused += 1
            raise ResourceExhausted(
                f"node {self.node_id}: {entry.model}/{entry.variant} would answer in about "
                f"{(wait + per_run) * 1000:.0f} ms, past the query's deadline "
                f"({max(0.0, remaining) * 1000:.0f} ms left)",
                max(0.01, wait + per_run - _HEADROOM * remaining),
            )

    def _monitor(
        self,
        entry: CopyEntry,
        request_id: str,
        inputs: dict[str, NDArray[Any]],
        outputs: dict[str, NDArray[Any]],
    ) -> str:
        """See :func:`~meshserve.node.monitor.monitor_answer` (feedback joins only the
        tenant's own)."""
        log = self._copies.prediction_log
        return monitor_answer(
            entry.monitor, log, request_id, inputs, outputs, self.node_id, current_tenant()
        )

    def _cached_better(
        self,
        request: inference_pb2.ModelInferRequest,
        key: _Key,
        names: list[str],
    ) -> tuple[CopyEntry, dict[str, NDArray[Any]]] | None:
        """A cached answer of a more accurate variant the gateway named acceptable
        (``meshserve_prefer``: variants, most accurate first) held READY on this node."""
        prefer = request.parameters.get(PREFER)
        if prefer is None or not prefer.string_param:
            return None
        # The first few names only: the parameter is the caller's to set (a direct query's, or
        # one passed through a gateway), and a megabyte of commas must cost nothing.
        for variant in prefer.string_param.split(",", _MAX_PREFER)[:_MAX_PREFER]:
            if not variant:
                continue
            try:
                other = self._copies.ready(request.model_name, variant)
            except StatusError:
                continue
            if not other.serving.cache:
                continue
            cached = key.of(other)
            if cached not in self._copies.cache:  # a probe, not a miss of this query's copy
                continue
            hit = self._copies.cache.get(cached)
            if hit is not None and all(n in hit for n in names):
                other.instruments.cache(True)
                return other, {n: hit[n] for n in names}
        return None

    @staticmethod
    def _lookup(
        entry: CopyEntry, cache: ResponseCache, key: _Key, span: trace.Span
    ) -> tuple[bytes, dict[str, NDArray[Any]] | None]:
        """The query's cache key for ``entry`` and its cached outputs (None: a miss), counted;
        a "node cache" span (child of ``span``, the query's) when the query is traced."""
        lookup = _tracer.start_span("node cache") if span.is_recording() else None
        cached = key.of(entry)
        hit = cache.get(cached)
        entry.instruments.cache(hit is not None)
        span.set_attribute("meshserve.cache_hit", hit is not None)
        if lookup is not None:
            lookup.set_attribute("meshserve.cache_hit", hit is not None)
            lookup.end()
        return cached, hit

    async def _compute(
        self,
        entry: CopyEntry,
        inputs: dict[str, NDArray[Any]],
        key: _Key,
        names: list[str],
        deadline: float | None,
        span: trace.Span,
    ) -> tuple[dict[str, NDArray[Any]], bool]:
        """Cache (opt-in) → batcher (models with a batch axis, opt-in) → one onnxruntime run.

        Returns the requested outputs and whether they came from the cache.
        """
        copy = entry.copy
        assert copy is not None
        cache = self._copies.cache if entry.serving.cache else None
        cached = b""
        if cache is not None:
            cached, hit = self._lookup(entry, cache, key, span)
            if hit is not None:
                return {n: hit[n] for n in names}, True
            names_to_run = copy.all_outputs  # cache every output: any later subset hits
        else:
            names_to_run = names
        if entry.batcher is not None:
            outputs = await entry.batcher.submit(inputs, deadline=deadline)
        elif entry.inline:
            outputs = copy.run_blocking(inputs, names_to_run)
        else:
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            outputs = await loop.run_in_executor(
                self._copies.executor,
                _run_unless_late,
                copy,
                inputs,
                names_to_run,
                deadline if self._shed_late else None,
            )
            # The effective service time per query, as the admission estimate needs it: the
            # wall time from hand-off to answer back on the loop (run, thread hand-offs and the
            # CPU the workers share with the loop) over the queries that shared the workers. The
            # run alone, timed on the thread, overestimates the rate (goodput 0.51 vs 0.95 of
            # peak in bench/overload.py).
            share = max(1.0, entry.in_flight / self._parallelism)
            seconds = (time.monotonic() - started) / share
            ewma = entry.run_ewma_s
            entry.run_ewma_s = seconds if not ewma else 0.9 * ewma + 0.1 * seconds
        if cache is not None:
            cache.put(cached, outputs, model=entry.model, variant=entry.variant)
        return {n: outputs[n] for n in names}, False


def _allows(check: Callable[[str], None]) -> Callable[[str], bool]:
    """A rights check (raising PERMISSION_DENIED) as a filter."""

    def allowed(model: str) -> bool:
        try:
            check(model)
        except PermissionDenied:
            return False
        return True

    return allowed


def _run_unless_late(
    copy: OnnxCopy, inputs: dict[str, NDArray[Any]], names: list[str], deadline: float | None
) -> dict[str, NDArray[Any]]:
    """Run on a worker thread, unless the query's deadline passed while it waited for one (its
    caller has given up: the run would only delay the queries behind it)."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("deadline passed while the query waited for a worker")
    return copy.run_blocking(inputs, names)


class NodeInferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """The node's own OIP endpoint (direct path; no control plane involved).

    ``rights``: the tenant rights ModelInfer, ModelMetadata, ModelReady, ModelConfig (and the
    models RepositoryIndex lists) and each request of
    ModelStreamInfer (authenticated once per stream) must meet (:mod:`meshserve.node.rights`);
    None: open. Health RPCs stay open."""

    def __init__(
        self, handler: InferenceHandler, copies: CopyManager, rights: Rights | None = None
    ) -> None:
        self._handler = handler
        self._copies = copies
        self._rights = rights
        self._started = time.monotonic()

    async def ServerLive(
        self, request: inference_pb2.ServerLiveRequest, context: ServicerContext
    ) -> inference_pb2.ServerLiveResponse:
        return inference_pb2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: inference_pb2.ServerReadyRequest, context: ServicerContext
    ) -> inference_pb2.ServerReadyResponse:
        return inference_pb2.ServerReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: inference_pb2.ServerMetadataRequest, context: ServicerContext
    ) -> inference_pb2.ServerMetadataResponse:
        return inference_pb2.ServerMetadataResponse(name="meshserve-node", version=_VERSION)

    async def ModelReady(
        self, request: inference_pb2.ModelReadyRequest, context: ServicerContext
    ) -> inference_pb2.ModelReadyResponse:
        if self._rights is not None:
            self._rights.check_call(context, request.name)
        try:
            self._copies.ready(request.name, request.version)
        except Exception:
            return inference_pb2.ModelReadyResponse(ready=False)
        return inference_pb2.ModelReadyResponse(ready=True)

    async def ModelMetadata(
        self, request: inference_pb2.ModelMetadataRequest, context: ServicerContext
    ) -> inference_pb2.ModelMetadataResponse:
        if self._rights is not None:
            self._rights.check_call(context, request.name)
        entry = self._copies.ready(request.name, request.version)
        assert entry.copy is not None
        T = inference_pb2.ModelMetadataResponse.TensorMetadata
        return inference_pb2.ModelMetadataResponse(
            name=request.name,
            versions=[entry.variant],
            platform="onnxruntime_onnx",
            inputs=[T(name=t.name, datatype=t.datatype, shape=t.shape) for t in entry.copy.inputs],
            outputs=[
                T(name=t.name, datatype=t.datatype, shape=t.shape) for t in entry.copy.outputs
            ],
        )

    # -- Triton's model configuration and repository extensions (repository.py) -------------

    async def ModelConfig(
        self, request: inference_pb2.ModelConfigRequest, context: ServicerContext
    ) -> inference_pb2.ModelConfigResponse:
        if self._rights is not None:
            self._rights.check_call(context, request.name)
        return repository.config(self._copies, request)

    async def RepositoryIndex(
        self, request: inference_pb2.RepositoryIndexRequest, context: ServicerContext
    ) -> inference_pb2.RepositoryIndexResponse:
        """The copies held, only those of models the caller may query (tenant rights)."""
        check = self._rights.stream_of(context) if self._rights is not None else None
        visible = None if check is None else _allows(check)
        return repository.index(self._copies, request, visible)

    def _scope(self, context: ServicerContext) -> None:
        """Whose queries this call's are (its predictions are logged under that tenant): the
        caller's key's, or for a router the caller it names (:mod:`meshserve.common.tenancy`)."""
        rights = self._rights
        if rights is None:
            return
        tenant = rights.tenant_of(context)
        if tenant is None:
            tenant = rights.forwarded(context.invocation_metadata())  # type: ignore[arg-type]
        set_tenant(tenant)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[inference_pb2.ModelInferRequest],
        context: ServicerContext,
    ) -> None:
        check = self._rights.stream_of(context) if self._rights is not None else None
        self._scope(context)
        parent = context_from_metadata(context.invocation_metadata())  # type: ignore[arg-type]
        handler = self._handler

        async def infer(
            request: inference_pb2.ModelInferRequest,
        ) -> inference_pb2.ModelInferResponse:
            if check is not None:
                check(request.model_name)
            return await handler.infer(request, parent, hop="direct-stream")

        await serve_infer_stream(request_iterator, infer, context.write)

    async def ModelInfer(
        self, request: inference_pb2.ModelInferRequest, context: ServicerContext
    ) -> inference_pb2.ModelInferResponse:
        rights = self._rights
        if rights is not None and not rights.open:
            rights.check_call(context, request.model_name)
        self._scope(context)
        parent = context_from_metadata(context.invocation_metadata())  # type: ignore[arg-type]
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return await self._handler.infer(request, parent, hop="direct", deadline=deadline)
