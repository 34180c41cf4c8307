"""Embedded mode with real processes (issue 20): an application runs a model in-process through
the SDK (real onnxruntime on real ONNX files) and is a member of a real mesh (real etcd, a real
control plane, a real node for everything else).

One mesh walks through it all, so the suite pays for one start: the answers equal in-process
onnxruntime; the member is listed as ``embedded`` and never placed onto (nor routed to); a shift
in its inputs raises the drift event (and the webhook) at the control plane; feedback joins its
logged predictions; a rollout v1 -> v2 under load swaps with no failed call and the answers
switch to v2, a rollback back to v1; the control plane killed, it keeps answering, buffers its
telemetry (bounded), serves from its cache when started while the control plane is down, and
delivers the buffer once the control plane is back. And with no control plane at all, an
AsyncMeshClient serves from the versions its cache records, with the mesh's validation and errors.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from meshserve.client import AsyncMeshClient, EmbeddedOptions, MeshClient
from meshserve.client._admin import AdminClient
from meshserve.common.errors import InvalidArgument, NotFound, StatusError
from meshserve.common.sketches import build_profile
from meshserve.devtools.demo_models import make_mlp, reference_outputs
from meshserve.devtools.local import LocalMesh, wait_until
from meshserve.protos import mesh_pb2
from tests.integration.test_rollout import meshctl
from tests.support.mesh import register_file, wait_copies
from tests.support.webhook import Hook
from tests.support.workers import Workers

ROWS = 25  # rows per query
WINDOW_ROWS = 250  # one drift window: 10 queries
MAX_QUERIES = 5_000  # per load worker: bounded in count and in time
LOAD_S = 30.0


def _x(rng: np.random.Generator, rows: int = 1, shift: float = 0.0) -> npt.NDArray[np.float32]:
    return (rng.standard_normal((rows, 64)) * (1.0 + shift) + shift).astype(np.float32)


class Load(Workers):
    """Closed loops of embedded queries in threads; every answer is checked against
    onnxruntime in-process for the version it names."""

    def __init__(self, client: MeshClient, expect: dict[str, Path], workers: int = 2) -> None:
        self.client = client
        self.failures: list[str] = []
        self.versions: list[tuple[float, str]] = []
        self.wrong: list[str] = []
        self._expect = expect
        xs = [_x(np.random.default_rng(i)) for i in range(4)]
        self._xs = xs
        self._want = {
            v: [reference_outputs(p, {"x": x})["y"] for x in xs] for v, p in expect.items()
        }
        super().__init__(workers)

    def _run(self, seed: int) -> None:
        end = time.monotonic() + LOAD_S
        for n in range(MAX_QUERIES):
            if self._stop.is_set() or time.monotonic() > end:
                return
            k = (n + seed) % len(self._xs)
            try:
                result = self.client.infer("clf", {"x": self._xs[k]})
            except StatusError as exc:
                self.failures.append(f"{exc.code.name}: {exc.message}")
                continue
            self.versions.append((time.monotonic(), result.variant))
            if not np.allclose(result["y"], self._want[result.variant][k], atol=1e-5):
                self.wrong.append(result.variant)
            time.sleep(0.002)

    def latest(self) -> str:
        return self.versions[-1][1] if self.versions else ""


def test_an_embedded_model_is_a_member_of_the_mesh(tmp_path: Path, webhook: str) -> None:
    paths = {v: make_mlp(tmp_path / f"{v}.onnx", seed=s) for v, s in (("v1", 1), ("v2", 2))}
    other = make_mlp(tmp_path / "other.onnx", seed=3)
    rng = np.random.default_rng(7)
    logging = mesh_pb2.ServingConfig(
        monitoring=mesh_pb2.MonitoringConfig(drift_window_rows=WINDOW_ROWS, log_predictions=True)
    )
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        first = mesh.start_controlplane("cp-1", extra=["--telemetry-interval-ms", "300"])
        cp = first.address
        port = int(cp.rsplit(":", 1)[1])
        mesh.start_node("n1", [cp], direct=True)
        options = EmbeddedOptions(
            member_id="app-1",
            cache_dir=tmp_path / "app",
            telemetry_max_bytes_per_s=16384,
            telemetry_heartbeat_s=1.0,
        )
        with AdminClient(cp) as admin:
            admin.register_model(
                "clf",
                paths["v1"].as_uri(),
                _sha(paths["v1"]),
                version="v1",
                serving=logging,
            )
            register_file(admin, "other", other, copies=3)
            admin.apply_policy(
                "name: watched\nmonitoring:\n  drift_psi_threshold: 0.25\n  drift_windows: 2\n"
                f"  webhook:\n    url: {webhook}\n    min_interval_s: 0\n"
            )
            sample = _x(np.random.default_rng(99), 2000)
            admin.set_drift_profile("clf", "v1", build_profile(sample, None, input_name="x"))
            wait_copies(admin, "other", 1)
            client = MeshClient(cp, timeout=10, embedded=["clf"], member=options)
            try:
                # -- answers: onnxruntime's, in this process, from the member -----------------
                for _ in range(3):
                    x = _x(rng, 4)
                    result = client.infer("clf", {"x": x})
                    want = reference_outputs(paths["v1"], {"x": x})["y"]
                    np.testing.assert_allclose(result["y"], want, atol=1e-6)
                    assert (result.node, result.variant) == ("app-1", "v1")
                # other models go through the mesh, as before
                assert client.infer("other", {"x": _x(rng)}).node == "n1"

                # -- a member of kind embedded, never placed onto ---------------------------
                nodes = {n.node_id: n for n in admin.list_nodes()}
                assert nodes["app-1"].kind == "embedded" and nodes["n1"].kind == ""
                assert [m.model for m in nodes["app-1"].embedded] == ["clf"]
                done = meshctl("nodes", "list", "-t", cp)
                assert done.returncode == 0, done.stderr
                listing = done.stdout
                [line] = [ln for ln in listing.splitlines() if " app-1 " in ln]
                assert " embedded " in line and "clf/v1:READY" in line, listing
                for placement in admin.list_placements():
                    assert "app-1" not in placement.nodes, placement
                assert {n for n, _ in _copies(admin, "other")} == {"n1"}  # 3 wanted, 1 node
                assert {n for n, _ in _copies(admin, "clf")} <= {"n1", "app-1"}

                # -- drift: a shift in the member's inputs raises the event -----------------
                wait_until(
                    lambda: _digest(admin, "app-1", "clf") != "",
                    20,
                    what="the drift reference on the member",
                )
                for _ in range(3 * WINDOW_ROWS // ROWS):
                    client.infer("clf", {"x": _x(rng, ROWS)})
                    time.sleep(0.01)
                assert not [e for e in admin.list_events(200, "drift") if e.model == "clf"]
                events: list[mesh_pb2.Event] = []
                for _ in range(8):  # bounded: 8 shifted windows at most
                    for _ in range(WINDOW_ROWS // ROWS):
                        client.infer("clf", {"x": _x(rng, ROWS, shift=1.5)})
                    time.sleep(0.4)  # > the telemetry interval: one window per tick
                    events = [e for e in admin.list_events(200, "drift") if e.model == "clf"]
                    if events:
                        break
                assert events, "a shifted input distribution raises a drift event"
                wait_until(lambda: Hook.received, 15, what="the webhook call")
                assert Hook.received[0]["event"]["model"] == "clf"

                # -- feedback joins the member's logged predictions -------------------------
                answers = [client.infer("clf", {"x": _x(rng)}) for _ in range(5)]
                assert all(a.request_id for a in answers)
                outcomes = {a.request_id: float(a["y"][0][0]) for a in answers}
                assert client.feedback("clf", outcomes) == 5

                def joined() -> bool:
                    health = {h.variant: h for h in admin.model_health("clf")}
                    return health["v1"].feedback_joined >= 5

                wait_until(joined, 20, what="feedback joined on the member")

                # -- rollout v1 -> v2 under load, then rollback: no failed call ---------------
                with Load(client, paths) as load:
                    wait_until(lambda: len(load.versions) > 20, 10, what="load running")
                    register_file(admin, "clf", paths["v2"], version="v2")
                    admin.rollout("clf", "v2")
                    wait_until(lambda: load.latest() == "v2", 30, what="answers from v2")
                    time.sleep(0.5)
                    assert load.latest() == "v2"
                    wait_until(
                        lambda: (
                            _copies(admin, "clf") & {("app-1", "v2")}
                            and ("app-1", "v1") not in _copies(admin, "clf")
                        ),
                        20,
                        what="v1 unloaded from the member",
                    )
                    admin.rollback("clf")
                    wait_until(lambda: load.latest() == "v1", 30, what="answers from v1 again")
                    time.sleep(0.5)
                assert load.failures == [], load.failures[:5]
                assert load.wrong == [], load.wrong[:5]
                seen = [v for _, v in load.versions]
                assert seen.count("v2") > 0 and seen[-1] == "v1"
                print(f"rollout + rollback under load: {len(seen)} answers, 0 failed")

                # -- autonomy: the control plane killed -------------------------------------
                first.kill()
                wait_until(
                    lambda: (s := client.embedded_status()) is not None and s.linked == 0,
                    15,
                    what="the member unlinked",
                )
                served_offline = 0
                for _ in range(40):
                    assert client.infer("clf", {"x": _x(rng)}).variant == "v1"
                    served_offline += 1
                    time.sleep(0.025)
                status = client.embedded_status()
                assert status is not None and status.buffered > 0, status
            finally:
                client.close()

        # started while the control plane is down: serves from the cached artifact
        client = MeshClient(cp, timeout=10, embedded=["clf"], member=options)
        try:
            x = _x(rng, 2)
            result = client.infer("clf", {"x": x})
            assert (result.node, result.variant) == ("app-1", "v1")
            np.testing.assert_allclose(
                result["y"], reference_outputs(paths["v1"], {"x": x})["y"], atol=1e-6
            )
            for _ in range(20):
                client.infer("clf", {"x": _x(rng)})
            wait_until(  # a summary per telemetry interval (2 s before any Welcome)
                lambda: (s := client.embedded_status()) is not None and s.buffered > 0,
                10,
                what="telemetry buffered while unlinked",
            )
            assert client.embedded_status().linked == 0  # type: ignore[union-attr]
            # the control plane back at the same address: the buffer is delivered
            mesh.start_controlplane("cp-1", port=port, extra=["--telemetry-interval-ms", "300"])
            wait_until(
                lambda: (
                    (s := client.embedded_status()) is not None
                    and s.linked == 1
                    and s.buffered == 0
                ),
                30,
                what="the member relinked, its buffer delivered",
            )
            with AdminClient(cp) as admin:

                def reported() -> int:
                    for n in admin.list_nodes():
                        if n.node_id == "app-1":
                            return sum(m.requests for m in n.telemetry.models)
                    return 0

                wait_until(lambda: reported() >= 21, 20, what="the member's telemetry")
                nodes = {n.node_id: n for n in admin.list_nodes()}
                assert nodes["app-1"].kind == "embedded"
                assert ("app-1", "v1") in _copies(admin, "clf")  # adopted: same sha256
            assert client.infer("clf", {"x": _x(rng)}).variant == "v1"
        finally:
            client.close()


def _sha(path: Path) -> str:
    from meshserve.devtools.demo_models import sha256_file

    return sha256_file(path)


def _copies(admin: AdminClient, model: str) -> set[tuple[str, str]]:
    """(node, variant) of every READY copy of ``model``."""
    return {
        (n.node_id, c.variant)
        for n in admin.list_nodes()
        for c in n.copies
        if c.model == model and c.state == mesh_pb2.READY
    }


def _digest(admin: AdminClient, node: str, model: str) -> str:
    for n in admin.list_nodes():
        if n.node_id == node:
            return next((c.monitoring_digest for c in n.copies if c.model == model), "")
    return ""


async def test_async_client_serves_from_its_cache_with_no_control_plane(tmp_path: Path) -> None:
    """No control plane at all (a port nobody listens on): the member loads the versions its
    cache records and answers through AsyncMeshClient, with the mesh's validation and errors."""
    path = make_mlp(tmp_path / "m.onnx", seed=5)
    cache = tmp_path / "app"
    cache.mkdir()
    load = mesh_pb2.LoadModel(
        model="m", variant="v1", artifact_uri=path.as_uri(), sha256=_sha(path), version="v1"
    )
    record = {"loads": [base64.b64encode(load.SerializeToString()).decode()]}
    (cache / "embedded.json").write_text(json.dumps(record))
    options = EmbeddedOptions(member_id="offline-app", cache_dir=cache)
    client = AsyncMeshClient("127.0.0.1:9", timeout=10, embedded=["m"], member=options)
    try:
        x = _x(np.random.default_rng(1), 3)
        result = await client.infer("m", {"x": x})
        assert (result.node, result.variant, result.model_version) == ("offline-app", "v1", "v1")
        np.testing.assert_allclose(result["y"], reference_outputs(path, {"x": x})["y"], atol=1e-6)
        assert (await client.infer("m", {"x": x}, version="v1")).variant == "v1"
        with pytest.raises(InvalidArgument, match="shape"):
            await client.infer("m", {"x": x[:, :10]})
        with pytest.raises(NotFound, match="v7"):
            await client.infer("m", {"x": x}, version="v7")
        status = client.embedded_status()
        assert status is not None and status.linked == 0
        assert status.serving == {"m": ("v1", ("v1",))}
    finally:
        await client.close()
