"""Monitoring state across a control-plane restart or a leader change (issue 14 §6).

* Alarm episodes live in etcd: the next leader (a fresh replica, nothing in memory) does not
  raise an open episode again, neither from a partial figure nor from the full one; its drift
  state starts *drifting*; a deposed leader cannot clear; the episode clears once.
* Real processes: a mesh with labelled feedback and drift windows whose control plane is killed
  and started again raises no second accuracy or drift event (nor webhook call) and still shows
  *drifting*; ``meshctl events --follow`` keeps running across the restart and prints an event
  recorded after it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meshserve.client import MeshClient
from meshserve.client._admin import AdminClient
from meshserve.common.policy.config import MonitoringSpec
from meshserve.controlplane import keys
from meshserve.controlplane.etcd import PrefixMirror
from meshserve.controlplane.etcd._client import get
from meshserve.controlplane.observe.alarms import Alarms
from meshserve.controlplane.registry import EtcdRegistry
from meshserve.controlplane.snapshot import VariantKey
from meshserve.devtools.demo_models import digits_split, digits_to_onnx, sha256_file
from meshserve.devtools.local import LocalMesh, free_port, wait_until
from meshserve.protos import mesh_pb2
from tests.support.fake_registry import FakeRegistry
from tests.support.inproc import eventually
from tests.support.mesh import wait_copies
from tests.support.recorded import Recorded
from tests.support.webhook import Hook as _Hook

pytestmark = [pytest.mark.integration]


# -- episodes in etcd, two replicas in this process ------------------------------------------


@dataclass
class Replica:
    """One replica's inputs to its :class:`Alarms` (what its hub and election would give)."""

    name: str
    mirror: PrefixMirror
    registry: EtcdRegistry
    telemetry: dict[str, mesh_pb2.Telemetry] = field(default_factory=dict)
    leading: bool = False
    log: Recorded = field(default_factory=Recorded)

    def alarms(self, models: dict[VariantKey, mesh_pb2.ModelSpec]) -> Alarms:
        monitoring = MonitoringSpec(min_accuracy=0.9, min_feedback=50, drift_windows=2)
        return Alarms(
            monitoring=lambda: monitoring,
            models=lambda: models,
            telemetry=lambda: self.telemetry,
            is_leader=lambda: self.leading,
            events=lambda: self.log,
            registry=lambda: self.registry,
            episodes=lambda: (self.mirror.revision, self.mirror.items()),
            replica_id=self.name,
        )


def _feedback(joined: int, correct: int) -> mesh_pb2.Telemetry:
    entry = mesh_pb2.ModelTelemetry(
        model="m", variant="v", feedback_joined=joined, feedback_correct=correct
    )
    return mesh_pb2.Telemetry(models=[entry])


def _drifted(seq: int) -> mesh_pb2.Telemetry:
    window = mesh_pb2.DriftWindow(seq=seq, rows=400, output=mesh_pb2.SketchCounts(counts=[400, 0]))
    return mesh_pb2.Telemetry(
        models=[mesh_pb2.ModelTelemetry(model="m", variant="v", drift=window)]
    )


