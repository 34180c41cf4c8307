"""OIP over HTTP/REST: the pure conversions of meshserve.common.rest (JSON and Triton's binary
extension to ModelInferRequest, ModelInferResponse back, gRPC status to HTTP)."""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshserve.common import rest
from meshserve.common.codec import decode_request_inputs, encode_response_outputs
from meshserve.common.datatypes import TABLE
from meshserve.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    map_errors,
)
from meshserve.common.process import listen_address
from meshserve.common.rest_server import RestHandlers, build_app, ssl_context
from meshserve.common.security import TLSFiles
from meshserve.protos import inference_pb2, inference_pb2_grpc


def _json_body(**fields: object) -> bytes:
    doc: dict[str, object] = {
        "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4.5]]}]
    }
    doc.update(fields)
    return json.dumps(doc).encode()


def test_json_nested_and_flat_data_decode_alike() -> None:
    nested = rest.parse_infer(_json_body(id="q1"), None, "mlp", "v2")
    flat = rest.parse_infer(
        json.dumps(
            {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4.5]}]}
        ).encode(),
        None,
        "mlp",
    )
    want = np.array([[1, 2], [3, 4.5]], dtype=np.float32)
    for call in (nested, flat):
        np.testing.assert_array_equal(decode_request_inputs(call.request)["x"], want)
    assert nested.request.model_name == "mlp"
    assert nested.request.model_version == "v2"
    assert nested.request.id == "q1"


def test_bytes_bool_and_int_inputs() -> None:
    body = json.dumps(
        {
            "inputs": [
                {"name": "s", "shape": [2], "datatype": "BYTES", "data": ["ab", "é"]},
                {"name": "b", "shape": [2], "datatype": "BOOL", "data": [True, False]},
                {"name": "i", "shape": [1], "datatype": "INT64", "data": [2**40]},
            ]
        }
    ).encode()
    got = decode_request_inputs(rest.parse_infer(body, None, "m").request)
    assert list(got["s"]) == [b"ab", "é".encode()]
    assert got["b"].tolist() == [True, False]
    assert got["i"].tolist() == [2**40]


def test_binary_extension_request() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 3],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
            "parameters": {"timeout": 2_000_000, "slo_ms": 50},
        }
    ).encode()
    call = rest.parse_infer(header + x.tobytes(), str(len(header)), "m")
    np.testing.assert_array_equal(decode_request_inputs(call.request)["x"], x)
    assert call.binary == {"y": True}
    assert call.timeout_s == 2.0
    assert call.request.parameters["slo_ms"].int64_param == 50
    assert "timeout" not in call.request.parameters
    assert [o.name for o in call.request.outputs] == ["y"]


