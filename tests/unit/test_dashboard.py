"""The shipped Grafana dashboard parses and queries only metrics the processes export."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "meshserve-dashboard.json"
EXPORTED = {  # as scraped from a control plane (tests/integration/test_metrics.py covers them)
    "meshserve_requests_total",
    "meshserve_slo_misses_total",
    "meshserve_events_total",
    "rpc_server_duration_milliseconds_bucket",
}


def test_dashboard_queries_exported_metrics_only() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    # Metric names are what a selector or a function argument starts with (labels are not).
    used = {m for e in exprs for m in re.findall(r"\b((?:meshserve|rpc)_[a-z_]+)(?=[{\[])", e)}
    assert used <= EXPORTED, used - EXPORTED
