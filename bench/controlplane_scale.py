"""Control-plane scale benchmark: placement decisions at 1,000 / 5,000 / 10,000 nodes, and
telemetry ingestion over real node streams (``bench/telemetry_ingest.py``).

(a) Placement. A synthetic snapshot: N nodes (10 zones, 20 % core / 80 % edge, 4-64 GiB,
10 % with CUDA) and 1,000 models (1-3 copies, 10 MiB - 2 GiB, some with a node_selector, some
needing CUDA). One *decision* = placing one variant's copies: filter -> score -> select over
all N nodes (:func:`meshserve.controlplane.placement.policies.pipeline.choose`) plus the
bookkeeping. Reported per N:
decisions/s over a full pass from an empty mesh (``plan_placements``, table build included),
p50/p99 of single decisions (timed one by one, same work), and the rebuild cost of the node
table. Both the built-in default policy and a bin-pack + affinity policy are run.

(b) Telemetry: see ``bench/telemetry_ingest.py`` (``--no-telemetry`` skips it).

    .venv/bin/python bench/controlplane_scale.py [--nodes 1000,5000,10000] [--models 1000]

Prints ONE JSON object (targets: >= 1,000 decisions/s and p99 < 10 ms at 10,000 nodes;
telemetry <= 1 core for 10,000 nodes at 1 Hz, extrapolated from the largest real count).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._report import emit  # noqa: E402
from meshserve.common.policy.rule import DEFAULT_RULE, Rule  # noqa: E402
from meshserve.controlplane import keys  # noqa: E402
from meshserve.controlplane.placement.policies.pipeline import choose  # noqa: E402
from meshserve.controlplane.placement.scheduler import _candidate, _Demand, _table, plan_placements  # noqa: E402
from meshserve.controlplane.snapshot import NodeView, Snapshot, SnapshotBuilder  # noqa: E402
from meshserve.protos import mesh_pb2  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def log(message: str) -> None:
    print(f"[controlplane_scale] {message}", file=sys.stderr, flush=True)


def synthetic_snapshot(nodes: int, models: int, seed: int = 0) -> Snapshot:
    rng = random.Random(seed)
    views = {}
    for i in range(nodes):
        node_id = f"node-{i:05d}"
        tier = "core" if rng.random() < 0.2 else "edge"
        providers = (CPU, CUDA) if rng.random() < 0.1 else (CPU,)
        memory = rng.choice((4, 8, 16, 32, 64)) * GiB
        views[node_id] = NodeView(
            node_id=node_id,
            labels=MappingProxyType({"tier": tier, "zone": f"z{i % 10}"}),
            hardware=mesh_pb2.Hardware(
                cpu_cores=8, memory_bytes=memory, execution_providers=providers
            ),
            direct_address="",
            replicas=frozenset({"cp-1"}),
            copies=MappingProxyType({}),
        )
    specs = {}
    for j in range(models):
        name = f"model-{j:04d}"
        selector = {"tier": "edge"} if j % 7 == 0 else {"tier": "core"} if j % 11 == 0 else {}
        specs[(name, "default")] = mesh_pb2.ModelSpec(
            name=name,
            variant="default",
            sha256=f"{j:064x}",
            copies=rng.choice((1, 2, 3)),
            size_bytes=rng.choice((10, 50, 200, 800, 2048)) * MiB,
            node_selector=selector,
            execution_providers=[CUDA] if j % 13 == 0 else [],
        )
    return Snapshot(MappingProxyType(specs), MappingProxyType({}), MappingProxyType(views))


class _Policy:
    def __init__(self, rule: Rule) -> None:
        self.rule = rule

    def rule_for(self, spec: mesh_pb2.ModelSpec) -> Rule:
        return self.rule


POLICIES = {
    "default": DEFAULT_RULE,
    "binpack_affinity": Rule(
        name="bench bin-pack",
        weights={"bin_packing": 1.0, "affinity": 0.5, "load_cost": 0.2, "spread": 0.3},
        prefer_labels={"tier": "edge"},
    ),
}


def placement_figures(snapshot: Snapshot, rule: Rule, repeats: int) -> dict[str, Any]:
    policy = _Policy(rule)
    passes = []
    for _ in range(repeats):
        started = time.perf_counter()
        plan = plan_placements(snapshot, policy)
        passes.append(time.perf_counter() - started)
    placed = sum(len(p.nodes) for p in plan.upserts.values())
    unplaced = sum(1 for p in plan.upserts.values() if len(p.nodes) < p.desired_copies)
    # Single decisions, timed one by one on the same evolving table.
    started = time.perf_counter()
    table, sizes = _table(snapshot)
    table_s = time.perf_counter() - started
    demand = _Demand(snapshot)
    latencies = []
    for key in sorted(snapshot.models):
        spec = snapshot.models[key]
        t0 = time.perf_counter()
        c = _candidate(table, key, spec, rule, [], {}, sizes[key], demand)
        for row in choose(table, c, max(1, spec.copies)):
            table.place(row, sizes[key], new=True)
        latencies.append(time.perf_counter() - t0)
    lat_ms = np.array(latencies) * 1000
    best = min(passes)
    return {
        "decisions": len(snapshot.models),
        "copies_placed": placed,
        "variants_short_of_copies": unplaced,
        "full_pass_s": round(best, 4),
        "decisions_per_s": round(len(snapshot.models) / best, 1),
        "decision_p50_ms": round(float(np.percentile(lat_ms, 50)), 4),
        "decision_p99_ms": round(float(np.percentile(lat_ms, 99)), 4),
        "decision_max_ms": round(float(lat_ms.max()), 4),
        "table_build_ms": round(table_s * 1000, 2),
    }


def rebuild_figures(snapshot: Snapshot) -> dict[str, Any]:
    """Snapshot (re)build from etcd-shaped records: from scratch, and after one record changed
    (what every replica does on each watch event)."""
    links = {}
    for node_id, view in snapshot.nodes.items():
        info = mesh_pb2.NodeInfo(
            node_id=node_id,
            labels=dict(view.labels),
            hardware=view.hardware,
            replicas=["cp-1"],
            copies=[mesh_pb2.CopyStatus(model="m", variant="default", state=mesh_pb2.READY)],
        )
        links[keys.node_link_key(node_id, "cp-1")] = keys.encode(info)
    models = {keys.model_key(*k): keys.encode(v) for k, v in snapshot.models.items()}
    builder = SnapshotBuilder()
    started = time.perf_counter()
    builder.build(models, {}, links)
    full = time.perf_counter() - started
    samples = []
    changed = dict(links)
    for one in list(links)[:7]:  # seven watch events, one changed record each
        info = keys.decode(links[one], mesh_pb2.NodeInfo())
        info.copies[0].state = mesh_pb2.LOADING
        changed[one] = keys.encode(info)
        started = time.perf_counter()
        built = builder.build(models, {}, changed)
        samples.append(time.perf_counter() - started)
        assert built.nodes[info.node_id].copies[("m", "default")].state == mesh_pb2.LOADING
    return {
        "full_build_ms": round(full * 1000, 1),
        "one_change_rebuild_ms_median": round(float(np.median(samples)) * 1000, 1),
        "one_change_rebuild_ms_max": round(max(samples) * 1000, 1),
        "gc_threshold": list(gc.get_threshold()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench/controlplane_scale.py", description=__doc__)
    p.add_argument("--nodes", default="1000,5000,10000")
    p.add_argument("--models", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3, help="full passes per size (best is kept)")
    p.add_argument("--no-telemetry", dest="telemetry", action="store_false")
    p.add_argument("--telemetry-counts", default="250,500,1000,2000")
    p.add_argument("--telemetry-window", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    gc.set_threshold(50_000, 20, 20)  # as the control-plane process runs (controlplane/__main__)
    started = time.monotonic()
    placement: list[dict[str, Any]] = []
    for n in [int(x) for x in args.nodes.split(",")]:
        log(f"synthetic snapshot: {n} nodes, {args.models} models")
        snapshot = synthetic_snapshot(n, args.models)
        rebuild = rebuild_figures(snapshot)
        log(f"{n} nodes: snapshot build {rebuild}")
        for name, rule in POLICIES.items():
            figures = placement_figures(snapshot, rule, args.repeats)
            figures.update(nodes=n, policy=name, snapshot=rebuild)
            log(
                f"{n} nodes, {name}: {figures['decisions_per_s']:.0f} decisions/s, "
                f"p99 {figures['decision_p99_ms']:.2f} ms"
            )
            placement.append(figures)
    result: dict[str, Any] = {"placement": placement}
    largest = [f for f in placement if f["nodes"] == max(f["nodes"] for f in placement)]
    result["targets"] = {
        f"placement at {largest[0]['nodes']} nodes ({f['policy']}): >= 1000 decisions/s, "
        "p99 < 10 ms": {
            "decisions_per_s": f["decisions_per_s"],
            "p99_ms": f["decision_p99_ms"],
            "met": f["decisions_per_s"] >= 1000 and f["decision_p99_ms"] < 10,
        }
        for f in largest
    }
    if args.telemetry:
        from bench.telemetry_ingest import run_ingest

        counts = [int(x) for x in args.telemetry_counts.split(",")]
        telemetry = run_ingest(counts, args.telemetry_window, 300.0)
        result["telemetry"] = telemetry
    result["wall_s"] = round(time.monotonic() - started, 1)
    emit(result, args.out)


if __name__ == "__main__":
    main()
