"""Monitoring with real processes: prediction logging joined with feedback gives the true accuracy
of the served answers per variant; drift sketches raise no alarm on the reference distribution
and one on a shifted distribution (event + webhook); only sketches leave the node (wire bytes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshserve.client import MeshClient
from meshserve.client._admin import AdminClient
from meshserve.devtools.demo_models import digits_split, digits_to_onnx, make_mlp, sha256_file
from meshserve.devtools.local import LocalMesh, wait_until
from meshserve.protos import mesh_pb2
from tests.support.mesh import wait_copies
from tests.support.webhook import Hook as _Hook

ROWS_PER_QUERY = 25
WINDOW_ROWS = 250


def _digits_variants(directory: Path) -> dict[str, Path]:
    """Two quick digits classifiers as ONNX (input x FP32 [n, 64]; outputs label, probabilities)."""
    from sklearn.ensemble import RandomForestClassifier  # type: ignore[import-untyped]
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    x_tr, _, y_tr, _ = digits_split(0)
    out = {}
    for name, clf in (
        ("linear", LogisticRegression(max_iter=300)),
        ("forest", RandomForestClassifier(n_estimators=4, max_depth=4, random_state=0)),
    ):
        clf.fit(x_tr, y_tr)
        out[name] = digits_to_onnx(clf, directory / f"digits-{name}.onnx")
    return out


def test_feedback_accuracy_equals_the_true_accuracy_of_served_answers(tmp_path: Path) -> None:
    variants = _digits_variants(tmp_path)
    _, x_te, _, y_te = digits_split(0)
    n = 120
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=["--telemetry-interval-ms", "300"])
        mesh.start_node("n1", [cp.address])
        serving = mesh_pb2.ServingConfig(
            monitoring=mesh_pb2.MonitoringConfig(log_predictions=True, label_output="label")
        )
        with AdminClient(cp.address) as admin:
            for variant, path in variants.items():
                admin.register_model(
                    "digits", path.as_uri(), sha256_file(path), variant=variant, serving=serving
                )
            wait_copies(admin, "digits", 2)  # both variants
            served: dict[str, float] = {}
            with MeshClient(cp.address, timeout=10) as client:
                for variant in variants:
                    outcomes: dict[str, int] = {}
                    correct = 0
                    for i in range(n):
                        result = client.infer("digits", {"x": x_te[i : i + 1]}, version=variant)
                        assert result.request_id, "a logged answer carries its request id"
                        correct += int(result["label"][0] == y_te[i])
                        outcomes[result.request_id] = int(y_te[i])
                    served[variant] = correct / n
                    assert client.feedback("digits", outcomes) == n
            assert served["linear"] != served["forest"], "the two variants differ"

            def joined() -> dict[str, mesh_pb2.VariantHealth] | None:
                health = {v.variant: v for v in admin.model_health("digits")}
                done = all(health[v].feedback_joined == n for v in variants)
                return health if done else None

            health = wait_until(joined, 20, what="feedback joined on the node")
            for variant in variants:
                assert health[variant].accuracy == pytest.approx(served[variant], abs=1e-12)
                assert health[variant].predictions_logged == n

            def logged() -> list[dict[str, Any]]:
                files = (tmp_path / "n1-cache" / "predictions").glob("predictions-*.jsonl")
                lines = [line for f in files for line in f.read_text().splitlines()]
                return [json.loads(line) for line in lines] if len(lines) == 2 * n else []

            records = wait_until(logged, 10, what="every prediction in the log files")
            assert {r["variant"] for r in records} == set(variants)
            assert records[0]["inputs"]["x"]["shape"] == [1, 64], "inputs summarised by default"


class _Tap:
    """A loopback TCP relay between a node and a control plane that keeps every byte each way."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.up = bytearray()  # node -> control plane
        self.down = bytearray()  # control plane -> node
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream)
            except OSError:  # the control plane is gone (teardown): the node retries elsewhere
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, server, self.up), daemon=True).start()
            threading.Thread(
                target=self._pipe, args=(server, client, self.down), daemon=True
            ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, log: bytearray) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    log.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


