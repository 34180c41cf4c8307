"""OIP v2 over HTTP/REST (``--http-listen``): curl and tritonclient.http against a real mesh.

Real etcd, a control-plane replica serving REST beside gRPC, a node whose direct port serves REST
too, and a standalone ``meshserve-gateway`` with API keys (its REST port checks them as its gRPC
port does). Answers are compared with in-process onnxruntime's; errors are the JSON bodies and
statuses the protocol's clients expect. curl only ever talks to 127.0.0.1.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from meshserve.client._admin import AdminClient
from meshserve.common.security import TLSFiles
from meshserve.devtools.demo_models import make_mlp, reference_outputs
from meshserve.devtools.local import LocalMesh, free_port, wait_until
from tests.support.mesh import register_file, wait_copies
from tests.support.spans import logged_span

pytestmark = pytest.mark.integration

CURL = "/usr/bin/curl"


@dataclass
class Rest:
    work: Path
    replica: str  # host:port of the replica's REST listener
    node: str  # the node's direct REST listener
    gateway: str  # the standalone gateway's (API keys on)
    acme: str  # may query mlp
    globex: str  # may query other

    def reference(self, x: np.ndarray) -> np.ndarray:
        return reference_outputs(self.work / "models" / "mlp.onnx", {"x": x})["y"]


def _curl(
    url: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    tls: list[str] | None = None,
) -> tuple[int, Any]:
    """(status, JSON body) of a curl call to ``url`` (loopback only); ``tls``: curl's TLS
    options (``--cacert``, ``--cert``, ``--key``)."""
    assert url.startswith(("http://127.0.0.1:", "https://127.0.0.1:"))
    argv = [CURL, "-s", "-S", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}", *(tls or [])]
    for key, value in (headers or {}).items():
        argv += ["-H", f"{key}: {value}"]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
    argv.append(url)
    done = subprocess.run(argv, input=body, capture_output=True, timeout=30, check=True)
    text, _, code = done.stdout.decode().rpartition("\n")
    return int(code), json.loads(text) if text else None


def _ready(address: str) -> bool:
    try:
        return _curl(f"http://{address}/v2/health/ready")[0] == 200
    except (subprocess.SubprocessError, ValueError):
        return False


@pytest.fixture(scope="module")
def rest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rest]:
    work = tmp_path_factory.mktemp("rest")
    acme, globex = secrets.token_hex(16), secrets.token_hex(16)
    (work / "keys.yaml").write_text(
        "tenants:\n"
        f"  - {{name: acme, keys: [{acme}], models: [mlp]}}\n"
        f"  - {{name: globex, keys: [{globex}], models: [other]}}\n"
    )
    replica_http, node_http, gateway_http = (f"127.0.0.1:{free_port()}" for _ in range(3))
    env = {**os.environ, "MESHSERVE_TRACE_CONSOLE": "1", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with LocalMesh(work, env=env) as local:
        local.start_etcd()
        cp = local.start_controlplane("cp-1", extra=["--http-listen", replica_http])
        local.start_node("n1", [cp.address], direct=True, extra=["--http-listen", node_http])
        model = make_mlp(work / "models" / "mlp.onnx", in_features=8, hidden=(16,), out_features=4)
        with AdminClient(cp.address) as admin:
            register_file(admin, "mlp", model)
            register_file(admin, "other", model)
            wait_copies(admin, "mlp", 1)
            wait_copies(admin, "other", 1)
        local.start_gateway(
            [cp.address],
            extra=["--api-keys-file", str(work / "keys.yaml"), "--http-listen", gateway_http],
        )
        for address in (replica_http, node_http, gateway_http):
            wait_until(functools.partial(_ready, address), 30, what=f"REST ready on {address}")
        yield Rest(work, replica_http, node_http, gateway_http, acme, globex)


def _x(rows: int = 3) -> np.ndarray:
    return np.random.default_rng(rows).standard_normal((rows, 8)).astype(np.float32)


def _infer_body(x: np.ndarray, **extra: Any) -> bytes:
    doc = {
        "id": "q-1",
        "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}],
        **extra,
    }
    return json.dumps(doc).encode()


# -- curl ------------------------------------------------------------------------------------------


def test_curl_health_metadata_and_json_infer(rest: Rest) -> None:
    base = f"http://{rest.replica}/v2"
    assert _curl(f"{base}/health/live") == (200, {"live": True})
    assert _curl(f"{base}/health/ready") == (200, {"ready": True})
    status, server = _curl(base)
    assert status == 200 and server["name"] == "meshserve"
    status, meta = _curl(f"{base}/models/mlp")
    assert status == 200
    assert meta["name"] == "mlp" and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]
    assert _curl(f"{base}/models/mlp/ready") == (200, {"name": "mlp", "ready": True})
    version = meta["versions"][0]
    status, pinned = _curl(f"{base}/models/mlp/versions/{version}")
    assert status == 200 and pinned["name"] == "mlp" and pinned["inputs"] == meta["inputs"]
    assert _curl(f"{base}/models/mlp/versions/{version}/ready")[0] == 200
    assert _curl(f"{base}/models/mlp/versions/no-such-version")[0] == 404

    x = _x()
    status, answer = _curl(f"{base}/models/mlp/infer", body=_infer_body(x))
    assert status == 200, answer
    assert answer["model_name"] == "mlp" and answer["id"] == "q-1"
    assert answer["parameters"]["meshserve_node"] == "n1"
    (y,) = answer["outputs"]
    assert y["name"] == "y" and y["datatype"] == "FP32" and y["shape"] == [3, 4]
    got = np.asarray(y["data"], dtype=np.float32).reshape(y["shape"])
    np.testing.assert_allclose(got, rest.reference(x), rtol=1e-5, atol=1e-6)

    status, answer = _curl(f"{base}/models/mlp/versions/{version}/infer", body=_infer_body(x))
    assert status == 200 and answer["outputs"][0]["shape"] == [3, 4]


def test_curl_errors_are_json_with_the_mapped_status(rest: Rest) -> None:
    base = f"http://{rest.replica}/v2/models"
    x = _x(1)
    status, answer = _curl(f"{base}/no-such-model/infer", body=_infer_body(x))
    assert status == 404 and "no-such-model" in answer["error"]
    assert _curl(f"{base}/no-such-model")[0] == 404
    assert _curl(f"{base}/no-such-model/ready") == (400, {"name": "no-such-model", "ready": False})
    wrong = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "INT64", "data": [1] * 8}]}
    status, answer = _curl(f"{base}/mlp/infer", body=json.dumps(wrong).encode())
    assert status == 400 and "INT64" in answer["error"], answer
    status, answer = _curl(f"{base}/mlp/infer", body=b"{not json")
    assert status == 400 and "JSON" in answer["error"]
    short = {"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": [0.0] * 8}]}
    status, answer = _curl(f"{base}/mlp/infer", body=json.dumps(short).encode())
    assert status == 400 and "16 elements" in answer["error"]


# -- tritonclient.http -----------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary-data"])
def test_tritonclient_http_infer(rest: Rest, binary: bool) -> None:
    client = th.InferenceServerClient(url=rest.replica)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("mlp")
        meta = client.get_model_metadata("mlp")
        assert meta["inputs"][0]["name"] == "x"
        x = _x(5)
        tensor = th.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        wanted = [th.InferRequestedOutput("y", binary_data=binary)]
        result = client.infer("mlp", [tensor], outputs=wanted, request_id="r-7")
        np.testing.assert_allclose(result.as_numpy("y"), rest.reference(x), rtol=1e-5, atol=1e-6)
        response = result.get_response()
        assert response["id"] == "r-7"
        assert response["parameters"]["meshserve_node"] == "n1"
        with pytest.raises(InferenceServerException) as refused:
            client.infer("no-such-model", [tensor])
        assert refused.value.status() == "404"
    finally:
        client.close()


def test_the_nodes_direct_port_answers_rest(rest: Rest) -> None:
    client = th.InferenceServerClient(url=rest.node)
    try:
        assert client.is_model_ready("mlp")
        x = _x(2)
        tensor = th.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        result = client.infer("mlp", [tensor])
        np.testing.assert_allclose(result.as_numpy("y"), rest.reference(x), rtol=1e-5, atol=1e-6)
        assert result.get_response()["parameters"]["meshserve_node"] == "n1"
    finally:
        client.close()
    status, answer = _curl(f"http://{rest.node}/v2/models/mlp/infer", body=_infer_body(x))
    assert status == 200 and answer["outputs"][0]["shape"] == [2, 4]


# -- Triton's model configuration and repository index over REST ----------------------------------


@pytest.mark.parametrize("where", ["replica", "node"])
def test_tritonclient_http_model_config_and_repository_index(rest: Rest, where: str) -> None:
    """``get_model_config`` and ``get_model_repository_index`` of tritonclient.http: the
    configuration derived from the ONNX file (the batch axis as ``max_batch_size``, dims as
    numbers as Triton's HTTP endpoint gives them), the index of every model with its state."""
    address = rest.replica if where == "replica" else rest.node
    client = th.InferenceServerClient(url=address)
    try:
        config = client.get_model_config("mlp")
        assert config["name"] == "mlp" and config["platform"] == "onnxruntime_onnx"
        assert config["backend"] == "onnxruntime" and config["max_batch_size"] >= 1
        assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [8]}]
        assert config["output"] == [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}]
        version = client.get_model_metadata("mlp")["versions"][0]
        assert client.get_model_config("mlp", version) == config
        with pytest.raises(InferenceServerException) as unknown:
            client.get_model_config("no-such-model")
        assert unknown.value.status() == "404"
        index = client.get_model_repository_index()
        assert sorted((m["name"], m["state"]) for m in index) == [
            ("mlp", "READY"),
            ("other", "READY"),
        ]
        assert all(m["version"] for m in index)
    finally:
        client.close()
    url = f"http://{address}/v2/repository/index"
    assert _curl(url, body=b'{"ready": true}')[1] == index
    status, answer = _curl(url, body=b'{"ready": "yes"}')
    assert status == 400 and "ready" in answer["error"]


