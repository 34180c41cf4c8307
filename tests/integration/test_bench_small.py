"""``bench/embedded.py``, ``bench/stream_floor.py`` and ``bench/overload.py`` run end to end:
functional smokes, not timing assertions (their figures come from full runs, see
bench/results/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, out: Path) -> dict[str, object]:
    argv = [sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=130, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout)
    assert json.loads(out.read_text()) == result
    return result


def test_the_embedded_bench_measures_both_rows_and_the_idle_member(tmp_path: Path) -> None:
    result = _run("embedded.py", "--quick", out=tmp_path / "embedded.json")
    figures = result["figures"]
    assert isinstance(figures, dict)
    for name in ("floor_p50_us", "embedded_p50_us", "idle_cpu_percent"):
        assert figures[name]["median"] > 0, figures  # measured, whatever the value
    targets = result["targets"]
    assert isinstance(targets, dict) and set(targets) == {
        "added_p50_us",
        "idle_cpu_percent_of_a_core",
    }


def test_the_stream_floor_bench_holds_every_stream_it_counts(tmp_path: Path) -> None:
    result = _run("stream_floor.py", "--counts", "200,400", out=tmp_path / "floor.json")
    for shape in ("read_only", "read_and_writer_task"):
        rows = result[shape]["counts"]  # type: ignore[index]
        assert [r["streams"] for r in rows] == [200, 400], rows
        assert all("error" not in r and r["rss_mb"] > r["idle_rss_mb"] for r in rows), rows


def test_the_overload_bench_measures_both_arms(tmp_path: Path) -> None:
    result = _run("overload.py", "--duration", "1", "--hidden", "256", out=tmp_path / "ov.json")
    assert result["model_ms"] > 0  # type: ignore[operator]
    arms = result["arms"]
    assert isinstance(arms, dict) and set(arms) == {"admission", "no_admission"}
    for arm in arms.values():
        assert arm["peak"]["goodput_rps"] > 0 and arm["peak"]["errors"] == 0, arm
        overload = arm["overload"]
        assert overload["offered_rps"] >= arm["peak"]["goodput_rps"], arm  # 2x the peak
    target = result["target"]
    assert isinstance(target, dict) and target["measured"] == arms["admission"]["goodput_over_peak"]
