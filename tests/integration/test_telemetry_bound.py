"""Telemetry bandwidth with real processes: the bytes a node sends per second stay under its
budget and do not grow with the query rate; summaries made while the control plane is away are
sent when it comes back.

The node logs ``telemetry: X bytes in Y s to ADDR`` every ``--telemetry-log-s``; the test reads
that from the node's log (the control plane does not count what it receives).
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
from pathlib import Path

import numpy as np

from meshserve.client import MeshClient
from meshserve.client._admin import AdminClient
from meshserve.devtools.demo_models import make_mlp
from meshserve.devtools.local import LocalMesh, ManagedProcess, wait_until
from tests.support.mesh import register_file, wait_copies

X = np.random.default_rng(7).standard_normal((1, 64)).astype(np.float32)
BOUND = 1500  # --telemetry-max-bytes-per-s
_LINE = re.compile(r"telemetry: (\d+) bytes in ([\d.]+) s to ")


def _windows(node: ManagedProcess) -> list[tuple[int, float]]:
    """Every (bytes, seconds) window the node has logged so far."""
    text = node.log_path.read_text(errors="replace")
    return [(int(m.group(1)), float(m.group(2))) for m in _LINE.finditer(text)]


def _drive(client: MeshClient, rate: float, duration: float, threads: int) -> float:
    """Send ``rate`` queries/s for ``duration`` s from ``threads`` threads, paced; bounded in
    count (rate x duration) and time (duration + 5 s). Returns the rate achieved."""
    total = int(rate * duration)
    per_thread = total // threads
    period = threads / rate
    deadline = time.monotonic() + duration + 5.0
    done = [0]
    lock = threading.Lock()

    def worker(offset: float) -> None:
        start = time.monotonic() + offset
        for i in range(per_thread):
            delay = start + i * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if time.monotonic() > deadline:
                return
            client.infer("mlp", {"x": X})
            with lock:
                done[0] += 1

    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(worker, k * period / threads) for k in range(threads)]
        for f in futures:
            f.result(timeout=duration + 30)
    return done[0] / (time.monotonic() - began)


def _phase(
    node: ManagedProcess, client: MeshClient, rate: float, threads: int
) -> tuple[float, float]:
    """(queries/s achieved, telemetry bytes/s measured over the log windows wholly inside)."""
    before = len(_windows(node))
    achieved = _drive(client, rate, 4.0, threads)
    inside = _windows(node)[before + 1 :]  # the first window began before this phase
    assert len(inside) >= 2, f"too few telemetry log lines during the phase: {inside}"
    sent = sum(b for b, _ in inside)
    seconds = sum(s for _, s in inside)
    return achieved, sent / seconds


def test_telemetry_bytes_stay_bounded_and_flat_across_query_rates(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=["--telemetry-interval-ms", "200"])
        node = mesh.start_node(
            "n1",
            [cp.address],
            extra=["--telemetry-max-bytes-per-s", str(BOUND), "--telemetry-log-s", "1"],
        )
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp.address) as admin:
            register_file(admin, "mlp", model)
            wait_copies(admin, "mlp", 1)
        with MeshClient(cp.address, timeout=10) as client:
            for _ in range(20):  # warm the path up
                client.infer("mlp", {"x": X})
            low_qps, low_bps = _phase(node, client, 20.0, 1)
            high_qps, high_bps = _phase(node, client, 200.0, 4)
        print(
            f"\ntelemetry at {low_qps:.0f} queries/s: {low_bps:.0f} B/s; "
            f"at {high_qps:.0f} queries/s: {high_bps:.0f} B/s (bound {BOUND} B/s)"
        )
        assert high_qps >= 5 * low_qps, f"rates not far enough apart: {low_qps}, {high_qps}"
        assert 0 < low_bps <= BOUND and 0 < high_bps <= BOUND
        assert high_bps <= 1.5 * low_bps, "telemetry grew with the query rate"


def test_summaries_made_offline_are_sent_on_reconnect(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=["--telemetry-interval-ms", "200"])
        port = int(cp.address.rsplit(":", 1)[1])
        node = mesh.start_node("n1", [cp.address], extra=["--telemetry-log-s", "1"])
        wait_until(lambda: "linked to replica cp-1" in node.tail(100), 30, what="the node's link")
        cp.stop()
        time.sleep(2.0)  # ~10 ticks of 200 ms with no control plane
        mesh.start_controlplane("cp-1", port=port, extra=["--telemetry-interval-ms", "200"])
        found = wait_until(
            lambda: re.search(
                r"sending (\d+) telemetry summaries buffered offline", node.tail(200)
            ),
            30,
            what="the buffered summaries to be sent",
        )
        assert int(found.group(1)) >= 3
