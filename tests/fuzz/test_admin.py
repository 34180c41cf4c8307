"""Hostile Admin API calls: every call answers OK or a precise status with a message, and the
stored state stays consistent (nothing malformed reaches etcd; ListModels still works)."""

from __future__ import annotations

import re
from typing import Any

import grpc
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshserve.controlplane import keys
from meshserve.protos import mesh_pb2, mesh_pb2_grpc
from tests.fuzz._support import FUZZ, LiveMesh, answer
from tests.fuzz.test_policy import policy_texts

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
NOWHERE = {"fuzz": "nowhere"}  # no node carries this label: accepted specs are never loaded

names = st.one_of(
    st.sampled_from(["", "../x", "a/b", "..", ".hidden", "mlp", "x" * 129, "é", "a\x00b", " a"]),
    st.text(max_size=40),
    st.from_regex(_NAME, fullmatch=True),
)
uris = st.one_of(
    st.sampled_from(
        ["", "file:///nonexistent.onnx", "ftp://127.0.0.1/x", "http://127.0.0.1:1/x.onnx", "::"]
    ),
    st.text(max_size=60),
)
shas = st.one_of(
    st.just("ab" * 32), st.just("AB" * 32), st.text(max_size=70), st.text("0123456789abcdefg")
)
numbers = st.floats()  # NaN and infinities included
sketches = st.builds(
    mesh_pb2.Sketch,
    name=st.text(max_size=20),
    edges=st.lists(numbers, max_size=80),
    counts=st.lists(st.integers(0, 2**64 - 1), max_size=200),
)
profiles = st.builds(
    mesh_pb2.DriftProfile,
    input=st.text(max_size=10),
    features=st.lists(sketches, max_size=5) | st.lists(st.just(mesh_pb2.Sketch()), max_size=2000),
    output=sketches,
    rows=st.integers(0, 2**64 - 1),
    source=st.text(max_size=20),
)


@st.composite
def specs(draw: st.DrawFn) -> mesh_pb2.ModelSpec:
    spec = mesh_pb2.ModelSpec(
        name=draw(names),
        variant=draw(names | st.just("")),
        artifact_uri=draw(uris),
        sha256=draw(shas),
        copies=draw(st.integers(0, 2**32 - 1)),
        node_selector=NOWHERE,
        size_bytes=draw(st.integers(0, 2**64 - 1)),
        accuracy=draw(numbers),
        slo_ms=draw(numbers),
    )
    for tensor in draw(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3)):
        spec.inputs.add(name=tensor[0], datatype=tensor[1])
    if draw(st.booleans()):
        spec.autoscaling.min_copies = draw(st.integers(0, 2**32 - 1))
        spec.autoscaling.max_copies = draw(st.integers(0, 2**32 - 1))
        spec.autoscaling.target_in_flight = draw(numbers)
    spec.serving.monitoring.log_sample_rate = draw(numbers)
    if draw(st.booleans()):
        spec.drift_reference.CopyFrom(draw(profiles))
    return spec


feedback_items = st.builds(
    mesh_pb2.FeedbackItem, request_id=st.text(max_size=30), label=st.integers(-(2**63), 2**63 - 1)
) | st.builds(mesh_pb2.FeedbackItem, request_id=st.text(max_size=30), value=numbers)
feedback = st.builds(
    mesh_pb2.FeedbackRequest,
    model=st.sampled_from(["mlp", "", "nope"]) | st.text(max_size=20),
    items=st.lists(feedback_items, max_size=20)
    | st.integers(0, 12_000).map(lambda n: [mesh_pb2.FeedbackItem(request_id="r", label=1)] * n),
)


@st.composite
def admin_calls(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["register", "remove", "drain", "feedback", "profile", "policy"]))
    if kind == "register":
        return kind, mesh_pb2.RegisterModelRequest(model=draw(specs()))
    if kind == "remove":
        return kind, mesh_pb2.RemoveModelRequest(name=draw(names), variant=draw(names))
    if kind == "drain":
        return kind, mesh_pb2.DrainNodeRequest(
            node_id=draw(st.sampled_from(["edge", "core"]) | names), undrain=draw(st.booleans())
        )
    if kind == "feedback":
        return kind, draw(feedback)
    if kind == "profile":
        return kind, mesh_pb2.SetDriftProfileRequest(
            model=draw(st.just("mlp") | names), variant=draw(names), profile=draw(profiles)
        )
    return kind, mesh_pb2.ApplyPolicyRequest(yaml=draw(policy_texts), dry_run=True)