@pytest.mark.timeout(30)
async def test_an_open_episode_is_not_raised_again_by_the_next_leader_and_clears_once(
    client: Any,
) -> None:
    models = {
        ("m", "v"): mesh_pb2.ModelSpec(
            name="m",
            variant="v",
            drift_reference=mesh_pb2.DriftProfile(output=mesh_pb2.Sketch(counts=[100, 100])),
        )
    }
    registry = EtcdRegistry(client)
    mirrors = [PrefixMirror(client, keys.ALARMS), PrefixMirror(client, keys.ALARMS)]
    for mirror in mirrors:
        await mirror.start()
    try:
        first = Replica("cp-1", mirrors[0], registry, leading=True)
        await client.put(keys.LEADER.encode(), b"cp-1")
        a1 = first.alarms(models)
        # n1: 226 labelled, 191 right; n2: 74 labelled, 2 right -> 193/300 = 0.6433
        first.telemetry = {"n1": _feedback(226, 191), "n2": _feedback(74, 2)}
        a1.check_accuracy()
        a1.on_telemetry("n1", _drifted(1))
        a1.on_telemetry("n1", _drifted(2))
        await eventually(lambda: len(first.log.events) == 2, 5, "both alarms recorded")
        assert sorted(e[0] for e in first.log.events) == ["accuracy", "drift"]
        accuracy = next(e for e in first.log.events if e[0] == "accuracy")
        assert "0.6433 < 0.9 over 300 labelled" in accuracy[3]
        await eventually(lambda: len(mirrors[1].items()) == 2, 5, "both episodes in etcd")

        # The leader dies; a fresh replica (nothing in memory) takes the lead, and only n1 has
        # linked to it so far: 191/226 = 0.8451, a partial figure.
        first.leading = False
        await client.put(keys.LEADER.encode(), b"cp-2")
        second = Replica("cp-2", mirrors[1], registry, leading=True)
        a2 = second.alarms(models)
        second.telemetry = {"n1": _feedback(226, 191)}
        a2.check_accuracy()
        a2.on_telemetry("n1", _drifted(3))
        assert a2.health.drift[("m", "v")].drifting, "the drift episode is open in etcd"
        a2.on_telemetry("n1", _drifted(4))
        second.telemetry = {"n1": _feedback(226, 191), "n2": _feedback(74, 2)}
        a2.check_accuracy()
        # a partial figure above the minimum clears nothing either
        second.telemetry = {"n1": _feedback(226, 215)}
        a2.check_accuracy()
        await a2.close()
        assert second.log.events == [], "no second event for an open episode"
        assert len(mirrors[1].items()) == 2

        # The deposed leader still believes it leads and sees a good figure: refused in etcd.
        first.leading = True
        first.telemetry = {"n1": _feedback(300, 290), "n2": _feedback(100, 99)}
        a1.check_accuracy()
        await a1.close()
        assert len(first.log.events) == 2, "a replica that no longer leads clears nothing"
        first.leading = False

        # Back above the minimum with the whole figure: cleared once.
        second.telemetry = {"n1": _feedback(300, 290), "n2": _feedback(100, 99)}
        a2.check_accuracy()
        await a2.close()
        await eventually(lambda: len(mirrors[1].items()) == 1, 5, "the accuracy episode closed")
        a2.check_accuracy()
        await a2.close()
        assert [(e[0], e[3].split(" over")[0]) for e in second.log.events] == [
            ("accuracy", "live accuracy back to 0.9725")
        ]
    finally:
        for mirror in mirrors:
            await mirror.close()


def _window(seq: int, counts: list[int]) -> mesh_pb2.Telemetry:
    window = mesh_pb2.DriftWindow(
        seq=seq, rows=sum(counts), output=mesh_pb2.SketchCounts(counts=counts)
    )
    return mesh_pb2.Telemetry(
        models=[mesh_pb2.ModelTelemetry(model="m", variant="v", drift=window)]
    )


@pytest.mark.timeout(30)
async def test_a_reference_captured_from_production_outlives_the_replica(client: Any) -> None:
    registry = EtcdRegistry(client)
    await registry.register_model(mesh_pb2.ModelSpec(name="m", variant="v", artifact_uri="x"))
    await client.put(keys.LEADER.encode(), b"cp-1")
    mirror = PrefixMirror(client, keys.ALARMS)
    await mirror.start()

    async def stored() -> mesh_pb2.ModelSpec:
        kv = await get(client, keys.model_key("m", "v").encode())
        assert kv is not None
        return keys.decode(kv.value, mesh_pb2.ModelSpec())

    try:
        first = Replica("cp-1", mirror, registry, leading=True)
        models = {("m", "v"): await stored()}  # no profile: the output reference is captured
        a1 = first.alarms(models)
        for seq in range(1, 4):  # capture_windows 3 of a calm distribution
            a1.on_telemetry("n1", _window(seq, [100, 100, 100, 100]))
        await a1.close()
        spec = await stored()
        assert list(spec.drift_reference.output.counts) == [300, 300, 300, 300]
        assert spec.drift_reference.source == "production"
        # An operator's profile is never replaced by a capture.
        assert not await registry.keep_captured_reference("m", "v", mesh_pb2.DriftProfile())

        # A restarted replica scores drifting windows against the stored reference instead of
        # capturing them as its reference.
        second = Replica("cp-1", mirror, registry, leading=True)
        a2 = second.alarms({("m", "v"): spec})
        a2.on_telemetry("n1", _window(10, [400, 0, 0, 0]))
        a2.on_telemetry("n1", _window(11, [400, 0, 0, 0]))
        await a2.close()
        assert a2.health.drift[("m", "v")].drifting
        assert [e[0] for e in second.log.events] == ["drift"]
    finally:
        await mirror.close()


