"""``bench/ui.py --quick`` runs end to end: a real mesh, a real Chromium tab on the live map
(with and without reduced motion) and a plain SSE reader, one A/B pair each; the JSON has the
rows, positive req/s on both sides, pushes received while the page was open, and no errors.
Measures nothing (a smoke test: a 3-second segment on a shared machine means little)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser.conftest import CHROMIUM

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[2]


def test_bench_ui_quick(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"no browser at {CHROMIUM}: `make test` installs Debian's chromium")
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)")
    out = tmp_path / "ui.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ui.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert json.loads(done.stdout) == result
    assert result["benchmark"] == "ui"
    assert set(result["rows"]) == {"browser", "browser_reduced_motion", "sse_reader"}
    for name, row in result["rows"].items():
        assert row["pairs"] == 1, name
        assert row["errors"] == 0, (name, result["raw_pairs"][name])
        assert row["rps_a"]["median"] > 0 and row["rps_b"]["median"] > 0, (name, row)
        assert "cost <= 3%" in row["target"], name
        (pair,) = result["raw_pairs"][name]
        assert pair["b"]["page_states"] >= 1, (name, pair["b"])  # the page was live
        assert pair["a"]["errors"] == 0 and pair["b"]["errors"] == 0, (name, pair)
    assert set(result["idle"]) == {"none", "sse_reader", "browser"}
    assert all(s["page_states"] >= 1 for s in result["idle"]["sse_reader"]["segments"])
    for name in ("browser", "browser_reduced_motion"):
        assert result["raw_pairs"][name][0]["b"]["page_live_at_end"] is True, name
