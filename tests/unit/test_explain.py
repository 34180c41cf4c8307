"""ExplainPlacement's answer (controlplane/placement/explain.py) on hand-built snapshots: the
same verdicts the scheduler plans with, by variant, and NotFound naming what is missing."""

from __future__ import annotations

import pytest

from meshserve.common.errors import NotFound
from meshserve.common.policy.config import DEFAULT_POLICY
from meshserve.controlplane.placement.explain import explain_placement
from meshserve.controlplane.snapshot import Snapshot
from meshserve.protos import mesh_pb2
from tests.support.views import node


def spec(variant: str, **fields: object) -> mesh_pb2.ModelSpec:
    return mesh_pb2.ModelSpec(
        name="m",
        variant=variant,
        sha256="a" * 64,
        copies=1,
        **fields,  # type: ignore[arg-type]
    )


SNAPSHOT = Snapshot(
    models={
        ("m", "v1"): spec("v1", node_selector={"tier": "edge"}),
        ("m", "v2"): spec("v2"),
        ("other", "v1"): mesh_pb2.ModelSpec(name="other", variant="v1", sha256="a" * 64),
    },
    placements={("m", "v2"): mesh_pb2.Placement(model="m", variant="v2", nodes=["core"])},
    nodes={
        "core": node("core", labels={"tier": "core"}),
        "edge": node("edge", labels={"tier": "edge"}),
    },
)


def test_every_variant_of_the_model_by_name_with_each_nodes_verdict() -> None:
    out = explain_placement(SNAPSHOT, DEFAULT_POLICY, "m")
    assert [(v.model, v.variant) for v in out.variants] == [("m", "v1"), ("m", "v2")]
    v1, v2 = out.variants
    assert (v1.desired_copies, list(v1.placed), v1.policy) == (1, [], "built-in: default")
    verdicts = {n.node_id: n for n in v1.nodes}
    assert not verdicts["core"].feasible and verdicts["core"].filtered_by  # the selector says edge
    assert verdicts["edge"].feasible and verdicts["edge"].selected
    assert list(v2.placed) == ["core"]


def test_a_holder_holds_a_copy_and_a_node_that_gets_nothing_is_not_selected() -> None:
    # v2 wants one copy and core holds it: nothing is missing, so edge is only scored.
    [v2] = explain_placement(SNAPSHOT, DEFAULT_POLICY, "m", "v2").variants
    verdicts = {n.node_id: n for n in v2.nodes}
    assert verdicts["core"].reason == "holds a copy" and not verdicts["core"].filtered_by
    assert verdicts["edge"].feasible and not verdicts["edge"].selected
    assert v2.desired_copies == 1


def test_one_variant_when_named() -> None:
    out = explain_placement(SNAPSHOT, DEFAULT_POLICY, "m", "v2")
    assert [v.variant for v in out.variants] == ["v2"]


@pytest.mark.parametrize(
    ("model", "variant", "message"),
    [
        ("nope", "", "model 'nope' is not registered"),
        ("m", "v9", "model 'm' variant 'v9' is not registered"),
    ],
    ids=["an unknown model", "an unknown variant of a known model"],
)
def test_what_is_not_registered_is_not_found(model: str, variant: str, message: str) -> None:
    with pytest.raises(NotFound, match=message):
        explain_placement(SNAPSHOT, DEFAULT_POLICY, model, variant)
