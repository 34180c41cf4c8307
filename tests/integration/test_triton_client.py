"""An unmodified tritonclient talks to the gateway; answers equal in-process onnxruntime's.

Real etcd, a real control-plane process and two real node processes on loopback: ``edge-1`` has
no inbound port (its queries are tunneled down its own stream), ``core-1`` serves OIP directly.
Node selectors pin each model to one of them so both paths are exercised deterministically.

tritonclient runs in this test process, beside ``meshserve`` (our OIP messages live in the private
proto package ``meshserve.inference``, so both register in protobuf's default pool), and the last
test has the SDK and tritonclient query the same gateway from this one process.
"""

from __future__ import annotations

import asyncio
import queue
import sys
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from meshserve import MeshClient
from meshserve.client._admin import AdminClient
from meshserve.devtools.demo_models import make_int_model, make_mlp, reference_outputs
from meshserve.devtools.local import LocalMesh, ManagedProcess
from tests.support.mesh import register_file, wait_copies

pytestmark = pytest.mark.integration

TIERS = pytest.mark.parametrize(
    ("tier", "node"),
    [("edge", "edge-1"), ("core", "core-1")],
    ids=["tunnel-to-edge-node", "direct-to-core-node"],
)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, ManagedProcess]]:
    work = tmp_path_factory.mktemp("mesh")
    with LocalMesh(work) as local:
        local.start_etcd()
        cp = local.start_controlplane("cp-1")
        local.start_node("edge-1", [cp.address], labels={"tier": "edge", "zone": "b"})
        local.start_node("core-1", [cp.address], labels={"tier": "core", "zone": "a"}, direct=True)
        models = work / "models"
        with AdminClient(cp.address) as admin:
            for tier in ("edge", "core"):
                register_file(
                    admin, f"mlp-{tier}", make_mlp(models / "mlp.onnx"), selector={"tier": tier}
                )
                register_file(
                    admin,
                    f"int-{tier}",
                    make_int_model(models / "int.onnx"),
                    selector={"tier": tier},
                )
            for name in ("mlp-edge", "mlp-core", "int-edge", "int-core"):
                wait_copies(admin, name, 1)
        yield local, cp


@pytest.fixture
def triton(mesh: tuple[LocalMesh, ManagedProcess]) -> Iterator[tc.InferenceServerClient]:
    client = tc.InferenceServerClient(url=mesh[1].address)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def triton_aio(
    mesh: tuple[LocalMesh, ManagedProcess],
) -> AsyncIterator[tc_aio.InferenceServerClient]:
    client = tc_aio.InferenceServerClient(url=mesh[1].address)
    try:
        yield client
    finally:
        await client.close()


