"""The records meshctl's read commands print with ``-o json|yaml``: one schema per command.

Pure functions of the Admin API's answers (no I/O). Field names are snake_case and stable: a
script may rely on every key documented in docs/meshctl.md; a key is only ever added. A value
the mesh does not know is ``null`` (never a sentinel such as -1 or 0), times are Unix
milliseconds plus an ISO 8601 UTC string, sizes are bytes.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from meshserve.client.cli._placement_view import Key, copy_state, node_state, replication
from meshserve.protos import mesh_pb2

__all__ = [
    "alias_record",
    "event_record",
    "explain_placement_record",
    "explain_switching_record",
    "iso_utc",
    "model_record",
    "node_record",
    "placement_record",
    "variant_health_record",
]

Record = dict[str, Any]


def iso_utc(unix_ms: int) -> str | None:
    """``2026-11-30T17:09:41.123Z`` (None for 0: never)."""
    if not unix_ms:
        return None
    when = datetime.datetime.fromtimestamp(unix_ms / 1000, tz=datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def node_memory(node: mesh_pb2.NodeInfo) -> tuple[int | None, int | None]:
    """(used, total) bytes: what the node process uses (its RSS, loaded copies included) and
    the memory it offers placement (its machine's, or less when capped by its labels), each
    None until the node has said."""
    return int(node.telemetry.rss_bytes) or None, int(node.hardware.memory_bytes) or None


def node_record(node: mesh_pb2.NodeInfo) -> Record:
    used, total = node_memory(node)
    claimed = {k: v for k, v in node.reported_labels.items() if node.labels.get(k) != v}
    return {
        "node_id": node.node_id,
        "kind": node.kind or "node",  # "embedded": an application member (never placed onto)
        "state": node_state(node),
        "draining": bool(node.draining),
        "labels": dict(sorted(node.labels.items())),
        "claimed_labels": dict(sorted(claimed.items())),
        "direct_address": node.direct_address or None,
        "replicas": list(node.replicas),
        "memory_used_bytes": used,
        "memory_total_bytes": total,
        "copies": [
            {"model": c.model, "variant": c.variant, "state": copy_state(c.state)}
            for c in node.copies
        ],
    }


def placement_record(p: mesh_pb2.Placement, ready: Mapping[Key, list[mesh_pb2.NodeInfo]]) -> Record:
    r = replication(p, ready)
    failures = []
    for node_id, reason in sorted(p.failed.items()):
        f = p.failures.get(node_id)
        failures.append(
            {
                "node_id": node_id,
                "reason": reason,
                "permanent": bool(f.permanent) if f is not None else False,
                "attempts": int(f.attempts) if f is not None else None,
                "retry_at": iso_utc(int(f.retry_unix_ms)) if f is not None else None,
            }
        )
    return {
        "model": p.model,
        "variant": p.variant,
        "desired": int(p.desired_copies),
        "ready": r.ready,
        "under_replicated": r.under,
        "nodes": list(p.nodes),
        "still_served_by": dict(sorted(r.stray.items())),
        "failures": failures,
    }


def version_of(spec: mesh_pb2.ModelSpec) -> str:
    return spec.version or "default"


def aliases_pointing(version: str, aliases: Iterable[mesh_pb2.Alias]) -> list[str]:
    """The aliases pointing at ``version`` (``live``; ``live canary 10%`` for a canary)."""
    out = []
    for a in aliases:
        if a.version == version:
            out.append(a.alias)
        if a.canary_version == version:
            out.append(f"{a.alias} canary {a.canary_percent:g}%")
    return out


def model_record(spec: mesh_pb2.ModelSpec, aliases: Iterable[mesh_pb2.Alias]) -> Record:
    version = version_of(spec)
    return {
        "name": spec.name,
        "version": version,
        "variant": spec.variant,
        "aliases": aliases_pointing(version, aliases),
        "accuracy": spec.accuracy or None,
        "copies": int(spec.copies),
        "artifact_uri": spec.artifact_uri,
        "sha256": spec.sha256,
        "size_bytes": int(spec.size_bytes) or None,
        "node_selector": dict(sorted(spec.node_selector.items())),
        "slo_ms": spec.slo_ms or None,
        "registered_at": iso_utc(int(spec.registered_unix_ms)),
    }


def alias_record(s: mesh_pb2.AliasStatus) -> Record:
    a = s.alias
    return {
        "alias": a.alias,
        "version": a.version,
        "serving": s.serving or None,
        "canary_version": a.canary_version or None,
        "canary_percent": a.canary_percent if a.canary_version else None,
        "canary_active": bool(s.canary_active),
        "previous_version": a.previous_version or None,
        "versions": [
            {
                "version": v.version,
                "variants": list(v.variants),
                "ready": int(v.ready),
                "wanted": int(v.wanted),
            }
            for v in s.versions
        ],
        "reason": s.reason,
    }


def event_record(e: mesh_pb2.Event) -> Record:
    return {
        "seq": int(e.seq),
        "unix_ms": int(e.unix_ms),
        "time": iso_utc(int(e.unix_ms)),
        "kind": e.kind,
        "model": e.model or None,
        "variant": e.variant or None,
        "node_id": e.node_id or None,
        "message": e.message,
        "replica_id": e.replica_id,
    }


def explain_placement_record(v: mesh_pb2.VariantExplanation) -> Record:
    return {
        "model": v.model,
        "variant": v.variant,
        "desired_copies": int(v.desired_copies),
        "placed": list(v.placed),
        "policy": v.policy,
        "nodes": [
            {
                "node_id": n.node_id,
                "feasible": bool(n.feasible),
                "selected": bool(n.selected),
                "score": n.score if n.feasible and not n.reason else None,
                "scores": dict(sorted(n.scores.items())),
                "filtered_by": n.filtered_by or None,
                "reason": n.reason or None,
            }
            for n in v.nodes
        ],
    }


def explain_switching_record(model: str, out: mesh_pb2.ExplainSwitchingResponse) -> Record:
    return {
        "model": model,
        "version": out.version,
        "route": out.route or None,
        "slo_ms": out.slo_ms or None,
        "chosen": out.chosen,
        "reason": out.reason,
        "variants": [
            {
                "variant": v.variant,
                "accuracy": v.accuracy,
                "predicted_ms": v.predicted_ms if v.predicted_ms >= 0 else None,
                "ready_copies": int(v.ready_copies),
                "queued": int(v.queued),
                "slowdown": v.slowdown,
            }
            for v in out.variants
        ],
    }


def _known(value: float) -> float | None:
    return None if value < 0 else value


def variant_health_record(v: mesh_pb2.VariantHealth) -> Record:
    return {
        "variant": v.variant,
        "accuracy": _known(v.accuracy),
        "feedback_joined": int(v.feedback_joined),
        "feedback_correct": int(v.feedback_correct),
        "predictions_logged": int(v.predictions_logged),
        "registered_accuracy": v.registered_accuracy or None,
        "mean_abs_error": _known(v.mean_abs_error),
        "windows": int(v.windows),
        "output_psi": _known(v.output_psi),
        "max_feature_psi": _known(v.max_feature_psi),
        "drifting": bool(v.drifting),
        "reference_source": v.reference_source or None,
        "features": [{"name": f.name, "psi": f.psi, "ks": f.ks} for f in v.features],
    }
