"""``bench/rest.py`` runs end to end: a functional smoke, not a timing assertion.

A real mesh (etcd, a control plane with ``--http-listen``, a node), tritonclient.http (JSON and
binary data) and tritonclient.grpc closed loops, one small row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]


def test_a_small_run_measures_every_path_without_errors(tmp_path: Path) -> None:
    out = tmp_path / "rest.json"
    argv = [sys.executable, str(ROOT / "bench" / "rest.py"), "--concurrency", "4", "--runs", "1"]
    argv += ["--count", "200", "--seconds", "2", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=100, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert json.loads(out.read_text()) == result
    row = result["rows"]["4"]
    for path in ("rest_json", "rest_binary", "grpc"):
        assert row[path]["errors"] == 0, row[path]
        assert row[path]["rps"]["median"] > 0, row[path]
    assert set(result["ratios_rps"]["4"]) >= {"rest_json/grpc", "rest_binary/grpc"}
