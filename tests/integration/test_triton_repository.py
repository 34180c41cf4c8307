"""Triton's model configuration and repository calls, asked by an unmodified tritonclient.

``get_model_config`` and ``get_model_repository_index`` (tritonclient.grpc) against the gateways
of a real mesh (real etcd, a control-plane process with API keys and its embedded gateway, a
standalone ``meshserve-gateway`` following its feed, a node process with a direct port) and
against the node's own port: the configuration is what onnxruntime reads from the ONNX
file the mesh serves (inputs, outputs, datatypes, dims, the batch axis as ``max_batch_size``);
the index lists every model version with its state, a tenant seeing only its own models.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.grpc import service_pb2_grpc as triton_pb2_grpc
from tritonclient.utils import InferenceServerException

from meshserve.client._admin import AdminClient
from meshserve.devtools.demo_models import make_fixed_model, make_int_model, make_mlp
from meshserve.devtools.local import LocalMesh, ManagedProcess, wait_until
from meshserve.protos import mesh_pb2
from tests.support.mesh import register_file, wait_copies

pytestmark = pytest.mark.integration
GATEWAYS = pytest.mark.parametrize("which", ["replica", "standalone"])
WHERE = pytest.mark.parametrize("where", ["replica", "standalone", "node"])

ACME_KEY = "acme-key-0123456789abcdef"
GLOBEX_KEY = "globex-key-0123456789abcdef"
ACME = {"x-api-key": ACME_KEY}
GLOBEX = {"x-api-key": GLOBEX_KEY}
GATEWAY_KEY = "gateway-key-0123456789abcdef"  # the standalone gateway's own (feed, nodes)


@dataclass
class Mesh:
    local: LocalMesh
    cp: ManagedProcess
    node_address: str
    models: Path
    standalone: str  # a standalone gateway's address

    def gateway(self, which: str) -> str:
        return self.cp.address if which == "replica" else self.standalone


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    work = tmp_path_factory.mktemp("triton-repository")
    (work / "keys.yaml").write_text(
        "tenants:\n"
        f"  - {{name: acme, keys: [{ACME_KEY}], models: [mlp, ints, fixed, rolled]}}\n"
        f"  - {{name: globex, keys: [{GLOBEX_KEY}], models: [other]}}\n"
        f"  - {{name: gateways, keys: [{GATEWAY_KEY}], models: ['*']}}\n"
    )
    (work / "gateway.key").write_text(GATEWAY_KEY + "\n")
    models = work / "models"
    with LocalMesh(work / "mesh") as local:
        local.start_etcd()
        cp = local.start_controlplane("cp-1", extra=["--api-keys-file", str(work / "keys.yaml")])
        local.start_node("n1", [cp.address], direct=True)
        with AdminClient(cp.address) as admin:
            mlp = make_mlp(models / "mlp.onnx")
            register_file(admin, "mlp", mlp)
            register_file(admin, "other", mlp)
            register_file(admin, "fixed", make_fixed_model(models / "fixed.onnx"))
            admin.register_spec(  # a batcher row cap of its own: ModelConfig's max_batch_size
                mesh_pb2.ModelSpec(
                    name="ints",
                    artifact_uri=make_int_model(models / "int.onnx").as_uri(),
                    sha256=_sha256(models / "int.onnx"),
                    serving=mesh_pb2.ServingConfig(
                        batching=mesh_pb2.BatchingConfig(enabled=True, max_batch_size=8)
                    ),
                )
            )
            register_file(admin, "rolled", mlp, version="v1")
            # v2 can be placed nowhere: it stays UNAVAILABLE
            register_file(admin, "rolled", mlp, version="v2", selector={"tier": "nowhere"})
            for name in ("mlp", "other", "fixed", "ints", "rolled"):
                wait_copies(admin, name, 1)
            node_address = wait_until(
                lambda: next((n.direct_address for n in admin.list_nodes()), ""),
                30,
                what="n1's direct address",
            )
            keys = ["--api-keys-file", str(work / "keys.yaml")]
            _, standalone = local.start_gateway(
                [cp.address], extra=[*keys, "--api-key-file", str(work / "gateway.key")]
            )
            wait_until(  # the feed's first view, with the copies' states
                lambda: len(_index(standalone, ACME)) == 5, 30, what="the standalone gateway's view"
            )
        yield Mesh(local, cp, node_address, models, standalone)


def _sha256(path: Path) -> str:
    from meshserve.devtools.demo_models import sha256_file

    return sha256_file(path)


@pytest.fixture(scope="module")
def node_enforcing(mesh: Mesh) -> str:
    """The node's direct address, once the node enforces the tenants' rights (they arrive down
    its stream after the Welcome: until then a node without TLS is open)."""

    def refused() -> bool:
        with tc.InferenceServerClient(url=mesh.node_address) as client:
            try:
                client.get_model_config("mlp")
            except InferenceServerException as exc:
                return bool(exc.status() == "StatusCode.UNAUTHENTICATED")
        return False

    wait_until(refused, 30, what="n1 to enforce API keys")
    return mesh.node_address


def _onnx_tensors(path: Path) -> tuple[list[Any], list[Any]]:
    """What onnxruntime reads from the file: (name, OIP datatype, shape with -1) per tensor."""
    import onnxruntime as ort

    from meshserve.common.datatypes import BY_ORT_TYPE

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def described(args: Any) -> list[Any]:
        return [
            (a.name, BY_ORT_TYPE[a.type], [d if isinstance(d, int) else -1 for d in a.shape])
            for a in args
        ]

    return described(session.get_inputs()), described(session.get_outputs())


def _expected(name: str, path: Path, max_batch: int) -> dict[str, Any]:
    """Triton's configuration (as tritonclient's JSON) of the ONNX file at ``path``: with a
    batch axis, ``max_batch_size`` and dims without it."""
    inputs, outputs = _onnx_tensors(path)
    skip = 1 if max_batch else 0
    kind = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64"}

    def tensors(described: list[Any]) -> list[dict[str, Any]]:
        return [
            {"name": n, "data_type": kind[t], "dims": [str(d) for d in shape[skip:]]}
            for n, t, shape in described
        ]

    out: dict[str, Any] = {
        "name": name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "input": tensors(inputs),
        "output": tensors(outputs),
    }
    if max_batch:
        out["max_batch_size"] = max_batch
    return out


def _config(url: str, model: str, version: str = "", headers: Any = ACME) -> dict[str, Any]:
    with tc.InferenceServerClient(url=url) as client:
        answer = client.get_model_config(model, version, headers=headers, as_json=True)
    config: dict[str, Any] = answer["config"]
    return config


def _index(url: str, headers: Any) -> list[dict[str, str]]:
    with tc.InferenceServerClient(url=url) as client:
        answer = client.get_model_repository_index(headers=headers, as_json=True)
    models: list[dict[str, str]] = answer.get("models", [])
    return models


def _status(call: Any) -> str:
    with pytest.raises(InferenceServerException) as refused:
        call()
    return str(refused.value.status())


# -- ModelConfig -----------------------------------------------------------------------------------


@WHERE
def test_model_config_is_derived_from_the_onnx_file(
    mesh: Mesh, node_enforcing: str, where: str
) -> None:
    url = node_enforcing if where == "node" else mesh.gateway(where)
    mlp = mesh.models / "mlp.onnx"
    assert _config(url, "mlp") == _expected("mlp", mlp, 32)  # the batcher's default row cap
    assert _config(url, "mlp")["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": ["64"]}]
    ints = _config(url, "ints")
    assert ints == _expected("ints", mesh.models / "int.onnx", 8)  # its own row cap
    assert {o["data_type"] for o in ints["output"]} == {"TYPE_INT64", "TYPE_FP32"}
    # No dynamic first dimension: max_batch_size 0 (left out of the JSON) and full dims.
    fixed = _config(url, "fixed")
    assert fixed == _expected("fixed", mesh.models / "fixed.onnx", 0)
    assert "max_batch_size" not in fixed
    assert fixed["input"][0]["dims"] == ["1", "3"]


@GATEWAYS
def test_model_config_of_a_version_through_the_gateway(mesh: Mesh, which: str) -> None:
    url = mesh.gateway(which)
    assert _config(url, "rolled", "v1") == _expected("rolled", mesh.models / "mlp.onnx", 32)
    # No version: the `live` alias's (set to the first version registered), as ModelInfer's.
    assert _config(url, "rolled", "live") == _config(url, "rolled", "v1")
    assert _config(url, "rolled") == _config(url, "rolled", "v1")
    assert _status(lambda: _config(url, "rolled", "v9")) == "StatusCode.NOT_FOUND"


@WHERE
def test_model_config_obeys_tenants(mesh: Mesh, node_enforcing: str, where: str) -> None:
    url = node_enforcing if where == "node" else mesh.gateway(where)
    assert _status(lambda: _config(url, "other")) == "StatusCode.PERMISSION_DENIED"
    assert _status(lambda: _config(url, "mlp", headers=GLOBEX)) == "StatusCode.PERMISSION_DENIED"
    assert _status(lambda: _config(url, "mlp", headers={})) == "StatusCode.UNAUTHENTICATED"
    # Decided before the model is looked up: an unknown model is no different.
    assert _status(lambda: _config(url, "nope")) == "StatusCode.PERMISSION_DENIED"


# -- RepositoryIndex -------------------------------------------------------------------------------


@GATEWAYS
def test_repository_index_through_the_gateway_lists_the_tenants_versions(
    mesh: Mesh, which: str
) -> None:
    url = mesh.gateway(which)
    models = _index(url, ACME)
    assert [(m["name"], m.get("version")) for m in models] == [
        ("fixed", "default"),
        ("ints", "default"),
        ("mlp", "default"),
        ("rolled", "v1"),
        ("rolled", "v2"),
    ]
    states = {(m["name"], m["version"]): m["state"] for m in models}
    assert set(states.values()) == {"READY", "UNAVAILABLE"}
    assert states.pop(("rolled", "v2")) == "UNAVAILABLE"
    assert set(states.values()) == {"READY"}
    v2 = next(m for m in models if m["version"] == "v2")
    assert "'rolled'" in v2["reason"] and "no ready copy" in v2["reason"], v2
    assert all("reason" not in m for m in models if m["state"] == "READY")
    # globex sees only its own model; no key: refused.
    assert [m["name"] for m in _index(url, GLOBEX)] == ["other"]
    assert _status(lambda: _index(url, {})) == "StatusCode.UNAUTHENTICATED"


def test_repository_index_on_the_nodes_port_lists_its_copies(
    mesh: Mesh, node_enforcing: str
) -> None:
    models = _index(node_enforcing, ACME)
    # A node's versions are its copies' variants (as its ModelMetadata says); v2 has no copy.
    assert [(m["name"], m["version"], m["state"]) for m in models] == [
        ("fixed", "default", "READY"),
        ("ints", "default", "READY"),
        ("mlp", "default", "READY"),
        ("rolled", "v1", "READY"),
    ]
    assert [m["name"] for m in _index(node_enforcing, GLOBEX)] == ["other"]
    assert _status(lambda: _index(node_enforcing, {})) == "StatusCode.UNAUTHENTICATED"


@WHERE
def test_repository_index_request_fields(mesh: Mesh, node_enforcing: str, where: str) -> None:
    """``ready``: only READY versions; ``repository_name``: one repository, so it must be empty
    (tritonclient's own stub and messages: its helper sends neither field)."""
    url = node_enforcing if where == "node" else mesh.gateway(where)
    metadata = tuple(ACME.items())
    with grpc.insecure_channel(url) as channel:
        stub = triton_pb2_grpc.GRPCInferenceServiceStub(channel)
        ready = stub.RepositoryIndex(
            triton_pb2.RepositoryIndexRequest(ready=True), metadata=metadata, timeout=10
        )
        assert {(m.name, m.version) for m in ready.models} == {
            ("fixed", "default"),
            ("ints", "default"),
            ("mlp", "default"),
            ("rolled", "v1"),
        }
        assert {m.state for m in ready.models} == {"READY"}
        with pytest.raises(grpc.RpcError) as named:
            stub.RepositoryIndex(
                triton_pb2.RepositoryIndexRequest(repository_name="models"),
                metadata=metadata,
                timeout=10,
            )
    assert named.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "repository_name" in str(named.value.details())


def test_model_statistics_is_not_implemented(mesh: Mesh) -> None:
    """ModelStatistics stays UNIMPLEMENTED (docs/frontdoor.md says why): the mesh keeps no
    per-version cumulative counts and durations in Triton's form to fill it honestly."""
    with tc.InferenceServerClient(url=mesh.cp.address) as client:
        status = _status(lambda: client.get_inference_statistics("mlp", headers=ACME))
    assert status == "StatusCode.UNIMPLEMENTED"
