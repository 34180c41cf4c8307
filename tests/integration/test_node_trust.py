"""A node is trusted to compute, not to describe itself (issue 16 §3, §5, §10; §13: the webhook).

A real control plane (as a production replica runs by default: no ``--trust-node-labels``) on a
real etcd, and a *fake node* (tests/support/fake_node.py): a raw gRPC client of the NodeLink
stream that speaks the protocol and lies -- core labels and huge hardware in its Hello, READY
for copies never ordered or with another sha256, telemetry about models it does not hold,
thousands of copies.
Every wait is bounded in time; the fake node's messages are processed in order on its stream, so
a later believed report (or the control plane's answer to it) is the sync point for the lies
sent before it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from meshserve.client import MeshClient
from meshserve.client._admin import AdminClient
from meshserve.common.errors import StatusError
from meshserve.controlplane.link.trust import MAX_CLAIMS
from meshserve.devtools.demo_models import make_mlp, sha256_file
from meshserve.devtools.local import LocalMesh, wait_until
from meshserve.protos import mesh_pb2
from tests.support.fake_node import FakeNode, copies_of, load_of
from tests.support.webhook import Failing, Hook, failing_receiver

GiB = 1 << 30
X = np.zeros((1, 64), dtype=np.float32)
FORGED = "f" * 64


def _meshctl(address: str, *args: str) -> str:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "meshserve.client.cli", *args, "--target", address],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[LocalMesh, str]]:
    with LocalMesh(tmp_path, lease_ttl_s=3, trust_node_labels=False) as local:
        local.start_etcd()
        cp = local.start_controlplane("cp-1")
        yield local, cp.address


def test_a_node_is_not_believed_about_its_labels_or_its_copies(
    mesh: tuple[LocalMesh, str], tmp_path: Path
) -> None:
    _, address = mesh
    model = make_mlp(tmp_path / "mlp.onnx")
    sha = sha256_file(model)
    hello = mesh_pb2.Hello(
        node_id="fake-1",
        labels={"tier": "core", "zone": "a"},
        hardware=mesh_pb2.Hardware(cpu_cores=4096, memory_bytes=4096 * GiB),
        # a copy it never loaded: not registered yet, so nothing to adopt
        copies=[mesh_pb2.CopyStatus(model="core-only", variant="default", state=mesh_pb2.READY)],
    )
    fake = FakeNode(address, hello)
    try:
        fake.wait_for(lambda m: m.HasField("welcome"))
        with AdminClient(address) as admin:
            fake.listed(admin)
            [node] = admin.list_nodes()
            assert dict(node.labels) == {}, "claimed labels are not the node's labels"
            assert dict(node.reported_labels) == {"tier": "core", "zone": "a"}
            admin.register_model("core-only", model.as_uri(), sha, node_selector={"tier": "core"})
            [explained] = admin.explain_placement("core-only")
            assert [(v.node_id, v.filtered_by) for v in explained.nodes] == [
                ("fake-1", "selector")
            ], "a claimed tier=core does not match a core-only selector"
            assert "fake-1" not in [n for p in admin.list_placements() for n in p.nodes]

            # The admin side labels it (meshctl): now it is a core node, and gets its order.
            labelled = _meshctl(
                address, "nodes", "label", "fake-1", "tier=core", "pool=a", "max-memory-mb=64"
            )
            assert "admin labels max-memory-mb=64,pool=a,tier=core" in labelled
            now = admin.label_node("fake-1", remove=["pool"])
            assert now == {"tier": "core", "max-memory-mb": "64"}
            listed = _meshctl(address, "nodes", "list")
            assert "max-memory-mb=64,tier=core claimed:zone=a" in listed, listed
            [node] = admin.list_nodes()
            assert node.hardware.memory_bytes == 64 << 20, "its claim capped by the admin"
            load = fake.wait_for(load_of("core-only"))
            assert load.load.sha256 == sha

            # Lies about copies: READY without the ordered sha256, a copy never ordered.
            fake.status("core-only", mesh_pb2.READY, FORGED)
            fake.status("never-ordered", mesh_pb2.READY, sha)
            fake.status("core-only", mesh_pb2.LOADING, sha)  # the truth, believed: sync point
            wait_until(
                lambda: "core-only" in copies_of(admin, "fake-1"), 20, what="the LOADING report"
            )
            copies = copies_of(admin, "fake-1")
            assert set(copies) == {"core-only"}
            assert copies["core-only"].state == mesh_pb2.LOADING
            assert copies["core-only"].sha256 == sha

            # The admin takes the core label away again: the order is withdrawn.
            seen = len(fake.drain())
            admin.label_node("fake-1", remove=["tier"])
            fake.wait_for(
                lambda m: m.HasField("unload") and m.unload.model == "core-only", since=seen
            )

        # No READY copy anywhere: no query is routed to the fake node.
        with MeshClient(address, timeout=3) as client, pytest.raises(StatusError):
            client.infer("core-only", {"x": X})
        assert not any(m.HasField("infer_request") for m in fake.drain())

    finally:
        fake.close()


def test_invented_copies_and_their_telemetry_are_ignored(
    mesh: tuple[LocalMesh, str], tmp_path: Path
) -> None:
    _, address = mesh
    model = make_mlp(tmp_path / "mlp.onnx")
    sha = sha256_file(model)
    fake = FakeNode(address, mesh_pb2.Hello(node_id="fake-2"))
    try:
        fake.wait_for(lambda m: m.HasField("welcome"))
        with AdminClient(address) as admin:
            fake.listed(admin)
            admin.register_model("real", model.as_uri(), sha)
            fake.wait_for(load_of("real"))
            # 3,000 copies it was never told to hold, each a full report
            for i in range(3000):
                fake.status(f"invented-{i}", mesh_pb2.READY, sha)
            fake.status("real", mesh_pb2.LOADING, sha)  # believed: sync point
            wait_until(lambda: "real" in copies_of(admin, "fake-2"), 30, what="the real report")
            assert set(copies_of(admin, "fake-2")) == {"real"}
            # The invented copies are not in the view; those remembered are told to go, each
            # once, and no more are remembered than MAX_CLAIMS (the rest counted, forgotten).
            fake.wait_for(lambda m: m.HasField("unload"), 30)
            time.sleep(1.0)  # let any further unloads arrive (there must be few)
            unloads = [m.unload.model for m in fake.drain() if m.HasField("unload")]
            assert "real" not in unloads
            assert len(unloads) == len(set(unloads)) <= MAX_CLAIMS, len(unloads)
    finally:
        fake.close()


def _drift(model: str, seq: int, counts: list[int]) -> mesh_pb2.ModelTelemetry:
    window = mesh_pb2.DriftWindow(
        seq=seq, rows=sum(counts), output=mesh_pb2.SketchCounts(counts=counts)
    )
    return mesh_pb2.ModelTelemetry(model=model, variant="default", drift=window)


def test_telemetry_about_copies_not_held_is_ignored(
    mesh: tuple[LocalMesh, str], tmp_path: Path, webhook: str
) -> None:
    _, address = mesh
    model = make_mlp(tmp_path / "mlp.onnx")
    sha = sha256_file(model)
    fake = FakeNode(address, mesh_pb2.Hello(node_id="fake-3"))
    try:
        fake.wait_for(lambda m: m.HasField("welcome"))
        with AdminClient(address) as admin:
            fake.listed(admin)
            admin.apply_policy(
                "name: watched\nmonitoring:\n  capture_windows: 1\n  drift_windows: 1\n"
                f"  webhook:\n    url: {webhook}\n    min_interval_s: 0\n"
            )
            admin.label_node("fake-3", {"pool": "edge"})  # history of other kinds
            admin.register_model("real", model.as_uri(), sha)
            # registered, never placed on the fake node: it may not report on it either
            admin.register_model("elsewhere", model.as_uri(), sha, node_selector={"gpu": "yes"})
            fake.wait_for(load_of("real"))
            fake.report_ready(admin, "real", sha)
            before = {e.kind for e in admin.list_events(1000)}
            assert {"label", "placement"} <= before
            # Drift about 1,200 models it does not hold (a reference window, then a shifted
            # one), feedback about a model it does not hold; the copy it holds drifts too
            # (last in each message): the alarm pipeline's positive control.
            invented = [f"invented-{i}" for i in range(1200)]
            for seq, counts in ((1, [100, 0]), (2, [0, 100])):
                entries = [_drift(name, seq, counts) for name in [*invented, "real"]]
                if seq == 2:
                    entries.insert(
                        0,
                        mesh_pb2.ModelTelemetry(
                            model="elsewhere",
                            variant="default",
                            feedback_joined=500,
                            feedback_correct=0,
                        ),
                    )
                fake.send(telemetry=mesh_pb2.Telemetry(unix_ms=seq, models=entries))
            drifts = wait_until(
                lambda: admin.list_events(1000, kind="drift"), 30, what="the real copy's drift"
            )
            wait_until(lambda: Hook.received, 15, what="the webhook call")
            assert {e.model for e in drifts} == {"real"}
            assert {h["event"]["model"] for h in Hook.received} == {"real"}
            assert {"label", "placement"} <= {e.kind for e in admin.list_events(1000)}
            [elsewhere] = admin.model_health("elsewhere")
            assert elsewhere.accuracy == -1, "no feedback believed from a node not serving it"
            [node] = admin.list_nodes()
            assert {m.model for m in node.telemetry.models} == {"real"}
    finally:
        fake.close()


@pytest.fixture
def failing_webhook() -> Iterator[tuple[str, str]]:
    """A receiver answering 500; its URL, carrying a token in its path and query, and the
    token."""
    token = secrets.token_hex(16)
    with failing_receiver(token) as url:
        yield url, token


def test_a_failing_webhook_is_logged_without_its_url(
    mesh: tuple[LocalMesh, str], tmp_path: Path, failing_webhook: tuple[str, str]
) -> None:
    """Issue 16, Low 13, with a real control plane: a webhook POST that fails is logged by the
    receiver's scheme, host and port only, and GetPolicy returns the URL redacted; the token in
    the URL's path and query is nowhere in the control plane's log."""
    local, address = mesh
    url, token = failing_webhook
    origin = url.split("/hooks/")[0]
    model = make_mlp(tmp_path / "mlp.onnx")
    sha = sha256_file(model)
    fake = FakeNode(address, mesh_pb2.Hello(node_id="fake-4"))
    try:
        fake.wait_for(lambda m: m.HasField("welcome"))
        with AdminClient(address) as admin:
            fake.listed(admin)
            admin.apply_policy(
                "name: watched\nmonitoring:\n  capture_windows: 1\n  drift_windows: 1\n"
                f"  webhook:\n    url: {url}\n    min_interval_s: 0\n    max_retries: 0\n"
            )
            shown = admin.get_policy().yaml
            assert token not in shown and origin in shown, shown
            admin.register_model("real", model.as_uri(), sha)
            fake.wait_for(load_of("real"))
            fake.report_ready(admin, "real", sha)
            for seq, counts in ((1, [100, 0]), (2, [0, 100])):  # a reference, then drift
                fake.send(
                    telemetry=mesh_pb2.Telemetry(unix_ms=seq, models=[_drift("real", seq, counts)])
                )
            wait_until(lambda: admin.list_events(100, kind="drift"), 30, what="the drift event")
        wait_until(lambda: Failing.posts, 15, what="the webhook POST")
        [log] = [p.log_path for p in local.processes if p.name == "cp-1"]

        def dropped() -> list[str]:
            lines = log.read_text(errors="replace").splitlines()
            return [line for line in lines if "webhook" in line and "dropped" in line]

        failures = wait_until(dropped, 15, what="the failed POST's log line")
    finally:
        fake.close()
    assert any(origin in line for line in failures), failures
    assert Failing.posts and all(token in p for p in Failing.posts), "the POST had the URL"
    assert token not in log.read_text(errors="replace"), "the webhook's token in the log"


FLOOD = 40  # telemetry messages of ~100 KiB each, sent back to back: 4 MiB
PAD = [mesh_pb2.ModelTelemetry(model=f"pad-{i}-" + "x" * 1000) for i in range(100)]


def test_a_nodes_telemetry_budget_holds_on_the_control_plane(
    mesh: tuple[LocalMesh, str], tmp_path: Path
) -> None:
    """Issue 16 §5: whatever a node's own budget says, the control plane believes at most its
    budget (64 KiB/s, 1 MiB burst) of a node's telemetry: of 4 MiB sent at once, the first ~1 MiB
    is taken and the rest dropped (logged once)."""
    local, address = mesh
    model = make_mlp(tmp_path / "mlp.onnx")
    sha = sha256_file(model)
    fake = FakeNode(address, mesh_pb2.Hello(node_id="fake-5"))
    try:
        fake.wait_for(lambda m: m.HasField("welcome"))
        with AdminClient(address) as admin:
            fake.listed(admin)
            admin.register_model("real", model.as_uri(), sha)
            admin.register_model("sync", model.as_uri(), sha)
            fake.wait_for(load_of("real"))
            fake.wait_for(load_of("sync"))
            fake.report_ready(admin, "real", sha)
            for i in range(1, FLOOD + 1):  # each names how many were sent so far
                entries = [
                    *PAD,
                    mesh_pb2.ModelTelemetry(model="real", variant="default", requests=i),
                ]
                fake.send(telemetry=mesh_pb2.Telemetry(unix_ms=i, models=entries))
            fake.status("sync", mesh_pb2.LOADING, sha)  # after the flood: sync point
            wait_until(lambda: "sync" in copies_of(admin, "fake-5"), 30, what="the sync report")
            [node] = admin.list_nodes()
            seen = {m.model: m.requests for m in node.telemetry.models}
        [log] = [p.log_path for p in local.processes if p.name == "cp-1"]
        text = log.read_text(errors="replace")
    finally:
        fake.close()
    assert set(seen) == {"real"}, "padding about copies not held is dropped"
    assert 5 <= seen["real"] < FLOOD // 2, f"believed up to message {seen['real']} of {FLOOD}"
    assert "node fake-5: telemetry over its budget" in text