def test_model_config_and_index_over_rest_obey_api_keys(rest: Rest) -> None:
    base = f"http://{rest.gateway}/v2"
    acme = {"Authorization": f"Bearer {rest.acme}"}
    globex = {"Authorization": f"Bearer {rest.globex}"}
    assert _curl(f"{base}/models/mlp/config")[0] == 401
    assert _curl(f"{base}/models/mlp/config", headers=globex)[0] == 403
    status, config = _curl(f"{base}/models/mlp/config", headers=acme)
    assert status == 200 and config["input"][0]["dims"] == [8]
    assert _curl(f"{base}/repository/index", body=b"")[0] == 401
    status, index = _curl(f"{base}/repository/index", body=b"", headers=acme)
    assert status == 200 and [m["name"] for m in index] == ["mlp"]
    status, index = _curl(f"{base}/repository/index", body=b"", headers=globex)
    assert status == 200 and [m["name"] for m in index] == ["other"]


# -- API keys (the standalone gateway) -------------------------------------------------------------


def test_api_keys_over_rest(rest: Rest) -> None:
    url = f"http://{rest.gateway}/v2/models/mlp/infer"
    body = _infer_body(_x(1))
    status, answer = _curl(url, body=body)
    assert status == 401, answer
    assert answer["error"]
    status, answer = _curl(url, body=body, headers={"Authorization": f"Bearer {rest.globex}"})
    assert status == 403, answer
    status, answer = _curl(url, body=body, headers={"Authorization": f"Bearer {rest.acme}"})
    assert status == 200, answer
    status, answer = _curl(url, body=body, headers={"x-api-key": rest.acme})
    assert status == 200, answer
    assert _curl(f"http://{rest.gateway}/v2/models/mlp")[0] == 401
    client = th.InferenceServerClient(url=rest.gateway)
    try:
        x = _x(2)
        tensor = th.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("mlp", [tensor], headers={"Authorization": f"Bearer {rest.acme}"})
        np.testing.assert_allclose(result.as_numpy("y"), rest.reference(x), rtol=1e-5, atol=1e-6)
        with pytest.raises(InferenceServerException) as refused:
            client.infer("other", [tensor], headers={"x-api-key": rest.acme})
        assert refused.value.status() == "403"
    finally:
        client.close()


