"""Failures that heal: the ``not_failed`` filter and its backoff, as a decision table over the
pure scheduler (hand-built snapshots, the clock passed in as ``now_ms``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType

import pytest

from meshserve.controlplane.placement.failures import (
    RetryPolicy,
    describe,
    next_retry_ms,
    parse_backoff,
)
from meshserve.controlplane.placement.scheduler import explain_variant, plan_placements
from meshserve.controlplane.snapshot import NodeView, Snapshot
from meshserve.protos import mesh_pb2
from tests.support.views import node

KEY = ("m", "default")
SHA = "a" * 64
URI = "http://127.0.0.1:1/m.onnx"
NOW = 1_000_000_000
POLICY = RetryPolicy((30.0, 120.0, 600.0))


def spec(**fields: object) -> mesh_pb2.ModelSpec:
    base: dict[str, object] = {
        "name": "m",
        "variant": "default",
        "sha256": SHA,
        "artifact_uri": URI,
        "registered_unix_ms": 7,
    }
    base.update(fields)
    return mesh_pb2.ModelSpec(**base)  # type: ignore[arg-type]


def record(**fields: object) -> mesh_pb2.CopyFailure:
    """A record as the scheduler writes it for ``spec()`` (override what the case changes)."""
    base: dict[str, object] = {
        "reason": "connection refused",
        "attempts": 1,
        "retry_unix_ms": NOW + 30_000,
        "sha256": SHA,
        "artifact_uri": URI,
        "registered_unix_ms": 7,
    }
    base.update(fields)
    return mesh_pb2.CopyFailure(**base)  # type: ignore[arg-type]


def holding(node_id: str, state: int, *, permanent: bool = False) -> NodeView:
    status = mesh_pb2.CopyStatus(
        model="m",
        variant="default",
        state=state,  # type: ignore[arg-type]
        sha256=SHA,
        reason="HTTP 503" if not permanent else "sha256 mismatch",
        permanent=permanent,
    )
    return dataclasses.replace(node(node_id), copies=MappingProxyType({KEY: status}))


@dataclass(frozen=True)
class Case:
    name: str
    nodes: tuple[NodeView, ...]
    placed: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)
    failures: dict[str, mesh_pb2.CopyFailure] = field(default_factory=dict)
    spec: mesh_pb2.ModelSpec = field(default_factory=spec)
    now_ms: int = NOW
    # expected
    chosen: tuple[str, ...] = ()
    kept_out: tuple[str, ...] = ()
    records: dict[str, tuple[int, int, bool]] = field(default_factory=dict)  # attempts, retry, perm


def run(case: Case) -> mesh_pb2.Placement:
    old = mesh_pb2.Placement(
        model="m",
        variant="default",
        nodes=case.placed,
        failed=case.failed,
        failures=case.failures,
        desired_copies=1,
    )
    snapshot = Snapshot(
        models={KEY: case.spec},
        placements={KEY: old} if case.placed or case.failed or case.failures else {},
        nodes={n.node_id: n for n in case.nodes},
    )
    plan = plan_placements(snapshot, now_ms=case.now_ms, retry=POLICY)
    return plan.upserts.get(KEY, old)


CASES = [
    Case(
        "a transient failure keeps the node out for the first backoff step (30 s)",
        (holding("a", mesh_pb2.FAILED), node("b")),
        placed=("a",),
        chosen=("b",),
        kept_out=("a",),
        records={"a": (1, NOW + 30_000, False)},
    ),
    Case(
        "a permanent failure keeps the node out with no automatic retry",
        (holding("a", mesh_pb2.FAILED, permanent=True), node("b")),
        placed=("a",),
        chosen=("b",),
        kept_out=("a",),
        records={"a": (1, 0, True)},
    ),
    Case(
        "before its retry time the node stays out, even as the only node",
        (node("a"),),
        failed={"a": "connection refused"},
        failures={"a": record(retry_unix_ms=NOW + 1)},
        kept_out=("a",),
        records={"a": (1, NOW + 1, False)},
    ),
    Case(
        "at its retry time the node is placed again; the record stays for the next backoff",
        (node("a"),),
        failed={"a": "connection refused"},
        failures={"a": record(retry_unix_ms=NOW)},
        chosen=("a",),
        records={"a": (1, NOW, False)},
    ),
    Case(
        "a second consecutive failure backs off longer (2 min)",
        (holding("a", mesh_pb2.FAILED), node("b")),
        placed=("a",),
        failures={"a": record(attempts=1, retry_unix_ms=NOW - 1)},
        chosen=("b",),
        kept_out=("a",),
        records={"a": (2, NOW + 120_000, False)},
    ),
    Case(
        "the backoff is capped at its last step (10 min) from the fourth failure on",
        (holding("a", mesh_pb2.FAILED), node("b")),
        placed=("a",),
        failures={"a": record(attempts=5, retry_unix_ms=NOW - 1)},
        chosen=("b",),
        kept_out=("a",),
        records={"a": (6, NOW + 600_000, False)},
    ),
    Case(
        "a permanent failure is never retried by time alone",
        (node("a"),),
        failed={"a": "sha256 mismatch"},
        failures={"a": record(permanent=True, retry_unix_ms=0)},
        now_ms=NOW * 10,
        kept_out=("a",),
        records={"a": (1, 0, True)},
    ),
    Case(
        "a new artifact (sha256) clears a permanent failure at once",
        (node("a"),),
        failed={"a": "sha256 mismatch"},
        failures={"a": record(permanent=True, retry_unix_ms=0, sha256="b" * 64)},
        chosen=("a",),
    ),
    Case(
        "a new artifact uri clears a transient failure at once",
        (node("a"),),
        failed={"a": "connection refused"},
        failures={"a": record(artifact_uri="http://127.0.0.1:2/old.onnx")},
        chosen=("a",),
    ),
    Case(
        "a new registration of the same artifact clears the failure",
        (node("a"),),
        failed={"a": "sha256 mismatch"},
        failures={"a": record(permanent=True, retry_unix_ms=0)},
        spec=spec(registered_unix_ms=8),
        chosen=("a",),
    ),
    Case(
        "a manual retry for the node clears a permanent failure",
        (node("a"),),
        failed={"a": "sha256 mismatch"},
        failures={"a": record(permanent=True, retry_unix_ms=0)},
        spec=spec(retry_requests={"a": 1}),
        chosen=("a",),
    ),
    Case(
        "a manual retry for every node clears it too",
        (node("a"),),
        failed={"a": "sha256 mismatch"},
        failures={"a": record(permanent=True, retry_unix_ms=0)},
        spec=spec(retry_requests={"": 2}),
        chosen=("a",),
    ),
    Case(
        "a manual retry for another node leaves this one out",
        (node("a"),),
        failed={"a": "sha256 mismatch"},
        failures={"a": record(permanent=True, retry_unix_ms=0)},
        spec=spec(retry_requests={"b": 1}),
        kept_out=("a",),
        records={"a": (1, 0, True)},
    ),
    Case(
        "a copy that turns READY drops its node's record",
        (holding("a", mesh_pb2.READY),),
        placed=("a",),
        failures={"a": record(retry_unix_ms=NOW - 5)},
        chosen=("a",),
    ),
    Case(
        "a copy still LOADING after a retry keeps its record (the next failure backs off more)",
        (holding("a", mesh_pb2.LOADING),),
        placed=("a",),
        failures={"a": record(retry_unix_ms=NOW - 5)},
        chosen=("a",),
        records={"a": (1, NOW - 5, False)},
    ),
    Case(
        "a failure written before records existed becomes a transient one, first step",
        (node("a"), node("b")),
        placed=("b",),
        failed={"a": "copy failed"},
        chosen=("b",),
        kept_out=("a",),
        records={"a": (1, NOW + 30_000, False)},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_not_failed_decision_table(case: Case) -> None:
    placement = run(case)
    assert tuple(placement.nodes) == case.chosen
    assert tuple(sorted(placement.failed)) == case.kept_out
    got = {n: (r.attempts, r.retry_unix_ms, r.permanent) for n, r in placement.failures.items()}
    assert got == case.records


def test_a_retry_that_fails_again_backs_off_in_steps_across_passes() -> None:
    """Fail -> wait -> placed again -> fail again, three times: 30 s, then 2 min, then 10 min."""
    snapshot = Snapshot(models={KEY: spec()}, placements={}, nodes={"a": node("a")})
    now = NOW
    waits = []
    for _ in range(4):
        placement = plan_placements(snapshot, now_ms=now, retry=POLICY).upserts[KEY]
        assert list(placement.nodes) == ["a"]
        failing = Snapshot(
            models={KEY: spec()},
            placements={KEY: placement},
            nodes={"a": holding("a", mesh_pb2.FAILED)},
        )
        placement = plan_placements(failing, now_ms=now, retry=POLICY).upserts[KEY]
        assert list(placement.nodes) == [] and "a" in placement.failed
        due = placement.failures["a"].retry_unix_ms
        waits.append(due - now)
        early = Snapshot(models={KEY: spec()}, placements={KEY: placement}, nodes={"a": node("a")})
        assert not plan_placements(early, now_ms=due - 1, retry=POLICY).upserts  # still out
        now = due
        snapshot = early
    assert waits == [30_000, 120_000, 600_000, 600_000]


def test_explain_says_when_the_next_retry_is_and_how_to_retry_now() -> None:
    failures = {
        "a": record(retry_unix_ms=1_700_000_000_000),
        "b": record(permanent=True, retry_unix_ms=0, reason="sha256 mismatch"),
    }
    placement = mesh_pb2.Placement(
        model="m", variant="default", failed={"a": "x", "b": "y"}, failures=failures
    )
    snapshot = Snapshot(
        models={KEY: spec()},
        placements={KEY: placement},
        nodes={"a": node("a"), "b": node("b")},
    )
    _, _, _, verdicts = explain_variant(snapshot, KEY)
    by_node = {v.node_id: v for v in verdicts}
    assert by_node["a"].filtered_by == "not_failed"
    assert "transient" in by_node["a"].reason
    assert "next automatic retry at 2023-11-14 22:13:20 UTC" in by_node["a"].reason
    assert "meshctl placements retry m --node a" in by_node["a"].reason
    assert "permanent" in by_node["b"].reason and "new artifact" in by_node["b"].reason
    assert "meshctl placements retry m --node b" in by_node["b"].reason


def test_next_retry_is_the_earliest_transient_one_still_kept_out() -> None:
    placements = [
        mesh_pb2.Placement(
            failed={"a": "x", "b": "y"},
            failures={"a": record(retry_unix_ms=50), "b": record(retry_unix_ms=20)},
        ),
        mesh_pb2.Placement(
            failed={"c": "z"}, failures={"c": record(permanent=True, retry_unix_ms=0)}
        ),
        mesh_pb2.Placement(failures={"d": record(retry_unix_ms=5)}),  # retrying: not kept out
    ]
    assert next_retry_ms(placements) == 20
    assert next_retry_ms(placements[2:]) is None


def test_backoff_schedule_is_parsed_and_checked() -> None:
    assert parse_backoff("1, 2,4").backoff_s == (1.0, 2.0, 4.0)
    assert parse_backoff("0.5").delay_ms(9) == 500
    for bad in ("", "x", "1,-2", "0"):
        with pytest.raises(ValueError):
            parse_backoff(bad)


def test_describe_without_record_still_names_the_retry_command() -> None:
    assert "meshctl placements retry m --node a" in describe("m", "a", "boom", None)