@pytest.mark.parametrize(
    ("body", "length", "says"),
    [
        (b"not json", None, "not valid JSON"),
        (b"[1]", None, "JSON object"),
        (_json_body(inputs=[]), None, "non-empty"),
        (
            _json_body(inputs=[{"name": "x", "shape": [2], "datatype": "FP99", "data": [1, 2]}]),
            None,
            "unknown datatype",
        ),
        (
            _json_body(inputs=[{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]),
            None,
            "holds 3 elements",
        ),
        (
            _json_body(inputs=[{"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}]),
            None,
            "UINT8 data",
        ),
        (
            _json_body(inputs=[{"name": "x", "shape": [1], "datatype": "FP32", "data": ["1"]}]),
            None,
            "numbers",
        ),
        (_json_body(), "99999", "Inference-Header-Content-Length"),
        (_json_body() + b"\0\0", None, "not valid JSON"),
    ],
)
def test_bad_bodies_are_invalid_argument(body: bytes, length: str | None, says: str) -> None:
    with pytest.raises(InvalidArgument, match=says):
        rest.parse_infer(body, length, "m")


def test_unclaimed_binary_bytes_are_refused() -> None:
    header = _json_body()
    with pytest.raises(InvalidArgument, match="no input's binary_data_size"):
        rest.parse_infer(header + b"\0" * 4, str(len(header)), "m")


def _response() -> inference_pb2.ModelInferResponse:
    response = inference_pb2.ModelInferResponse(model_name="m", model_version="v1", id="q")
    encode_response_outputs(
        response,
        {"y": np.array([[0.5, 1.5]], dtype=np.float32), "k": np.array([7], dtype=np.int64)},
    )
    response.parameters["meshserve_node"].string_param = "n1"
    return response


def test_render_json() -> None:
    body, headers = rest.render_infer(
        _response(), rest.InferCall(inference_pb2.ModelInferRequest())
    )
    assert headers == {"Content-Type": "application/json"}
    doc = json.loads(body)
    assert doc["model_name"] == "m" and doc["model_version"] == "v1" and doc["id"] == "q"
    assert doc["parameters"] == {"meshserve_node": "n1"}
    assert doc["outputs"][0] == {
        "name": "y",
        "datatype": "FP32",
        "shape": [1, 2],
        "data": [0.5, 1.5],
    }
    assert doc["outputs"][1]["data"] == [7]


def test_render_binary_for_the_outputs_asked() -> None:
    call = rest.InferCall(inference_pb2.ModelInferRequest(), binary={"y": True})
    body, headers = rest.render_infer(_response(), call)
    n = int(headers[rest.HEADER_LENGTH])
    doc = json.loads(body[:n])
    y, k = doc["outputs"]
    assert y["parameters"]["binary_data_size"] == 8 and "data" not in y
    assert k["data"] == [7]
    assert struct.unpack("<2f", body[n:]) == (0.5, 1.5)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.FAILED_PRECONDITION, 500),
    ],
)
def test_status_mapping(code: grpc.StatusCode, status: int) -> None:
    assert rest.http_status(code) == status


def test_retry_after_and_error_body() -> None:
    assert rest.retry_after_header("1500") == "2"
    assert rest.retry_after_header("10") == "1"
    assert rest.retry_after_header("soon") is None
    assert json.loads(rest.error_body('model "x" not found')) == {"error": 'model "x" not found'}


def test_model_config_renders_as_tritons_http_json() -> None:
    config = inference_pb2.ModelConfig(
        name="m", platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=32
    )
    config.input.add(name="x", data_type=inference_pb2.TYPE_FP32, dims=[8, 3])
    config.output.add(name="y", data_type=inference_pb2.TYPE_INT64, dims=[1])
    doc = rest.config_json(inference_pb2.ModelConfigResponse(config=config))
    assert doc == {
        "name": "m",
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": 32,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [8, 3]}],  # numbers
        "output": [{"name": "y", "data_type": "TYPE_INT64", "dims": [1]}],
    }
    bare = rest.config_json(inference_pb2.ModelConfigResponse(config=inference_pb2.ModelConfig()))
    assert bare == {}


def test_repository_index_request_and_answer() -> None:
    assert rest.parse_index_request(b"") == inference_pb2.RepositoryIndexRequest()
    assert rest.parse_index_request(b'{"ready": true}').ready
    for body, says in [
        (b'{"ready": 1}', "true or false"),
        (b'{"repository_name": "r"}', "unknown field"),
        (b"[]", "JSON object"),
        (b"{", "not valid JSON"),
    ]:
        with pytest.raises(InvalidArgument, match=says):
            rest.parse_index_request(body)
    answer = inference_pb2.RepositoryIndexResponse()
    answer.models.add(name="a", version="v1", state="READY")
    answer.models.add(name="b", version="v2", state="UNAVAILABLE", reason="no ready copy")
    assert rest.index_json(answer) == [
        {"name": "a", "version": "v1", "state": "READY"},
        {"name": "b", "version": "v2", "state": "UNAVAILABLE", "reason": "no ready copy"},
    ]


def test_http_listen_parsing() -> None:
    assert listen_address(":8080", "--http-listen") == ("127.0.0.1", 8080)
    assert listen_address("0.0.0.0:80", "--http-listen") == ("0.0.0.0", 80)
    assert listen_address("[::1]:9", "--http-listen") == ("::1", 9)
    with pytest.raises(ValueError, match="--http-listen"):
        listen_address("host:port", "--http-listen")


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_tensor = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=4) | st.integers(),
        "shape": st.lists(st.integers(-2, 4), max_size=4) | _json_values,
        "datatype": st.sampled_from(["FP32", "INT8", "BYTES", "BOOL", "FP16", "X"]) | _json_values,
        "data": _json_values,
        "parameters": st.dictionaries(
            st.sampled_from(["binary_data_size", "binary_data", "p"]), _json_values, max_size=2
        ),
    },
)
_bodies = st.fixed_dictionaries(
    {},
    optional={
        "id": _json_values,
        "inputs": st.lists(_tensor, max_size=3) | _json_values,
        "outputs": st.lists(_tensor, max_size=2) | _json_values,
        "parameters": st.dictionaries(
            st.sampled_from(["timeout", "binary_data_output", "slo_ms"]), _json_values, max_size=2
        ),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies | _json_values, tail=st.binary(max_size=16), binary=st.booleans())
def test_random_bodies_never_crash(body: object, tail: bytes, binary: bool) -> None:
    """Whatever the JSON, parsing answers a request or a 4xx with a JSON error; never a crash."""
    header = json.dumps(body).encode()
    data, length = (header + tail, str(len(header))) if binary else (header, None)
    try:
        call = rest.parse_infer(data, length, "m")
    except InvalidArgument as exc:
        assert 400 <= rest.http_status(exc.code) < 500
        assert json.loads(rest.error_body(exc.message))["error"]
    else:
        assert call.request.inputs
        assert len(call.request.raw_input_contents) == len(call.request.inputs)


# -- the app (common/rest_server.py) over a servicer, as a process registers it --------------------


class _Servicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """A servicer whose ModelInfer answers by the model it is asked for (what a process's
    servicer does, minus the mesh): the REST app must answer its outcomes as the protocol says."""

    def __init__(self) -> None:
        self.seen: list[tuple[tuple[str, str], ...]] = []
        self.never = asyncio.Event()

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return inference_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return inference_pb2.ServerReadyResponse(ready=False)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return inference_pb2.ServerMetadataResponse(name="s", version="1")

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return inference_pb2.ModelReadyResponse(ready=request.name == "m")

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        raise NotFound(f"model {request.name!r} not found")

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        self.seen.append(tuple(context.invocation_metadata()))
        if request.model_name == "full":
            raise ResourceExhausted("full", 1.2)
        if request.model_name == "slow":
            await self.never.wait()
        if request.model_name == "denied":
            raise PermissionDenied("not yours")
        if request.model_name == "aborted":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gone")
        response = inference_pb2.ModelInferResponse(model_name=request.model_name)
        encode_response_outputs(response, decode_request_inputs(request))
        return response.SerializeToString()  # a gateway may answer bytes


@pytest.fixture
async def app_client() -> AsyncIterator[tuple[TestClient[Any, Any], _Servicer]]:
    servicer = map_errors(_Servicer())
    app = build_app(RestHandlers.of(servicer), max_body_bytes=4096)
    async with TestClient(TestServer(app)) as client:
        yield client, servicer


_X = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}


