"""Why each copy of a model is placed where it is: the Admin API's ExplainPlacement answer.

Contract: :func:`explain_placement` is pure over the immutable snapshot and the policy in force
(no I/O, no clock); it runs the same filter → score → select pipeline the leader plans with
(:func:`~meshserve.controlplane.placement.scheduler.explain_variant`), so the answer is what the
leader would decide on this view. A model (or variant) the snapshot does not hold is NotFound.
"""

from __future__ import annotations

from meshserve.common.errors import NotFound
from meshserve.controlplane.placement.scheduler import RuleSource, explain_variant
from meshserve.controlplane.snapshot import Snapshot
from meshserve.protos import mesh_pb2

__all__ = ["explain_placement"]


def explain_placement(
    snapshot: Snapshot, policy: RuleSource, model: str, variant: str = ""
) -> mesh_pb2.ExplainPlacementResponse:
    """Every registered variant of ``model`` (only ``variant`` when given), by variant name:
    its rule, desired copies, the nodes holding it, and each node's verdict (feasible or the
    filter that refused it and why; scores; selected)."""
    wanted = [
        k for k in sorted(snapshot.models) if k[0] == model and (not variant or k[1] == variant)
    ]
    if not wanted:
        raise NotFound(
            f"model {model!r}" + (f" variant {variant!r}" if variant else "") + " is not registered"
        )
    out = mesh_pb2.ExplainPlacementResponse()
    for key in wanted:
        rule, desired, placed, verdicts = explain_variant(snapshot, key, policy)
        answer = out.variants.add(
            model=key[0], variant=key[1], desired_copies=desired, placed=placed, policy=rule.name
        )
        for v in verdicts:
            answer.nodes.add(
                node_id=v.node_id,
                feasible=v.feasible,
                filtered_by=v.filtered_by,
                reason=v.reason,
                score=v.score,
                scores=v.scores,
                selected=v.selected,
            )
    return out
