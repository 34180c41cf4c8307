"""Telemetry bandwidth with real processes: the bytes a node sends per second stay under its
budget and do not grow with the query rate; an idle node sends nothing but heartbeats while a
busy copy's figures reach the control plane every interval (telemetry on change); summaries made
while the control plane is away are sent when it comes back.

The node logs ``telemetry: X bytes in Y s to ADDR (N messages; ...`` every ``--telemetry-log-s``;
the test reads that from the node's log (the control plane does not count what it receives).
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
_MESSAGES = re.compile(r"telemetry: (\d+) bytes in ([\d.]+) s to \S+ \((\d+) messages;")


def _windows(node: ManagedProcess) -> list[tuple[int, float]]:
    """Every (bytes, seconds) window the node has logged so far."""
    text = node.log_path.read_text(errors="replace")
    return [(int(m.group(1)), float(m.group(2))) for m in _LINE.finditer(text)]


def _counted(node: ManagedProcess) -> list[tuple[int, float, int]]:
    """Every (bytes, seconds, messages) window the node has logged so far."""
    text = node.log_path.read_text(errors="replace")
    return [(int(m.group(1)), float(m.group(2)), int(m.group(3))) for m in _MESSAGES.finditer(text)]


def _rates(windows: list[tuple[int, float, int]]) -> tuple[float, float]:
    """(messages/s, bytes/s) over ``windows``."""
    seconds = sum(s for _, s, _ in windows)
    return sum(m for _, _, m in windows) / seconds, sum(b for b, _, _ in windows) / seconds


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


def _copy_requests(admin: AdminClient, node_id: str, model: str) -> int | None:
    """The requests counter of ``node_id``'s copy of ``model`` in the control plane's view of
    its telemetry (None: no entry)."""
    for node in admin.list_nodes():
        if node.node_id == node_id:
            for m in node.telemetry.models:
                if m.model == model:
                    return int(m.requests)
    return None


def test_an_idle_node_sends_only_heartbeats_and_a_busy_copy_every_interval(
    tmp_path: Path,
) -> None:
    interval_s, heartbeat_s = 0.2, 3.0
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=["--telemetry-interval-ms", "200"])
        node = mesh.start_node(
            "n1",
            [cp.address],
            extra=["--telemetry-heartbeat-s", str(heartbeat_s), "--telemetry-log-s", "1"],
        )
        model = make_mlp(tmp_path / "mlp.onnx")
        with AdminClient(cp.address) as admin, MeshClient(cp.address, timeout=10) as client:
            register_file(admin, "mlp", model)
            wait_copies(admin, "mlp", 1)
            sent = 0
            for _ in range(20):  # warm the path up
                client.infer("mlp", {"x": X})
                sent += 1
            wait_until(lambda: _copy_requests(admin, "n1", "mlp") == sent, 10, what="warm-up")

            before = len(_counted(node))
            time.sleep(9.5)  # idle
            idle = _counted(node)[before + 2 :]  # past the warm-up's last reports
            assert len(idle) >= 5, f"too few telemetry log lines while idle: {idle}"
            idle_mps, idle_bps = _rates(idle)

            before = len(_counted(node))
            began = time.monotonic()
            while time.monotonic() - began < 5.0:  # ~20 queries/s, every tick has news
                client.infer("mlp", {"x": X})
                sent += 1
                time.sleep(0.05)
            busy = _counted(node)[before + 1 :]  # the first window began before the phase
            assert len(busy) >= 3, f"too few telemetry log lines while busy: {busy}"
            busy_mps, busy_bps = _rates(busy)
            # the busy copy's last figures reach the control plane within about an interval
            reached = time.monotonic()
            wait_until(
                lambda: _copy_requests(admin, "n1", "mlp") == sent, 10, what="the last figures"
            )
            lag = time.monotonic() - reached
            time.sleep(2.0)  # idle again: nothing resent, the figures are kept
            assert _copy_requests(admin, "n1", "mlp") == sent
        print(
            f"\ntelemetry on change (interval {interval_s} s, heartbeat {heartbeat_s} s): idle "
            f"{idle_mps:.2f} messages/s {idle_bps:.0f} B/s; busy {busy_mps:.2f} messages/s "
            f"{busy_bps:.0f} B/s; last figures seen {lag:.2f} s after the last query"
        )
        # heartbeats only, one per 3 s: 0.33/s (slack: a header-only report when the node's cpu
        # or memory jumps); every tick, as before on-change telemetry, would be 5/s
        assert 0 < idle_mps <= 1 / heartbeat_s + 0.4, idle
        assert busy_mps >= 0.8 / interval_s, f"a busy copy must go every interval: {busy}"
        assert lag < 2.0