# -- real processes ----------------------------------------------------------------------------


def _alarm_events(admin: AdminClient) -> list[mesh_pb2.Event]:
    return [e for e in admin.list_events(500) if e.kind in ("drift", "accuracy")]


@pytest.mark.timeout(180)
def test_a_restarted_control_plane_raises_no_second_alarm_and_keeps_drifting(
    tmp_path: Path, webhook: str
) -> None:
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    x_tr, x_te, y_tr, y_te = digits_split(0)
    model = digits_to_onnx(LogisticRegression(max_iter=300).fit(x_tr, y_tr), tmp_path / "d.onnx")
    zeros = x_te[y_te == 0]  # one class only: the predictions drift from a uniform reference
    port = free_port()
    cp_args = ["--telemetry-interval-ms", "300"]
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", port=port, extra=cp_args)
        for name in ("n1", "n2"):
            mesh.start_node(name, [cp.address])
        serving = mesh_pb2.ServingConfig(
            monitoring=mesh_pb2.MonitoringConfig(
                log_predictions=True, label_output="label", drift_window_rows=50
            )
        )
        with AdminClient(cp.address) as admin:
            admin.register_model(
                "digits", model.as_uri(), sha256_file(model), variant="lr", copies=2,
                serving=serving,
            )  # fmt: skip
            wait_copies(admin, "digits", 2)
            admin.apply_policy(
                "name: watched\nmonitoring:\n  min_accuracy: 0.9\n  min_feedback: 50\n"
                f"  drift_windows: 2\n  webhook:\n    url: {webhook}\n    min_interval_s: 0\n"
            )
            uniform = mesh_pb2.DriftProfile(output=mesh_pb2.Sketch(counts=[100] * 10))
            admin.set_drift_profile("digits", "lr", uniform)

            def profiled() -> bool:
                copies = [c for n in admin.list_nodes() for c in n.copies if c.model == "digits"]
                return len(copies) == 2 and all(c.monitoring_digest for c in copies)

            wait_until(profiled, 20, what="the drift reference on both nodes")
            outcomes: dict[str, int] = {}
            with MeshClient(cp.address, timeout=10) as client:
                for i in range(300):
                    result = client.infer(
                        "digits", {"x": zeros[i % len(zeros) : i % len(zeros) + 1]}
                    )
                    served = int(result["label"][0])
                    outcomes[result.request_id] = served if i % 3 else (served + 1) % 10
            with MeshClient(cp.address, timeout=10) as client:
                assert client.feedback("digits", outcomes) == 300
            kinds = wait_until(
                lambda: (
                    (k := sorted(e.kind for e in _alarm_events(admin))) == ["accuracy", "drift"]
                    and k
                ),
                30,
                what="one accuracy and one drift event",
            )
            assert kinds == ["accuracy", "drift"]
            (raised,) = [e for e in _alarm_events(admin) if e.kind == "accuracy"]
            assert "0.6667 < 0.9 over 300 labelled" in raised.message
            wait_until(lambda: len(_Hook.received) == 2, 15, what="both webhook calls")

        cp.kill()  # a crash: nothing is flushed, the leader key expires with its lease
        cp = mesh.start_controlplane("cp-1", port=port, extra=cp_args)
        with AdminClient(cp.address) as admin:

            def back() -> bool:
                (health,) = admin.model_health("digits")
                return health.feedback_joined == 300

            wait_until(back, 45, what="both nodes back with their feedback")
            with MeshClient(cp.address, timeout=10) as client:
                sent = 0
                while sent < 400:  # bounded; stop at the first window the new replica scores
                    for _ in range(10):
                        row = zeros[sent % len(zeros) : sent % len(zeros) + 1]
                        client.infer("digits", {"x": row})
                        sent += 1
                    time.sleep(0.4)  # > the telemetry interval
                    (health,) = admin.model_health("digits")
                    if health.windows >= 1:
                        break
                assert health.windows >= 1, "a window was scored after the restart"
                assert health.drifting, f"still drifting after {health.windows} window(s)"
                for i in range(200):  # 4 more drifted windows, scored by the new leader
                    client.infer("digits", {"x": zeros[i % len(zeros) : i % len(zeros) + 1]})
                    if i % 25 == 24:  # a node sends only its newest closed window per
                        time.sleep(0.35)  # telemetry interval (0.3 s): let each one go
            wait_until(lambda: admin.model_health("digits")[0].windows >= 3, 20, what="new windows")
            time.sleep(6.0)  # > the new leader's grace + two maintenance passes
            (health,) = admin.model_health("digits")
            assert health.drifting and health.feedback_joined == 300
            events = _alarm_events(admin)
            assert sorted(e.kind for e in events) == ["accuracy", "drift"], [
                (e.kind, e.message) for e in events
            ]
            assert [e.message for e in events if e.kind == "accuracy"] == [raised.message]
            assert len(_Hook.received) == 2, "the webhook heard each episode once"


