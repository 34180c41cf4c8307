"""meshctl for scripts, as a user runs it (the real ``meshctl`` in a subprocess, piped) against
one real mesh (etcd, a control plane, a direct node and a tunnel-only one): ``-o json`` prints
the records alone on stdout with the keys docs/meshctl.md documents, ``-o yaml`` parses, errors
go to stderr with a non-zero exit code, piped tables fold instead of cutting a cell off,
``--version``, shell completion, and the status columns (state, memory, ready/desired with the
under-replication mark)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshserve.client._admin import AdminClient
from meshserve.devtools.demo_models import make_mlp
from meshserve.devtools.local import LocalMesh, wait_until
from tests.support.mesh import register_file, wait_copies

MESHCTL = [sys.executable, "-m", "meshserve.client.cli"]
DOCS = Path(__file__).parents[2] / "docs" / "meshctl.md"

#: The documented schema of each read command: its top-level keys, then per list (by its key)
#: the keys of every item. docs/meshctl.md names each of them.
NODE = {
    "node_id", "kind", "state", "draining", "labels", "claimed_labels", "direct_address",
    "replicas", "memory_used_bytes", "memory_total_bytes", "copies",
}  # fmt: skip
COPY = {"model", "variant", "state"}
PLACEMENT = {
    "model", "variant", "desired", "ready", "under_replicated", "nodes", "still_served_by",
    "failures",
}  # fmt: skip
MODEL = {
    "name", "version", "variant", "aliases", "accuracy", "copies", "artifact_uri", "sha256",
    "size_bytes", "node_selector", "slo_ms", "registered_at",
}  # fmt: skip
ALIAS = {
    "alias", "version", "serving", "canary_version", "canary_percent", "canary_active",
    "previous_version", "versions", "reason",
}  # fmt: skip
READINESS = {"version", "variants", "ready", "wanted"}
HEALTH = {
    "variant", "accuracy", "feedback_joined", "feedback_correct", "predictions_logged",
    "registered_accuracy", "mean_abs_error", "windows", "output_psi", "max_feature_psi",
    "drifting", "reference_source", "features",
}  # fmt: skip
EVENT = {"seq", "unix_ms", "time", "kind", "model", "variant", "node_id", "message", "replica_id"}
EXPLAINED = {"model", "variant", "desired_copies", "placed", "policy", "nodes"}
VERDICT = {"node_id", "feasible", "selected", "score", "scores", "filtered_by", "reason"}
SWITCHING = {"model", "version", "route", "slo_ms", "chosen", "reason", "variants"}
PREDICTION = {"variant", "accuracy", "predicted_ms", "ready_copies", "queued", "slowdown"}
POLICY = {"applied", "name", "revision", "policy", "yaml"}

#: command -> (top-level keys, {list key: (item keys, {nested list key: its item keys})})
SCHEMAS: dict[str, tuple[set[str], dict[str, tuple[set[str], dict[str, set[str]]]]]] = {
    "nodes list": ({"nodes"}, {"nodes": (NODE, {"copies": COPY})}),
    "placements list": ({"placements"}, {"placements": (PLACEMENT, {})}),
    "models list": ({"models"}, {"models": (MODEL, {})}),
    "models show mlp": (
        {"name", "variants", "aliases"},
        {"variants": (MODEL, {}), "aliases": (ALIAS, {"versions": READINESS})},
    ),
    "models aliases mlp": ({"aliases"}, {"aliases": (ALIAS, {"versions": READINESS})}),
    "models accuracy mlp": ({"model", "variants"}, {"variants": (HEALTH, {})}),
    "events": ({"events"}, {"events": (EVENT, {})}),
    "explain placement mlp": ({"variants"}, {"variants": (EXPLAINED, {"nodes": VERDICT})}),
    "explain switching mlp": (SWITCHING, {"variants": (PREDICTION, {})}),
    "policy get": (POLICY, {}),
}


@dataclass
class Live:
    address: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    work = tmp_path_factory.mktemp("meshctl-output")
    model = make_mlp(work / "mlp.onnx")
    with LocalMesh(work) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        mesh.start_node("core-1", [cp.address], labels={"tier": "core"}, direct=True)
        mesh.start_node("edge-1", [cp.address], labels={"tier": "edge"})
        with AdminClient(cp.address) as admin:
            wait_until(lambda: len(admin.list_nodes()) == 2, 30, what="two nodes")
            register_file(admin, "mlp", model, copies=2)
            register_file(admin, "wide", model, copies=3)  # one copy per node: 2 of 3
            wait_copies(admin, "mlp", 2)
            wait_copies(admin, "wide", 2)
        env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        yield Live(cp.address, {**env, "NO_COLOR": "1", "MESHSERVE_TARGET": cp.address})


def meshctl(live: Live, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The real meshctl, its stdout a pipe (not a terminal), as in `meshctl ... | cat`."""
    return subprocess.run(
        [*MESHCTL, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**live.env, **env},
    )


