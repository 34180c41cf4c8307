"""Request metrics shared by the gateway and the nodes (OpenTelemetry; no-ops until a meter
provider is configured, see :func:`protos.process.configure_metrics`).

Names: ``rpc.server.duration`` (histogram, ms) follows the OpenTelemetry RPC semantic
conventions (``rpc.system``, ``rpc.method``, ``rpc.grpc.status_code``); ``meshserve.requests``
counts answered queries per model, variant, node, hop and status.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable

from opentelemetry import metrics

from protos import inference_pb2
from protos.status import StatusError

__all__ = ["RequestMetrics"]


class RequestMetrics:
    def __init__(self, meter_name: str, hop: str) -> None:
        meter = metrics.get_meter(meter_name)
        self._hop = hop
        self._count = meter.create_counter(
            "meshserve.requests", unit="{request}", description="inference queries answered"
        )
        self._duration = meter.create_histogram(
            "rpc.server.duration", unit="ms", description="ModelInfer latency on this hop"
        )

    def record(self, model: str, variant: str, node: str, status: int, seconds: float) -> None:
        self._count.add(
            1,
            {
                "model": model,
                "variant": variant,
                "node": node,
                "hop": self._hop,
                "rpc.grpc.status_code": status,
            },
        )
        self._duration.record(
            seconds * 1000.0,
            {
                "rpc.system": "grpc",
                "rpc.method": "ModelInfer",
                "rpc.grpc.status_code": status,
                "model": model,
                "hop": self._hop,
            },
        )

    async def measure(
        self,
        call: Awaitable[inference_pb2.ModelInferResponse],
        request: inference_pb2.ModelInferRequest,
        node: str = "",
    ) -> inference_pb2.ModelInferResponse:
        """Await ``call`` (the answer to ``request``) and record it, failed or not. ``node``:
        this hop's node id; empty = the node the answer names (``meshserve_node``)."""
        started = time.monotonic()
        try:
            response = await call
        except StatusError as exc:
            elapsed = time.monotonic() - started
            code: int = exc.code.value[0]
            self.record(request.model_name, request.model_version, node, code, elapsed)
            raise
        named = response.parameters.get("meshserve_node")
        answered_by = node or (named.string_param if named is not None else "")
        elapsed = time.monotonic() - started
        self.record(request.model_name, response.model_version, answered_by, 0, elapsed)
        return response