def _inputs(arrays: dict[str, np.ndarray]) -> list[tc.InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = tc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _answered_by(result: Any) -> str:
    """The node that answered, from the response parameters the gateway adds."""
    params = result.get_response(as_json=True).get("parameters", {})
    return str(params["meshserve_node"]["string_param"])


def _reference(
    mesh: tuple[LocalMesh, ManagedProcess], file: str, inputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """What in-process onnxruntime answers for the model file the mesh serves."""
    return reference_outputs(mesh[0].workdir / "models" / file, inputs)


# -- tritonclient.grpc (blocking) ------------------------------------------------------------------


@TIERS
def test_tritonclient_fp32_mlp(
    mesh: tuple[LocalMesh, ManagedProcess], triton: tc.InferenceServerClient, tier: str, node: str
) -> None:
    model = f"mlp-{tier}"
    assert triton.is_server_live() is True
    assert triton.is_model_ready(model) is True
    with pytest.raises(InferenceServerException) as unimplemented:
        triton.load_model(model)  # an RPC of Triton's service we do not implement
    assert unimplemented.value.status() == "StatusCode.UNIMPLEMENTED"
    meta = triton.get_model_metadata(model, as_json=True)
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert meta["outputs"][0]["name"] == "y"

    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    outputs = [tc.InferRequestedOutput(o["name"]) for o in meta["outputs"]]
    result = triton.infer(model, _inputs({"x": x}), outputs=outputs, client_timeout=30)
    assert _answered_by(result) == node
    expected = _reference(mesh, "mlp.onnx", {"x": x})
    np.testing.assert_allclose(result.as_numpy("y"), expected["y"], rtol=1e-6, atol=1e-6)


@TIERS
def test_tritonclient_int64_model(
    mesh: tuple[LocalMesh, ManagedProcess], triton: tc.InferenceServerClient, tier: str, node: str
) -> None:
    model = f"int-{tier}"
    meta = triton.get_model_metadata(model, as_json=True)
    assert {o["datatype"] for o in meta["outputs"]} == {"INT64", "FP32"}
    k = np.array([[1, -2, 3, 2**40], [0, 7, -9, 11]], dtype=np.int64)
    outputs = [tc.InferRequestedOutput(o["name"]) for o in meta["outputs"]]
    result = triton.infer(model, _inputs({"k": k}), outputs=outputs, client_timeout=30)
    assert _answered_by(result) == node
    np.testing.assert_array_equal(result.as_numpy("doubled"), k * 2 + 1)
    np.testing.assert_array_equal(result.as_numpy("as_float"), k.astype(np.float32) * 0.5)
    expected = _reference(mesh, "int.onnx", {"k": k})
    np.testing.assert_array_equal(result.as_numpy("doubled"), expected["doubled"])


@TIERS
def test_tritonclient_streaming_returns_every_answer_with_its_id(
    mesh: tuple[LocalMesh, ManagedProcess], triton: tc.InferenceServerClient, tier: str, node: str
) -> None:
    x = np.random.default_rng(5).standard_normal((12, 64)).astype(np.float32)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def callback(out: queue.Queue[tuple[Any, Any]], result: Any, error: Any) -> None:
        out.put((result, error))

    triton.start_stream(callback=partial(callback, answers))
    try:
        for i in range(len(x)):
            triton.async_stream_infer(
                f"mlp-{tier}", _inputs({"x": x[i : i + 1]}), request_id=f"row-{i}"
            )
        got = [answers.get(timeout=30) for _ in range(len(x))]
    finally:
        triton.stop_stream()
    assert [str(e) for _, e in got if e is not None] == []
    by_id = {r.get_response().id: r for r, _ in got}
    assert sorted(by_id) == sorted(f"row-{i}" for i in range(len(x)))
    expected = _reference(mesh, "mlp.onnx", {"x": x})["y"]
    for i in range(len(x)):
        result = by_id[f"row-{i}"]
        assert _answered_by(result) == node
        np.testing.assert_allclose(result.as_numpy("y"), expected[i : i + 1], rtol=1e-5, atol=1e-5)


# -- tritonclient.grpc.aio ------------------------------------------------------------------------


@TIERS
async def test_tritonclient_aio_infer(
    mesh: tuple[LocalMesh, ManagedProcess],
    triton_aio: tc_aio.InferenceServerClient,
    tier: str,
    node: str,
) -> None:
    model = f"mlp-{tier}"
    assert await triton_aio.is_server_live() is True
    assert await triton_aio.is_model_ready(model) is True
    meta = await triton_aio.get_model_metadata(model, as_json=True)
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "64"]}]
    x = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    results = await asyncio.gather(
        *(
            triton_aio.infer(model, _inputs({"x": x[i : i + 1]}), client_timeout=30)
            for i in range(len(x))
        )
    )
    expected = _reference(mesh, "mlp.onnx", {"x": x})["y"]
    for i, result in enumerate(results):
        assert _answered_by(result) == node
        np.testing.assert_allclose(result.as_numpy("y"), expected[i : i + 1], rtol=1e-5, atol=1e-5)


@TIERS
async def test_tritonclient_aio_stream_infer(
    mesh: tuple[LocalMesh, ManagedProcess],
    triton_aio: tc_aio.InferenceServerClient,
    tier: str,
    node: str,
) -> None:
    k = np.arange(6 * 4, dtype=np.int64).reshape(6, 4) - 11

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for i in range(len(k)):
            yield {
                "model_name": f"int-{tier}",
                "inputs": _inputs({"k": k[i : i + 1]}),
                "request_id": f"row-{i}",
            }

    answers = triton_aio.stream_infer(requests(), stream_timeout=30)
    got: dict[str, Any] = {}
    async with asyncio.timeout(30):
        async for result, error in answers:
            assert error is None, str(error)
            got[result.get_response().id] = result
            if len(got) == len(k):
                break
    answers.cancel()
    assert sorted(got) == sorted(f"row-{i}" for i in range(len(k)))
    for i in range(len(k)):
        assert _answered_by(got[f"row-{i}"]) == node
        np.testing.assert_array_equal(got[f"row-{i}"].as_numpy("doubled"), k[i : i + 1] * 2 + 1)


# -- one process, both clients -------------------------------------------------------------------


@TIERS
def test_meshclient_and_tritonclient_in_one_process_share_the_gateway(
    mesh: tuple[LocalMesh, ManagedProcess], triton: tc.InferenceServerClient, tier: str, node: str
) -> None:
    """A team moving from Triton one service at a time: this process has imported both
    tritonclient.grpc and meshserve, and both query the same gateway for the same model,
    interleaved, getting the answer in-process onnxruntime gives."""
    assert "tritonclient.grpc.service_pb2" in sys.modules
    assert "meshserve.protos.inference_pb2" in sys.modules
    model = f"mlp-{tier}"
    x = np.random.default_rng(11).standard_normal((4, 64)).astype(np.float32)
    expected = _reference(mesh, "mlp.onnx", {"x": x})["y"]
    with MeshClient(mesh[1].address, timeout=30) as sdk:
        for _ in range(2):
            ours = sdk.infer(model, {"x": x})
            theirs = triton.infer(model, _inputs({"x": x}), client_timeout=30)
            assert ours.node == node
            assert _answered_by(theirs) == node
            np.testing.assert_allclose(ours["y"], expected, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(theirs.as_numpy("y"), expected, rtol=1e-6, atol=1e-6)