# -- traces ----------------------------------------------------------------------------------------


def test_a_traceparent_header_parents_the_gateway_span(rest: Rest) -> None:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    status, _ = _curl(
        f"http://{rest.replica}/v2/models/mlp/infer",
        body=_infer_body(_x(1)),
        headers={"traceparent": f"00-{trace_id}-{span_id}-01"},
    )
    assert status == 200
    log = rest.work / "cp-1.log"
    span = wait_until(
        lambda: logged_span(log, trace_id, "gateway ModelInfer"), 15, what="the gateway's span"
    )
    assert span["parent_id"] == f"0x{span_id}"
    node = wait_until(
        lambda: logged_span(rest.work / "n1.log", trace_id, "node ModelInfer"), 15, what="node span"
    )
    assert node["context"]["trace_id"] == f"0x{trace_id}"


# -- TLS -------------------------------------------------------------------------------------------


def test_rest_is_https_with_mtls_where_the_grpc_listener_is(tmp_path: Path) -> None:
    """A replica whose gRPC listener requires client certificates serves REST over HTTPS with
    its certificate and requires them too: no plain-HTTP way around mTLS."""
    from meshserve.devtools.certs import init_certs

    certs = tmp_path / "certs"
    init_certs(certs, nodes=["n1"])
    client = TLSFiles(certs / "controlplane-ca.crt", certs / "client.crt", certs / "client.key")
    http = f"127.0.0.1:{free_port()}"
    with LocalMesh(tmp_path, tls=client) as local:
        local.start_etcd()
        local.start_controlplane(
            "cp-1",
            extra=[
                "--tls-ca",
                str(certs / "controlplane-trust.crt"),
                "--tls-cert",
                str(certs / "controlplane.crt"),
                "--tls-key",
                str(certs / "controlplane.key"),
                "--http-listen",
                http,
            ],
        )
        trust = ["--cacert", str(certs / "controlplane-ca.crt")]
        mine = ["--cert", str(certs / "client.crt"), "--key", str(certs / "client.key")]
        url = f"https://{http}/v2/health/live"
        assert _curl(url, tls=trust + mine) == (200, {"live": True})
        with pytest.raises(subprocess.CalledProcessError):  # no client certificate: no handshake
            _curl(url, tls=trust)
        with pytest.raises(subprocess.CalledProcessError):  # plain HTTP: not served
            _curl(f"http://{http}/v2/health/live")
