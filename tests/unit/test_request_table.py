"""The request-metrics table is bounded whatever label sets come, and records nothing while
metrics are off."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from meshserve.common.errors import NotFound
from meshserve.common.instruments import (
    LATENCY_MS_BUCKETS,
    OVERFLOW,
    UNKNOWN,
    Labels,
    RequestMetrics,
    _RequestTable,
)
from meshserve.protos import inference_pb2


def test_rows_past_the_cap_share_one_overflow_row_per_hop_and_status() -> None:
    table = _RequestTable(LATENCY_MS_BUCKETS, max_rows=10)
    for i in range(1000):
        table.record(("node", f"model-{i}", "v", "n1", i % 2), 1.0)
    rows = dict(table.snapshot())
    assert len(rows) == 12  # 10 label sets, then one overflow row per status
    assert rows[("node", OVERFLOW, "", "", 0)][0] + rows[("node", OVERFLOW, "", "", 1)][0] == 990
    assert sum(row[0] for row in rows.values()) == 1000, "every query is still counted"


def test_a_disabled_table_records_nothing() -> None:
    table = _RequestTable(LATENCY_MS_BUCKETS, enabled=False)
    table.record(("node", "m", "v", "n1", 0), 1.0)
    assert len(table) == 0


def test_a_failed_query_is_recorded_under_what_the_hop_resolved_not_what_was_sent() -> None:
    table = _RequestTable(LATENCY_MS_BUCKETS)
    metrics = RequestMetrics("node", table)
    request = inference_pb2.ModelInferRequest(model_name="x" * 65536, model_version="y" * 65536)

    async def unknown() -> inference_pb2.ModelInferResponse:
        raise NotFound(f"model {request.model_name!r} is not served by this node")

    with pytest.raises(NotFound):
        asyncio.run(metrics.measure(unknown(), Labels(node="n1")))
    ((key, row),) = table.snapshot()
    assert key == ("node", UNKNOWN, "", "n1", grpc.StatusCode.NOT_FOUND.value[0])
    assert row[0] == 1
