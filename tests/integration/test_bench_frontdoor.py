"""``bench/frontdoor.py --quick`` runs end to end: a functional smoke, not a timing assertion.

A real mesh (etcd, a control plane, a direct and a tunnel-only node), the reference servers and
the load processes, with the rows limited to the paths that exist on every checkout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
ROWS = ("floor", "echo_unary", "echo_stream", "handwritten", "node_unary")
ROWS += ("gateway_direct", "gateway_tunnel")


def test_quick_run_measures_every_selected_row_without_errors(tmp_path: Path) -> None:
    out = tmp_path / "frontdoor.json"
    argv = [sys.executable, str(ROOT / "bench" / "frontdoor.py"), "--quick", "--out", str(out)]
    argv += ["--rows", "floor,echo,handwritten,node,gateway", "--concurrency", "8"]
    argv += ["--workdir", str(tmp_path / "work")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert json.loads(out.read_text()) == result

    rows = {(r["row"], r["concurrency"]): r for r in result["rows"]}
    for name in ROWS:
        for c in (8,):
            row = rows[(name, c)]
            assert row["errors"] == 0, row
            assert row["rps"]["median"] > 0, row
            assert row["p50_ms"]["median"] > 0, row
            if name != "floor":
                assert row["cpu_s_per_1k"], row
    for c in (8,):  # the node's multiplexed stream: measured cleanly, or skipped with a reason
        row = rows[("node_stream", c)]
        assert row.get("skipped") or (row["errors"] == 0 and row["rps"]["median"] > 0), row
    assert {"sdk_routed_unary", "sdk_gateway"}.isdisjoint(r for r, _ in rows)
    assert "pinning" in result["notes"]
    assert result["targets"]  # evaluated (most are skipped here: no C=32, no SDK rows)
