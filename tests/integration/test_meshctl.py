"""meshctl as a user runs it: `up` end to end, and the admin commands against a live mesh."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshserve.devtools.demo_models import make_mlp, write_not_onnx
from meshserve.devtools.local import LocalMesh, ManagedProcess

MESHCTL = [sys.executable, "-m", "meshserve.client.cli"]
README = Path(__file__).resolve().parents[2] / "README.md"
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


def meshctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MESHCTL, *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def readme_quick_query() -> str:
    """The README's "a query of your own" block: the quick start's commands after ``make up``
    (which runs ``meshctl up``), checked to be the export line and one query, so that the
    README's first screen reaches a query in three commands."""
    text = README.read_text()
    quick = text[text.index("## Quick start") :]
    blocks: list[str] = re.findall(r"^```bash\n(.*?)^```$", quick, re.MULTILINE | re.DOTALL)
    first, second = blocks[:2]
    assert first.splitlines()[0].split("#")[0].split() == ["make", "up"]
    commands = [line for line in second.splitlines() if line.split("#")[0].strip()]
    assert len(commands) == 2 and commands[0].startswith("export MESHSERVE_TARGET="), commands
    return second


def test_up_runs_a_mesh_answers_queries_and_stops_everything(tmp_path: Path) -> None:
    """`meshctl up` with metrics and console traces: the export line names the control plane,
    each printed /metrics endpoint answers while it runs, the README's quick-start query (its
    export line with the printed address) answers from a second shell, every demo query left
    its gateway or node spans in the logs (an exporter with no sampler samples everything),
    and after SIGTERM nothing is left running."""
    args = ["up", "--duration", "120", "--queries", "6", "--workdir", str(tmp_path)]
    args += ["--metrics-listen", "127.0.0.1:0", "--trace", "console"]
    env = {**ENV, "PYTHONUNBUFFERED": "1", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    env.pop("OTEL_TRACES_SAMPLER", None)
    proc = subprocess.Popen(
        [*MESHCTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    killer = threading.Timer(240, proc.kill)  # bounds the reads below
    killer.start()
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:  # up to the export line, printed once the mesh is up
            lines.append(line)
            if line.startswith("export MESHSERVE_TARGET="):
                break
        urls = [w for line in lines if line.startswith("metrics:") for w in line.split()[2:]]
        assert len(urls) == 3, "".join(lines)
        for url in urls:  # loopback only
            with urllib.request.urlopen(url, timeout=10) as answer:
                assert b"# TYPE" in answer.read()
        [map_url] = {w for line in lines if "live map" in line for w in line.split()[-1:]}
        assert map_url.startswith("http://127.0.0.1:"), map_url  # `up` turns the map on
        with urllib.request.urlopen(map_url + "api/state", timeout=10) as answer:
            view = json.loads(answer.read())
        assert {n["id"] for n in view["nodes"]} == {"core-1", "edge-1"}
        with urllib.request.urlopen(map_url, timeout=10) as answer:
            assert b"meshserve" in answer.read()  # the page itself
        # The README's second shell, as written but for the address `up` printed and the
        # virtualenv's python (the README's .venv/bin/ is the checkout's).
        [export] = [line.strip() for line in lines if line.startswith("export MESHSERVE_TARGET=")]
        block = readme_quick_query().replace("export MESHSERVE_TARGET=127.0.0.1:PORT", export)
        block = block.replace(".venv/bin/python", sys.executable)
        query = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            capture_output=True,
            text=True,
            timeout=60,
            env=ENV,
        )
        assert query.returncode == 0, query.stdout + query.stderr
        assert re.fullmatch(r"\[\[[-0-9.e\s]+\]\]\n", query.stdout), query.stdout  # 1 x 10 scores
        proc.send_signal(signal.SIGTERM)  # stops as at the end of --duration
        rest, err = proc.communicate(timeout=120)
    finally:
        killer.cancel()
        if proc.poll() is None:  # a failed check above: stop the mesh, not in 120 s
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    [cp_line] = [line for line in out.splitlines() if "control plane" in line]
    address = cp_line.split()[-1]
    assert f"\nexport MESHSERVE_TARGET={address}\n" in out
    assert "core-1" in out and "edge-1" in out
    assert out.count("yes") == 6 and " NO " not in out
    assert "nothing left running" in out
    spans = sum(
        (tmp_path / f"{name}.log").read_text(errors="replace").count('"name": "gateway ModelInfer"')
        + (tmp_path / f"{name}.log").read_text(errors="replace").count('"name": "node ModelInfer"')
        for name in ("cp-1", "core-1", "edge-1")
    )
    assert spans >= 6, "every query is traced when an exporter is set and no sampler"
    # No process of that mesh survives: nothing references its work directory any more.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    work = tmp_path_factory.mktemp("meshctl")
    with LocalMesh(work) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        mesh.start_node("edge-1", [cp.address], labels={"tier": "edge"})
        yield cp


def test_register_waits_for_ready_copies_and_lists_show_them(
    live: ManagedProcess, tmp_path: Path
) -> None:
    model = make_mlp(tmp_path / "mlp.onnx")
    proc = meshctl(
        "models",
        "register",
        "mlp",
        "--artifact",
        str(model),
        "--batching",
        "--target",
        live.address,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 copy ready" in proc.stdout
    nodes = meshctl("nodes", "list", "--target", live.address)
    assert "edge-1" in nodes.stdout and "mlp/default:READY" in nodes.stdout
    placements = meshctl("placements", "list", "--target", live.address)
    assert "mlp" in placements.stdout and "edge-1" in placements.stdout


def test_register_of_a_broken_artifact_fails_with_the_reason(
    live: ManagedProcess, tmp_path: Path
) -> None:
    bad = write_not_onnx(tmp_path / "bad.onnx")
    proc = meshctl(
        "models",
        "register",
        "bad",
        "--artifact",
        str(bad),
        "--timeout",
        "60",
        "--target",
        live.address,
    )
    assert proc.returncode == 1
    assert "not a loadable ONNX model" in proc.stderr


def test_invalid_registration_is_refused_with_a_clear_message(live: ManagedProcess) -> None:
    proc = meshctl(
        "models",
        "register",
        "x",
        "--artifact",
        "ftp://host/m.onnx",
        "--sha256",
        "ab" * 32,
        "--target",
        live.address,
    )
    assert proc.returncode == 1
    assert "INVALID_ARGUMENT" in proc.stderr and "file://, http:// or https://" in proc.stderr


def test_policy_validate_apply_get_explain_and_events(live: ManagedProcess, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndefault:\n  filters: [fits_memory, teleport]\n")
    proc = meshctl("policy", "validate", str(bad), "--target", live.address)
    assert proc.returncode == 1
    assert "line 3" in proc.stderr and "teleport" in proc.stderr, proc.stderr
    proc = meshctl("policy", "apply", str(bad), "--target", live.address)
    assert proc.returncode == 1 and "INVALID_ARGUMENT" in proc.stderr and "line 3" in proc.stderr
    example = Path(__file__).parents[2] / "deploy" / "policies" / "edge-first.yaml"
    proc = meshctl("policy", "validate", str(example), "--target", live.address)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = meshctl("policy", "apply", str(example), "--target", live.address)
    assert proc.returncode == 0 and "applied" in proc.stdout, proc.stdout + proc.stderr
    proc = meshctl("policy", "get", "--target", live.address)
    assert proc.stdout == example.read_text()
    model = make_mlp(tmp_path / "mlp.onnx")
    proc = meshctl(
        "models", "register", "explained", "--artifact", str(model), "--target", live.address
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = meshctl("explain", "placement", "explained", "--target", live.address)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "edge-1" in proc.stdout and "selected" in proc.stdout and "edge-first" in proc.stdout
    proc = meshctl("explain", "placement", "nope", "--target", live.address)
    assert proc.returncode == 1 and "NOT_FOUND" in proc.stderr and not proc.stdout
    proc = meshctl("events", "--kind", "policy", "--target", live.address)
    assert proc.returncode == 0 and "edge-first" in proc.stdout, proc.stdout


def test_models_evaluate_measures_and_stores_accuracy(live: ManagedProcess, tmp_path: Path) -> None:
    import numpy as np

    from meshserve.client._admin import AdminClient
    from meshserve.devtools.demo_models import reference_outputs

    model = make_mlp(tmp_path / "mlp.onnx")
    proc = meshctl(
        "models", "register", "graded", "--artifact", str(model), "--target", live.address
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    x = np.random.default_rng(8).standard_normal((100, 64)).astype(np.float32)
    y = reference_outputs(model, {"x": x})["y"].argmax(axis=1)
    y[:25] = (y[:25] + 1) % 10  # exactly 75 of 100 labels agree with the model
    np.savez(tmp_path / "labelled.npz", x=x, y=y)
    proc = meshctl(
        "models",
        "evaluate",
        "graded",
        "--data",
        str(tmp_path / "labelled.npz"),
        "--batch",
        "32",
        "--target",
        live.address,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "accuracy 0.7500 on 100" in proc.stdout
    with AdminClient(live.address) as admin:
        [spec] = [m for m in admin.list_models() if m.name == "graded"]
    assert spec.accuracy == 0.75
    proc = meshctl(
        "models", "evaluate", "graded", "--data", str(tmp_path / "nope.npz"), "-t", live.address
    )
    assert proc.returncode == 2 and "cannot read" in proc.stderr


def test_list_switching_drain_remove_and_unreadable_credentials(
    live: ManagedProcess, tmp_path: Path
) -> None:
    model = make_mlp(tmp_path / "mlp.onnx")
    proc = meshctl("models", "register", "listed", "--artifact", str(model), "-t", live.address)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = meshctl("models", "list", "-t", live.address)
    assert proc.returncode == 0 and "listed" in proc.stdout and "default" in proc.stdout
    proc = meshctl("explain", "switching", "listed", "--slo-ms", "50", "-t", live.address)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SLO 50.0 ms" in proc.stdout and "default" in proc.stdout
    proc = meshctl("nodes", "drain", "edge-1", "-t", live.address)
    assert proc.returncode == 0 and "node edge-1: draining" in proc.stdout, proc.stdout
    proc = meshctl("nodes", "drain", "edge-1", "--undo", "-t", live.address)
    assert proc.returncode == 0 and "node edge-1: serving" in proc.stdout, proc.stdout
    proc = meshctl("models", "remove", "listed", "-t", live.address)
    assert proc.returncode == 0 and "removed 1 variant(s)" in proc.stdout, proc.stdout
    proc = meshctl("models", "list", "-t", live.address)
    assert proc.returncode == 0 and "listed" not in proc.stdout
    proc = meshctl("models", "remove", "no such/name", "-t", live.address)
    assert proc.returncode == 1 and "INVALID_ARGUMENT" in proc.stderr, proc.stderr
    missing = tmp_path / "no-token"
    proc = meshctl("--admin-token-file", str(missing), "nodes", "list", "-t", live.address)
    assert proc.returncode == 2 and "cannot read admin token file" in proc.stderr, proc.stderr


def test_up_refuses_bad_metrics_and_trace_options_before_starting_anything(
    tmp_path: Path,
) -> None:
    import importlib.util

    proc = meshctl("up", "--metrics-listen", "nowhere:port", "--workdir", str(tmp_path))
    assert proc.returncode == 2 and "--metrics-listen" in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir()), "nothing was started"
    if importlib.util.find_spec("opentelemetry.exporter.otlp") is None:
        proc = meshctl("up", "--trace", "otlp", "--workdir", str(tmp_path))
        assert proc.returncode == 2 and "meshserve[otlp]" in proc.stderr, proc.stderr
    proc = meshctl("up", "--trace", "jaeger-ui", "--workdir", str(tmp_path))
    assert proc.returncode == 2 and "jaeger-ui" in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())