def _send_windows(client: MeshClient, windows: int, make: Any, rng: np.random.Generator) -> None:
    """``windows`` sketch windows of rows from ``make``, paced so each one reaches telemetry."""
    for _ in range(windows):
        for _ in range(WINDOW_ROWS // ROWS_PER_QUERY):
            client.infer("mlp", {"x": make(rng)})
        time.sleep(0.4)  # > the telemetry interval: one window per tick


def test_drift_alarms_on_a_shift_only_and_only_sketches_leave_the_node(
    tmp_path: Path, webhook: str
) -> None:
    model = make_mlp(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(11)

    def reference(r: np.random.Generator) -> np.ndarray:
        return r.standard_normal((ROWS_PER_QUERY, 64)).astype(np.float32)

    def shifted(r: np.random.Generator) -> np.ndarray:
        return (r.standard_normal((ROWS_PER_QUERY, 64)) * 2.0 + 1.0).astype(np.float32)

    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=["--telemetry-interval-ms", "300"])
        tap = _Tap(cp.address)
        # Tunnel only: every byte passes the tap. Windows every 0.4 s need more than the
        # default telemetry budget (2 KiB/s fits one 64-feature window per second).
        mesh.start_node("n1", [tap.address], extra=["--telemetry-max-bytes-per-s", "8192"])
        serving = mesh_pb2.ServingConfig(
            monitoring=mesh_pb2.MonitoringConfig(drift_window_rows=WINDOW_ROWS)
        )
        with AdminClient(cp.address) as admin:
            admin.register_model("mlp", model.as_uri(), sha256_file(model), serving=serving)
            wait_copies(admin, "mlp", 1)
            admin.apply_policy(
                "name: watched\nmonitoring:\n  drift_psi_threshold: 0.25\n  drift_windows: 2\n"
                f"  webhook:\n    url: {webhook}\n    min_interval_s: 0\n"
            )
            sample = tmp_path / "sample.npz"
            np.savez(sample, x=rng.standard_normal((2000, 64)).astype(np.float32))
            env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
            proc = subprocess.run(
                [sys.executable, "-m", "meshserve.client.cli", "model", "profile", "mlp",
                 "--data", str(sample), "--target", cp.address],
                capture_output=True, text=True, timeout=120, env=env,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "64 features" in proc.stdout

            def profiled() -> bool:  # the node applied the new reference
                copies = [c for n in admin.list_nodes() for c in n.copies if c.model == "mlp"]
                spec = next(m for m in admin.list_models() if m.name == "mlp")
                return (
                    bool(copies)
                    and copies[0].monitoring_digest != ""
                    and bool(spec.drift_reference.features)
                )

            wait_until(profiled, 20, what="the drift reference on the node")
            time.sleep(1.0)
            with MeshClient(cp.address, timeout=10) as client:
                client.infer("mlp", {"x": reference(rng)})  # flush a window started before
                calm_windows = 30
                _send_windows(client, calm_windows, reference, rng)
                calm = admin.model_health("mlp")[0]
                assert calm.windows >= calm_windows * 0.7, f"windows scored: {calm.windows}"
                assert not calm.drifting and calm.max_feature_psi < 0.25
                assert not [e for e in admin.list_events(200, "drift") if e.model == "mlp"]
                print(
                    f"calm: {calm.windows} windows, 0 alarms, max feature PSI "
                    f"{calm.max_feature_psi:.3f}, output PSI {calm.output_psi:.3f}"
                )
                before = calm.windows
                sent, events = 0, []
                while not events and sent < 6:  # bounded: 6 shifted windows at most
                    _send_windows(client, 1, shifted, rng)
                    sent += 1
                    events = [e for e in admin.list_events(200, "drift") if e.model == "mlp"]
                assert events, "a shifted distribution raises a drift event"
                shift = admin.model_health("mlp")[0]
                assert shift.drifting and shift.max_feature_psi > 0.25
                assert shift.windows - before <= 3, "raised within the bound (2 windows + 1)"
                print(f"shift: alarm after {sent} windows sent ({shift.windows - before} scored)")
            wait_until(lambda: _Hook.received, 15, what="the webhook call")
            posted = _Hook.received[0]["event"]
            assert posted["kind"] == "drift" and posted["model"] == "mlp"
        # Only sketches left the node: the raw rows cross the tap towards the node (tunneled
        # queries), never back. Probe for a distinctive row sent after the shift.
        marker = np.full((1, 64), 1234.5678, dtype=np.float32)
        with MeshClient(cp.address, timeout=10) as client:
            for _ in range(WINDOW_ROWS + 5):
                client.infer("mlp", {"x": marker})
        time.sleep(1.0)
        probe = marker.tobytes()[:32]
        assert probe in tap.down, "the tap sees raw inputs going to the node"
        assert probe not in tap.up, "raw inputs never go back to the control plane"
        tap.close()