async def test_app_answers_and_maps_outcomes(
    app_client: tuple[TestClient[Any, Any], _Servicer],
) -> None:
    client, servicer = app_client
    live = await client.get("/v2/health/live")
    assert live.status == 200 and await live.json() == {"live": True}
    assert (await client.get("/v2/health/ready")).status == 400
    assert (await client.get("/v2/models/m/versions/3/ready")).status == 200
    missing = await client.get("/v2/models/nope")
    assert missing.status == 404 and "nope" in (await missing.json())["error"]

    ok = await client.post(
        "/v2/models/echo/infer",
        json=_X,
        headers={
            "Authorization": "Bearer k",
            "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
            "Cookie": "c=1",
        },
    )
    assert ok.status == 200
    assert (await ok.json())["outputs"][0]["data"] == [1.0, 2.0]
    forwarded = dict(servicer.seen[-1])
    assert forwarded["authorization"] == "Bearer k"
    assert forwarded["traceparent"].startswith("00-1111")
    assert "cookie" not in forwarded  # only the headers the protocol's checks read

    full = await client.post("/v2/models/full/infer", json=_X)
    assert full.status == 429 and full.headers["Retry-After"] == "2"
    assert (await full.json())["error"].startswith("full")
    denied = await client.post("/v2/models/denied/infer", json=_X)
    assert denied.status == 403 and (await denied.json()) == {"error": "not yours"}
    aborted = await client.post("/v2/models/aborted/infer", json=_X)
    assert aborted.status == 503 and (await aborted.json()) == {"error": "gone"}
    slow = await client.post("/v2/models/slow/infer", json=_X, headers={"timeout": "0.05"})
    assert slow.status == 504 and "deadline" in (await slow.json())["error"]
    big = await client.post("/v2/models/echo/infer", data=b" " * 5000)
    assert big.status == 413 and "exceeds 4096 bytes" in (await big.json())["error"]
    bad = await client.post("/v2/models/echo/infer", data=b"{", headers={"timeout": "x"})
    assert bad.status == 400 and "error" in await bad.json()


