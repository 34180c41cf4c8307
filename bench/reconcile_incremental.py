"""The hub's reconcile after one placement change: a full pass over every linked node vs the
incremental pass (controlplane/link/scope.py), at 1,000 and 10,000 linked nodes.

A hand-built mesh (no etcd, no streams): N node sessions in one :class:`Hub` (a fake registry),
``--models`` variants with 1-3 copies each on random nodes, every copy READY as specified (a
settled mesh: a pass sends nothing). One *change* moves one variant's copies to other nodes and
bumps its placement revision, as the snapshot builder would present it (every other value the
same object). Timed, per N, in the same process:

- ``full_before``: a full pass as the hub did it before this change (every node, and each node's
  reconcile scanning every placement) -- the baseline;
- ``full``: a full pass now (every node; a node reads only its own placements);
- ``incremental``: the pass a view change triggers now (only the nodes concerned).

Each figure is the time of one ``Hub.reconcile`` call (median, p99 and max over the changes),
commands queued included. The replica set is pushed by every pass as in the running hub.

    .venv/bin/python bench/reconcile_incremental.py [--nodes 1000,10000] [--models 1000]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._report import emit  # noqa: E402
from meshserve.controlplane.link import reconcile as reconcile_module  # noqa: E402
from meshserve.controlplane.link.handshake import replica_set  # noqa: E402
from meshserve.controlplane.link.hub import Hub  # noqa: E402
from meshserve.controlplane.link.reconcile import spec_digest  # noqa: E402
from meshserve.controlplane.link.session import NodeSession  # noqa: E402
from meshserve.controlplane.snapshot import Snapshot, VariantKey  # noqa: E402
from meshserve.protos import mesh_pb2  # noqa: E402
from tests.support.fake_registry import FakeRegistry  # noqa: E402
from tests.support.views import node  # noqa: E402

REPLICAS = [mesh_pb2.ReplicaInfo(replica_id="cp-1", address="127.0.0.1:1")]


def log(message: str) -> None:
    print(f"[reconcile_incremental] {message}", file=sys.stderr, flush=True)


def mesh(nodes: int, models: int, seed: int = 0) -> tuple[Hub, Snapshot]:
    """A settled mesh: the hub (its sessions hold every placed copy READY) and its snapshot."""
    rng = random.Random(seed)
    names = [f"node-{i:05d}" for i in range(nodes)]
    specs: dict[VariantKey, mesh_pb2.ModelSpec] = {}
    placements: dict[VariantKey, mesh_pb2.Placement] = {}
    held: dict[str, dict[VariantKey, int]] = {n: {} for n in names}
    for i in range(models):
        key = (f"model-{i:04d}", "default")
        sha = f"{i:064x}"
        specs[key] = mesh_pb2.ModelSpec(
            name=key[0], variant=key[1], artifact_uri=f"file:///{i}.onnx", sha256=sha
        )
        chosen = rng.sample(names, rng.randint(1, 3))
        placements[key] = mesh_pb2.Placement(nodes=chosen, desired_copies=len(chosen))
        for n in chosen:
            held[n][key] = mesh_pb2.READY
    hub = Hub(
        registry=FakeRegistry(),
        replica_id="cp-1",
        lease_ttl_s=5,
        lease_id=lambda: 1,
        snapshot=lambda: Snapshot(),
        replicas=lambda: list(REPLICAS),
        outbox_size=1 << 16,
    )
    views = {}
    for n in names:
        session = NodeSession(mesh_pb2.Hello(node_id=n), "cp-1", 1 << 16)
        session.started -= 60.0  # linked a minute ago: past the adoption grace
        session.replicas_said = replica_set(REPLICAS)
        for key in held[n]:
            spec = specs[key]
            session.copies[key] = mesh_pb2.CopyStatus(
                model=key[0],
                variant=key[1],
                state=mesh_pb2.READY,
                sha256=spec.sha256,
                monitoring_digest=spec_digest(key, spec),
            )
            session.ordered[key] = [spec.sha256]
        hub.sessions[n] = session
        views[n] = node(n, copies=held[n])
    snapshot = Snapshot(
        models=MappingProxyType(specs),
        placements=MappingProxyType(placements),
        nodes=MappingProxyType(views),
        placement_revisions=MappingProxyType(dict.fromkeys(placements, 1)),
        placements_revision=1,
    )
    return hub, snapshot


def moved(base: Snapshot, key: VariantKey, rng: random.Random, revision: int) -> Snapshot:
    """``base`` with ``key``'s copies moved to as many other nodes (a new placement object and
    revision; every other value the same object, as the snapshot builder keeps them)."""
    old = base.placements[key]
    names = list(base.nodes)
    others = [n for n in rng.sample(names, len(old.nodes) + 3) if n not in old.nodes]
    placement = mesh_pb2.Placement(
        nodes=others[: len(old.nodes)], desired_copies=old.desired_copies
    )
    return replace(
        base,
        placements=MappingProxyType({**base.placements, key: placement}),
        placement_revisions=MappingProxyType({**base.placement_revisions, key: revision}),
    )


def drain(hub: Hub) -> int:
    sent = 0
    for session in hub.sessions.values():
        while not session.outbox.empty():
            session.outbox.get_nowait()
            sent += 1
    return sent


def _old_placed_on(snapshot: Snapshot, node_id: str) -> tuple[VariantKey, ...]:
    """What each node's reconcile read before: every placement, checking whether it is named."""
    return tuple(k for k, p in snapshot.placements.items() if node_id in p.nodes)


