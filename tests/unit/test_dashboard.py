"""The shipped Grafana dashboard parses and queries only metrics the processes export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

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
    # the alarms' gauges (controlplane/observe/alarms.py: meshserve.model.accuracy and
    # meshserve.drift.psi, unit "1", named so by the OpenTelemetry Prometheus exporter)
    "meshserve_model_accuracy",
    "meshserve_drift_psi",
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


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_model_and_node_variables_filter_the_panels_that_carry_those_labels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name in ("model", "node"):
        assert variables[name]["type"] == "query"
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        assert f", {name})" in variables[name]["definition"]
    exprs = _exprs(dashboard)
    # every selector of a per-model family is filtered by $model; the request families by $node
    for metric in ("meshserve_requests_total", "rpc_server_duration_milliseconds_bucket"):
        selectors = re.findall(rf"{metric}\{{([^}}]*)\}}", " ".join(exprs))
        assert selectors and all('node=~"$node"' in s for s in selectors), metric
    per_model = [e for e in exprs if "sum by (model" in e or "max by (model" in e]
    assert per_model and all('model=~"$model"' in e for e in per_model)


def test_drift_and_accuracy_have_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {p["title"]: " ".join(_exprs({"panels": [p]})) for p in dashboard["panels"]}
    assert any("meshserve_drift_psi" in e and "drift" in t.lower() for t, e in titles.items())
    assert any(
        "meshserve_model_accuracy" in e and "accuracy" in t.lower() for t, e in titles.items()
    )
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