class _Echo(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers every query with its own inputs as outputs, once they decode (as a server
    checks a request's contents against its header before it answers)."""

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        decode_request_inputs(request)
        response = inference_pb2.ModelInferResponse(model_name=request.model_name)
        response.outputs.extend(
            inference_pb2.ModelInferResponse.InferOutputTensor(
                name=t.name, datatype=t.datatype, shape=t.shape
            )
            for t in request.inputs
        )
        response.raw_output_contents.extend(request.raw_input_contents)
        return response


async def _post(body: bytes, headers: dict[str, str]) -> tuple[int, bytes, str]:
    app = build_app(RestHandlers.of(map_errors(_Echo())), max_body_bytes=1 << 16)
    async with TestClient(TestServer(app)) as client:
        answer = await client.post("/v2/models/m/infer", data=body, headers=headers)
        return answer.status, await answer.read(), answer.headers.get("Content-Type", "")


_scalar = st.booleans() | st.integers(-300, 300) | st.floats(width=32) | st.text(max_size=3)
_near_fields: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(["x", "y"]),
    "shape": st.lists(st.integers(0, 3), max_size=3),
    "datatype": st.sampled_from(sorted(TABLE)),
    "data": st.lists(_scalar | st.lists(_scalar, max_size=3), max_size=9),
}
_near_tensor = st.fixed_dictionaries(
    _near_fields,
    optional={"parameters": st.fixed_dictionaries({"binary_data_size": st.integers(0, 8)})},
)
_near_bodies = st.fixed_dictionaries(
    {"inputs": st.lists(_near_tensor, min_size=1, max_size=2)},
    optional={
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["x", "y"])},
                optional={"parameters": st.fixed_dictionaries({"binary_data": st.booleans()})},
            ),
            max_size=2,
        ),
        "parameters": st.fixed_dictionaries({"binary_data_output": st.booleans()}),
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies | _near_bodies, tail=st.binary(max_size=16), binary=st.booleans())
def test_random_bodies_get_an_answer_or_a_4xx_json_error_from_the_app(
    body: object, tail: bytes, binary: bool
) -> None:
    header = json.dumps(body).encode()
    data = header + tail if binary else header
    headers = {rest.HEADER_LENGTH: str(len(header))} if binary else {}
    status, answer, kind = asyncio.run(_post(data, headers))
    if status == 200:
        return
    assert 400 <= status < 500, (status, answer)
    assert kind == "application/json"
    assert json.loads(answer)["error"]


def test_the_https_context_trusts_only_the_listeners_cas(tmp_path: Path) -> None:
    from meshserve.devtools.certs import init_certs

    certs = tmp_path / "certs"
    init_certs(certs, nodes=["n1"])
    tls = TLSFiles(
        certs / "controlplane-trust.crt", certs / "controlplane.crt", certs / "controlplane.key"
    )
    assert ssl_context(None, require_client_cert=False) is None
    open_ = ssl_context(tls, require_client_cert=False)
    assert open_ is not None and open_.verify_mode == ssl.CERT_NONE
    mtls = ssl_context(tls, require_client_cert=True)
    assert mtls is not None and mtls.verify_mode == ssl.CERT_REQUIRED
    cas: list[Any] = mtls.get_ca_certs()
    subjects = {
        pair[1] for ca in cas for rdn in ca["subject"] for pair in rdn if pair[0] == "commonName"
    }
    assert subjects == {f"meshserve development {r} CA" for r in ("controlplane", "node", "client")}
