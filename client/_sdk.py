"""MeshClient / AsyncMeshClient: the Python SDK for any meshserve gateway (or OIP server).

Shared logic lives once in :class:`_Base` (request building, response decoding, error
translation); the sync and async twins differ only in how they call gRPC. Each call opens an
OpenTelemetry CLIENT span and sends its W3C trace context in the call metadata.

Errors: every failed call raises :class:`MeshError` (a
:class:`meshserve.common.errors.StatusError`) with
the server's status code and message, e.g. ``NotFound``, ``InvalidArgument``, ``Unavailable``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from meshserve.client._admin import feedback_items
from meshserve.client._retry import NO_RETRY, RetryPolicy, call_async, call_sync, translate
from meshserve.common.codec import (
    ParameterValue,
    build_request,
    decode_response_outputs,
    get_parameter,
)
from meshserve.common.errors import StatusError
from meshserve.common.params import CLIENT_ZONE
from meshserve.common.security import TLSFiles, aio_channel, sync_channel
from meshserve.common.tracing import metadata_with_context
from meshserve.protos import inference_pb2, inference_pb2_grpc, mesh_pb2, mesh_pb2_grpc

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
        """The variant that answered (the gateway may switch variants to meet an SLO)."""
        return str(self.parameters.get("meshserve_variant", self.model_version))

    @property
    def slo_met(self) -> bool | None:
        """Whether the gateway predicted the answer within the query's ``slo_ms`` (None: no SLO)."""
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
    spreads calls round-robin over the live ones (a replica that goes away is skipped; the SDK's
    retries move a failed call to another); hostnames: the first is used."""
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
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._target, extra = channel_target(target)
        self._options = _options(max_message_bytes) + extra

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
        parameters = _with_routing(parameters, slo_ms, min_accuracy, zone)
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
        return _tracer.start_as_current_span(
            "client ModelInfer", kind=trace.SpanKind.CLIENT, attributes={"meshserve.model": model}
        )

    @staticmethod
    def _result(response: inference_pb2.ModelInferResponse) -> InferResult:
        params = {k: get_parameter(v) for k, v in response.parameters.items()}
        return InferResult(
            decode_response_outputs(response), params, response.model_version, response.id
        )


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
    ):
        """``tls``: dial with TLS (``TLSFiles(ca=..., cert=..., key=...)``: the CA the gateway's
        certificate chains to; a client certificate where the gateway requires one).
        ``api_key``: sent as ``authorization: Bearer <key>`` on every call, only over TLS or to
        a loopback address (see :mod:`meshserve.common.security`). ``target``: one gateway, or
        several
        comma-separated (the mesh's replicas; calls spread over the live ones).
        ``retry``: how :meth:`infer` retries UNAVAILABLE (and RESOURCE_EXHAUSTED with a
        retry-after hint) inside the call's deadline, and whether it hedges a slow call
        (default :class:`RetryPolicy`: up to 5 attempts, no hedging; ``NO_RETRY``: one)."""
        super().__init__(target, timeout=timeout, max_message_bytes=max_message_bytes, retry=retry)
        self._channel = sync_channel(self._target, tls, api_key, self._options)
        self._stub = inference_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._admin = mesh_pb2_grpc.AdminStub(self._channel)

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
        """``slo_ms``: latency budget; the gateway answers with the most accurate variant it
        predicts within it. ``min_accuracy``: never a variant below this accuracy. ``zone``:
        the caller's zone; the gateway prefers copies on nodes labelled ``zone=<it>`` (any
        other copy answers when none there can). ``request_id``: the OIP request id (for
        :meth:`feedback`; a node logging predictions assigns one when it is empty, see
        ``InferResult.request_id``)."""
        request = self._request(
            model, inputs, outputs, version, parameters, slo_ms, min_accuracy, zone, request_id
        )
        with self._span(model):
            metadata = metadata_with_context()

            def attempt(remaining: float) -> Any:
                return self._stub.ModelInfer.future(request, timeout=remaining, metadata=metadata)

            response = call_sync(attempt, self.retry, timeout or self.timeout)
        return self._result(response)

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
        self._channel.close()

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
    ):
        """``tls``, ``api_key``: as :class:`MeshClient`."""
        super().__init__(target, timeout=timeout, max_message_bytes=max_message_bytes, retry=retry)
        self._channel = aio_channel(self._target, tls, api_key, self._options)
        self._stub = inference_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._admin = mesh_pb2_grpc.AdminStub(self._channel)

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
        """As :meth:`MeshClient.infer`, awaited."""
        request = self._request(
            model, inputs, outputs, version, parameters, slo_ms, min_accuracy, zone, request_id
        )
        with self._span(model):
            metadata = metadata_with_context()

            async def attempt(remaining: float) -> inference_pb2.ModelInferResponse:
                answer: inference_pb2.ModelInferResponse = await self._stub.ModelInfer(
                    request, timeout=remaining, metadata=metadata
                )
                return answer

            response = await call_async(attempt, self.retry, timeout or self.timeout)
        return self._result(response)

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
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncMeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
