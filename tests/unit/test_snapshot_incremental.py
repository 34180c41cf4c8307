"""A snapshot built from the changed keys only equals one built from everything."""

from __future__ import annotations

import random

import pytest

from meshserve.controlplane import keys
from meshserve.controlplane.snapshot import NodeView, SnapshotBuilder
from meshserve.protos import mesh_pb2


def _record(rng: random.Random, node_id: str, replica: str) -> bytes:
    info = mesh_pb2.NodeInfo(
        node_id=node_id,
        labels={"zone": f"z{rng.randrange(3)}"},
        hardware=mesh_pb2.Hardware(
            cpu_cores=rng.choice([2, 8]), memory_bytes=rng.choice([1, 2]) << 30
        ),
        direct_address=rng.choice(["", f"{node_id}:1"]),
        replicas=[replica],
        kind=rng.choice(["", "", "embedded"]),  # an embedded member: members, not nodes
        copies=[
            mesh_pb2.CopyStatus(model="m", variant="v", state=rng.choice([1, 2, 3, 4]))
            for _ in range(rng.randrange(2))
        ],
    )
    return keys.encode(info)


def _labels(rng: random.Random) -> bytes:
    return keys.encode(
        mesh_pb2.NodeLabels(labels={"zone": f"a{rng.randrange(3)}", "max-memory-mb": "512"})
    )


def _plain(view: NodeView) -> tuple[object, ...]:
    return (
        view.node_id,
        dict(view.labels),
        view.hardware.SerializeToString(deterministic=True),
        view.direct_address,
        view.replicas,
        {k: s.SerializeToString(deterministic=True) for k, s in view.copies.items()},
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("trust", [False, True])
def test_a_build_from_the_changed_keys_equals_a_full_build(seed: int, trust: bool) -> None:
    rng = random.Random(seed)
    links: dict[str, bytes] = {}
    labels: dict[str, bytes] = {}
    incremental = SnapshotBuilder()
    incremental.build({}, {}, links, node_labels=labels, trust_node_labels=trust, changed=None)
    for _ in range(60):
        changed: set[str] = set()
        for _ in range(rng.randrange(1, 6)):
            node_id = f"n{rng.randrange(12)}"
            roll = rng.random()
            if roll < 0.55:
                key = keys.node_link_key(node_id, rng.choice(["cp-1", "cp-2"]))
                links[key] = _record(rng, node_id, key.rsplit("/", 1)[1])
            elif roll < 0.8:
                key = keys.node_link_key(node_id, rng.choice(["cp-1", "cp-2"]))
                links.pop(key, None)
            elif roll < 0.92:
                key = keys.node_labels_key(node_id)
                labels[key] = _labels(rng)
            else:
                key = keys.node_labels_key(node_id)
                labels.pop(key, None)
            changed.add(key)
        got = incremental.build(
            {}, {}, dict(links), node_labels=dict(labels), trust_node_labels=trust, changed=changed
        )
        want = SnapshotBuilder().build(
            {}, {}, dict(links), node_labels=dict(labels), trust_node_labels=trust
        )
        assert {n: _plain(v) for n, v in got.nodes.items()} == {
            n: _plain(v) for n, v in want.nodes.items()
        }
        assert {n: _plain(v) for n, v in got.members.items()} == {
            n: _plain(v) for n, v in want.members.items()
        }
        # the builder's own index of nodes holding copies is what the nodes say
        assert dict(got.holders()) == {n: v for n, v in got.nodes.items() if v.copies}
        assert set(got.holders()) == set(want.holders())


def test_a_partial_build_keeps_the_views_it_did_not_touch_and_the_old_snapshot_intact() -> None:
    rng = random.Random(1)
    links = {keys.node_link_key(f"n{i}", "cp-1"): _record(rng, f"n{i}", "cp-1") for i in range(5)}
    builder = SnapshotBuilder()
    first = builder.build({}, {}, dict(links))
    gone = keys.node_link_key("n0", "cp-1")
    del links[gone]
    links[keys.node_link_key("n9", "cp-1")] = _record(rng, "n9", "cp-1")
    second = builder.build({}, {}, dict(links), changed={gone, keys.node_link_key("n9", "cp-1")})
    before, after = {**first.nodes, **first.members}, {**second.nodes, **second.members}
    assert set(before) == {"n0", "n1", "n2", "n3", "n4"}  # unchanged by the next build
    assert set(after) == {"n1", "n2", "n3", "n4", "n9"}
    assert after["n3"] is before["n3"]  # not merged again: same object