def _check_keys(where: str, record: dict[str, Any], keys: set[str]) -> None:
    assert set(record) == keys, f"{where}: {sorted(set(record) ^ keys)}"


@pytest.mark.parametrize("command", list(SCHEMAS))
def test_json_and_yaml_output_have_the_documented_keys(live: Live, command: str) -> None:
    docs = DOCS.read_text()
    top, lists = SCHEMAS[command]
    out = meshctl(live, *command.split(), "-o", "json")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)  # the whole of stdout: nothing else is printed there
    _check_keys(command, record, top)
    for key, (item_keys, nested) in lists.items():
        items = record[key]
        assert items, f"{command}: {key} is empty"
        for item in items:
            _check_keys(f"{command} {key}[]", item, item_keys)
            for inner, inner_keys in nested.items():
                for sub in item[inner]:
                    _check_keys(f"{command} {key}[].{inner}[]", sub, inner_keys)
    documented = top | {k for item_keys, nested in lists.values() for k in item_keys}
    documented |= {k for _, nested in lists.values() for keys in nested.values() for k in keys}
    assert [k for k in sorted(documented) if f"`{k}`" not in docs] == [], "docs/meshctl.md"
    out = meshctl(live, *command.split(), "-o", "yaml")
    assert out.returncode == 0, out.stderr
    assert set(yaml.safe_load(out.stdout)) == top  # the same record, as YAML


def test_node_and_placement_status(live: Live) -> None:
    nodes = json.loads(meshctl(live, "nodes", "list", "-o", "json").stdout)["nodes"]
    by_id = {n["node_id"]: n for n in nodes}
    assert sorted(by_id) == ["core-1", "edge-1"]
    for n in nodes:
        assert n["state"] == "serving" and n["draining"] is False
        assert n["replicas"] == ["cp-1"]
        assert n["memory_total_bytes"] > 0
        assert (
            n["memory_used_bytes"] is None or 0 < n["memory_used_bytes"] <= n["memory_total_bytes"]
        )
        assert {"model": "mlp", "variant": "default", "state": "READY"} in n["copies"]
    assert by_id["edge-1"]["direct_address"] is None  # tunnel only
    assert by_id["core-1"]["direct_address"].startswith("127.0.0.1:")
    assert by_id["core-1"]["labels"] == {"tier": "core"}
    placements = json.loads(meshctl(live, "placements", "list", "-o", "json").stdout)
    found = {p["model"]: p for p in placements["placements"]}
    assert (found["wide"]["ready"], found["wide"]["desired"]) == (2, 3)
    assert found["wide"]["under_replicated"] is True
    assert (found["mlp"]["ready"], found["mlp"]["desired"], found["mlp"]["under_replicated"]) == (
        2,
        2,
        False,
    )
    table = meshctl(live, "placements", "list", "--model", "wide").stdout
    assert "2/3 under-replicated" in table, table
    assert "ready/desired" in table