def timed(
    hub: Hub, base: Snapshot, changes: int, *, full: bool, seed: int
) -> tuple[list[float], int]:
    """Times ``changes`` single-placement changes: each starts from ``base`` (reconciled first,
    untimed) and moves another variant. Returns the seconds of each timed pass and the
    commands they queued."""
    rng = random.Random(seed)
    keys = rng.sample(list(base.placements), changes)
    seconds: list[float] = []
    commands = 0
    for i, key in enumerate(keys):
        hub.reconcile(base)
        drain(hub)
        new = moved(base, key, rng, revision=100 + i)
        gc.disable()
        start = time.perf_counter()
        hub.reconcile(new, full=full)
        seconds.append(time.perf_counter() - start)
        gc.enable()
        commands += drain(hub)
    hub.reconcile(base)
    drain(hub)
    return seconds, commands


def summary(seconds: list[float], commands: int) -> dict[str, Any]:
    ms = sorted(s * 1000 for s in seconds)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {
        "passes": len(ms),
        "median_ms": round(statistics.median(ms), 3),
        "p99_ms": round(p99, 3),
        "max_ms": round(ms[-1], 3),
        "commands_per_pass": round(commands / len(ms), 2),
    }


def run(nodes: int, models: int, changes: int, baseline_changes: int) -> dict[str, Any]:
    log(f"building a settled mesh of {nodes} nodes x {models} variants")
    hub, base = mesh(nodes, models)
    hub.reconcile(base)  # the first pass is full: every copy Settled, nothing sent
    assert drain(hub) == 0, "the mesh is not settled"
    out: dict[str, Any] = {"nodes": nodes, "variants": models}
    original: Callable[[Snapshot, str], Sequence[VariantKey]] = reconcile_module.placed_on
    reconcile_module.placed_on = _old_placed_on  # type: ignore[assignment]
    try:
        log(f"{nodes} nodes: full passes as before ({baseline_changes} changes)")
        out["full_before"] = summary(*timed(hub, base, baseline_changes, full=True, seed=1))
    finally:
        reconcile_module.placed_on = original  # type: ignore[assignment]
    log(f"{nodes} nodes: full passes ({changes} changes)")
    out["full"] = summary(*timed(hub, base, changes, full=True, seed=2))
    log(f"{nodes} nodes: incremental passes ({changes} changes)")
    out["incremental"] = summary(*timed(hub, base, changes, full=False, seed=3))
    out["speedup_vs_full_before"] = round(
        out["full_before"]["median_ms"] / out["incremental"]["median_ms"], 1
    )
    out["speedup_vs_full"] = round(out["full"]["median_ms"] / out["incremental"]["median_ms"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1000,10000")
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=50, help="timed changes per mode")
    parser.add_argument("--baseline-changes", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    started = time.perf_counter()
    results = [
        run(int(n), args.models, args.changes, args.baseline_changes) for n in args.nodes.split(",")
    ]
    emit(
        {
            "bench": "reconcile_incremental",
            "python": sys.version.split()[0],
            "results": results,
            "wall_s": round(time.perf_counter() - started, 1),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