def _stored(mesh: LiveMesh, prefix: str) -> dict[str, bytes]:
    async def read() -> dict[str, bytes]:
        etcd = mesh.mesh.cp._etcd
        result = await etcd.get_prefix(prefix.encode())
        return {bytes(kv.key).decode(): bytes(kv.value) for kv in result}

    return mesh.run(read())


def test_random_admin_calls_get_precise_statuses_and_store_nothing_malformed(
    mesh: LiveMesh,
) -> None:
    policy_before = _stored(mesh, keys.POLICY)
    with grpc.insecure_channel(mesh.address) as channel:
        admin = mesh_pb2_grpc.AdminStub(channel)
        calls = {
            "register": admin.RegisterModel,
            "remove": admin.RemoveModel,
            "drain": admin.DrainNode,
            "feedback": admin.Feedback,
            "profile": admin.SetDriftProfile,
            "policy": admin.ApplyPolicy,
        }

        @settings(FUZZ, max_examples=200)
        @given(call=admin_calls())
        def check(call: tuple[str, Any]) -> None:
            kind, request = call
            code, out = answer(calls[kind], request)
            if kind == "register" and code == grpc.StatusCode.OK:
                assert _NAME.match(out.model.name) and _NAME.match(out.model.variant)
            if kind == "drain" and not request.undrain and request.node_id not in ("edge", "core"):
                assert code == grpc.StatusCode.NOT_FOUND, (code, out)

        check()
        # The state is consistent: every stored model is a valid spec, and is listed.
        stored = _stored(mesh, keys.MODELS)
        listed = answer(admin.ListModels, mesh_pb2.ListModelsRequest())[1].models
        mesh.wait_for(lambda: len(mesh.mesh.cp.snapshot().models) == len(stored), what="the mirror")
        for key, value in stored.items():
            spec = keys.decode(value, mesh_pb2.ModelSpec())
            assert _NAME.match(spec.name) and _NAME.match(spec.variant), key
            assert key == keys.model_key(spec.name, spec.variant)
            assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256), key
            assert 1 <= spec.copies <= 1000
        assert {
            (m.name, m.variant)
            for m in answer(admin.ListModels, mesh_pb2.ListModelsRequest())[1].models
        } >= {("mlp", "default")}
        assert len(listed) >= 1
        # Nothing drained but linked nodes; the policy was never replaced by a dry run.
        for key in _stored(mesh, keys.DRAINING):
            assert key.removeprefix(keys.DRAINING) in ("edge", "core"), key
        assert _stored(mesh, keys.POLICY) == policy_before
        for node in ("edge", "core"):
            admin.DrainNode(mesh_pb2.DrainNodeRequest(node_id=node, undrain=True), timeout=10)


def test_invalid_policies_are_never_stored(mesh: LiveMesh) -> None:
    before = _stored(mesh, keys.POLICY)
    with grpc.insecure_channel(mesh.address) as channel:
        admin = mesh_pb2_grpc.AdminStub(channel)

        @settings(FUZZ, max_examples=60)
        @given(text=policy_texts)
        def check(text: str) -> None:
            dry = mesh_pb2.ApplyPolicyRequest(yaml=text, dry_run=True)
            code, out = answer(admin.ApplyPolicy, dry)
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), out
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert out.startswith("invalid policy: ")
                # Applied for real, it is refused the same way and nothing is written.
                real = mesh_pb2.ApplyPolicyRequest(yaml=text)
                assert answer(admin.ApplyPolicy, real)[0] == grpc.StatusCode.INVALID_ARGUMENT

        check()
    assert _stored(mesh, keys.POLICY) == before


def test_yaml_dump_of_nested_data_round_trips_as_text() -> None:
    """The policy strategy's YAML is real YAML (a guard on the generator itself)."""
    assert yaml.safe_load(yaml.safe_dump({"name": "x", "rules": [{"models": ["a*"]}]}))