@pytest.mark.timeout(120)
def test_events_follow_keeps_running_across_a_control_plane_restart(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "follow.out"
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", port=port)
        with AdminClient(cp.address) as admin:
            admin.apply_policy("name: before-restart\n")
        env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
        with open(out, "w") as sink:
            follow = subprocess.Popen(
                [sys.executable, "-m", "meshserve.client.cli", "events", "--follow",
                 "--interval-s", "0.2", "--target", cp.address],
                stdout=sink, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        try:
            wait_until(lambda: "before-restart" in out.read_text(), 20, what="the first event")
            cp.kill()
            time.sleep(2.0)  # the follower finds nobody there
            assert follow.poll() is None, out.read_text()
            cp = mesh.start_controlplane("cp-1", port=port)
            with AdminClient(cp.address) as admin:
                admin.apply_policy("name: after-restart\n")
            wait_until(lambda: "after-restart" in out.read_text(), 30, what="the event after")
            assert follow.poll() is None
            text = out.read_text()
            assert text.count("unreachable") == 1, text
            assert text.count("before-restart") == 1, "resumed after the last event seen"
            follow.send_signal(signal.SIGINT)
            assert follow.wait(10) == 0, out.read_text()
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait(5)


@pytest.mark.timeout(60)
def test_events_follow_ends_on_a_status_that_retrying_cannot_fix(tmp_path: Path) -> None:
    token = tmp_path / "admin.token"
    token.write_text("s3cret-admin-token\n")
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=["--admin-token-file", str(token)])
        env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "meshserve.client.cli", "events", "--follow",
             "--interval-s", "0.2", "--target", cp.address],
            capture_output=True, text=True, timeout=30, env=env,
        )  # fmt: skip
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "UNAUTHENTICATED" in proc.stderr  # errors and notices go to stderr
        assert "unreachable" not in proc.stderr, "not retried: a wrong credential stays wrong"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("store", ["etcd", "fake"])
async def test_alarm_episode_writes_succeed_once_and_only_for_the_leader(
    client: Any, store: str
) -> None:
    """The same sequence against the etcd registry and the unit tests' fake (they must agree)."""
    registry: Any
    if store == "etcd":
        registry = EtcdRegistry(client)
        await client.put(keys.LEADER.encode(), b"cp-1")
    else:
        registry = FakeRegistry(leader="cp-1")
    episode = b'{"message": "low"}'
    assert await registry.open_alarm("accuracy", "m", "v", episode, "cp-2") == 0, "not leader"
    opened = await registry.open_alarm("accuracy", "m", "v", episode, "cp-1")
    assert opened > 0
    assert await registry.open_alarm("accuracy", "m", "v", episode, "cp-1") == 0, "open already"
    assert await registry.close_alarm("accuracy", "m", "v", "cp-2") == 0, "not leader"
    assert await registry.close_alarm("drift", "m", "v", "cp-1") == 0, "another kind: not open"
    closed = await registry.close_alarm("accuracy", "m", "v", "cp-1")
    assert closed > opened
    assert await registry.close_alarm("accuracy", "m", "v", "cp-1") == 0, "cleared once"
    captured = mesh_pb2.DriftProfile(output=mesh_pb2.Sketch(counts=[3, 1]), source="production")
    assert not await registry.keep_captured_reference("m", "v", captured), "no such variant"
    await registry.register_model(mesh_pb2.ModelSpec(name="m", variant="v", artifact_uri="x"))
    assert await registry.keep_captured_reference("m", "v", captured)
    assert not await registry.keep_captured_reference("m", "v", captured), "has one now"
