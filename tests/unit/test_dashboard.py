"""The shipped Grafana dashboard parses and queries only metrics the processes export."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "meshserve-dashboard.json"
# As scraped from a control plane and a node (tests/integration/test_metrics.py covers most; the
# stream, reconnect and telemetry families: tests/unit/test_instruments.py).
CONTROL_PLANE = {
    "meshserve_requests_total",
    "meshserve_slo_misses_total",
    "meshserve_events_total",
    "rpc_server_duration_milliseconds_bucket",
    "meshserve_placement_decisions_total",
    "meshserve_copy_evictions_total",
    "meshserve_scheduler_duration_seconds_bucket",
    "meshserve_node_streams",
}
NODE = {
    "meshserve_requests_total",
    "rpc_server_duration_milliseconds_bucket",
    "meshserve_queue_duration_milliseconds_bucket",
    "meshserve_batch_size_bucket",
    "meshserve_batch_size_sum",
    "meshserve_batch_size_count",
    "meshserve_cache_hits_total",
    "meshserve_cache_misses_total",
    "meshserve_cache_evictions_total",
    "meshserve_copy_load_duration_seconds_bucket",
    "meshserve_copy_warmup_duration_seconds_bucket",
    "meshserve_copy_unloads_total",
    "meshserve_copy_memory_bytes",
    "meshserve_link_reconnects_total",
    "meshserve_telemetry_sent_bytes_total",
}
EXPORTED = CONTROL_PLANE | NODE


def test_dashboard_queries_exported_metrics_only() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    # Metric names are what a selector or a function argument starts with (labels are not).
    used = {m for e in exprs for m in re.findall(r"\b((?:meshserve|rpc)_[a-z_]+)(?=[{\[])", e)}
    assert used <= EXPORTED, used - EXPORTED


def test_every_new_metric_family_has_a_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    text = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    missing = {m for m in EXPORTED if m not in text}
    assert not missing, f"exported but on no panel: {sorted(missing)}"