def test_piped_tables_keep_every_state_whole(live: Live) -> None:
    """Piped with no COLUMNS: a fixed wide table (every cell whole); piped into a narrow
    COLUMNS: cells fold onto the next line, nothing is cut off with an ellipsis."""
    out = meshctl(live, "nodes", "list")
    assert out.returncode == 0, out.stderr
    for node in ("core-1", "edge-1"):
        [line] = [line for line in out.stdout.splitlines() if f" {node} " in line]
        assert "serving" in line and "mlp/default:READY" in line and "wide/default:READY" in line
        assert " GiB" in line  # memory used/total
    assert "…" not in out.stdout
    narrow = meshctl(live, "nodes", "list", COLUMNS="70")
    assert narrow.returncode == 0, narrow.stderr
    assert "…" not in narrow.stdout and max(map(len, narrow.stdout.splitlines())) <= 70
    for node in ("core-1", "edge-1"):  # its id and state stay whole, other cells fold
        [line] = [line for line in narrow.stdout.splitlines() if f" {node} " in line]
        assert " serving " in line, narrow.stdout


def test_errors_go_to_stderr_with_a_nonzero_exit_and_nothing_on_stdout(live: Live) -> None:
    out = meshctl(live, "explain", "placement", "no-such-model", "-o", "json")
    assert out.returncode == 1 and out.stdout == ""
    assert "NOT_FOUND" in out.stderr
    out = meshctl(live, "models", "show", "no-such-model", "-o", "yaml")
    assert out.returncode == 1 and out.stdout == "" and "NOT_FOUND" in out.stderr
    out = meshctl(live, "nodes", "list", "-o", "xml")
    assert out.returncode == 2 and out.stdout == "" and "xml" in out.stderr


def test_version_and_shell_completion() -> None:
    out = subprocess.run([*MESHCTL, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == f"meshctl {version('meshserve')}\n"
    script = Path(sys.executable).parent / "meshctl"  # the console script a user runs
    out = subprocess.run(
        [str(script), "--show-completion", "bash"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "complete -o default -F _meshctl_completion meshctl" in out.stdout, out.stdout
    # what bash asks when the user presses TAB after `meshctl nodes li`
    asked = {"_MESHCTL_COMPLETE": "complete_bash", "COMP_WORDS": "meshctl nodes li"}
    out = subprocess.run(
        [str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **asked, "COMP_CWORD": "2"},
    )
    assert out.returncode == 0 and out.stdout.split() == ["list"], out.stdout + out.stderr


def test_events_follow_json_prints_one_record_per_line(live: Live) -> None:
    proc = subprocess.Popen(
        [*MESHCTL, "events", "--follow", "--limit", "3", "-o", "json", "--interval-s", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**live.env, "PYTHONUNBUFFERED": "1"},
    )
    killer = threading.Timer(60, proc.kill)  # bounds the reads below
    killer.start()
    try:
        assert proc.stdout is not None
        records = [json.loads(proc.stdout.readline()) for _ in range(3)]
    finally:
        killer.cancel()
        proc.terminate()
        proc.wait(timeout=30)
    for record in records:
        _check_keys("events --follow", record, EVENT)
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)


def test_a_draining_node_keeps_its_state_whole_when_piped(live: Live) -> None:
    """Last in this module: it drains edge-1 (and undrains it)."""
    with AdminClient(live.address) as admin:
        admin.drain_node("edge-1")
        try:
            narrow = meshctl(live, "nodes", "list", COLUMNS="60")
            nodes = json.loads(meshctl(live, "nodes", "list", "-o", "json").stdout)["nodes"]
        finally:
            admin.drain_node("edge-1", undrain=True)
    [line] = [line for line in narrow.stdout.splitlines() if " edge-1 " in line]
    assert " draining " in line and "…" not in narrow.stdout, narrow.stdout
    [edge] = [n for n in nodes if n["node_id"] == "edge-1"]
    assert edge["state"] == "draining" and edge["draining"] is True
