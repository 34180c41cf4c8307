"""Security on the node's own port: a query that reaches a node directly (an SDK routing itself)
meets the gateway's rules — TLS with a client certificate, a tenant's API key, and only the
models that tenant may query (issue 15 item 4). The control plane pushes the tenants' key digests
to the node right after the Welcome; the node enforces them on ModelInfer, ModelMetadata,
ModelReady, ModelStreamInfer and the multiplexed stream. Health RPCs stay open; the gateway
(the control plane's certificate) is let through, as it checked the tenant already.

Real etcd, a control-plane process and a node process, certificates from ``meshctl certs
init``'s code (as in test_security.py).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc import aio

from meshserve.client import MeshClient, TLSFiles
from meshserve.client._admin import AdminClient
from meshserve.common.codec import build_request, decode_response_outputs
from meshserve.common.errors import PermissionDenied, Unauthenticated, Unavailable
from meshserve.common.mux import MuxChannel
from meshserve.common.security import channel_credentials
from meshserve.devtools.demo_models import make_mlp, reference_outputs, sha256_file
from meshserve.devtools.local import LocalMesh, ManagedProcess, free_port, wait_until
from meshserve.protos import inference_pb2, inference_pb2_grpc, mesh_pb2
from tests.support.pki import issue_from

pytestmark = pytest.mark.integration

X = np.random.default_rng(11).standard_normal((2, 64)).astype(np.float32)


@dataclass
class Secured:
    mesh: LocalMesh
    cp: ManagedProcess
    certs: Path
    acme_key: str
    globex_key: str
    model: Path
    node_address: str

    def tls(self, stem: str) -> TLSFiles:
        """``stem``'s certificate, dialling a node's direct port (the node CA)."""
        return TLSFiles(
            self.certs / "node-ca.crt", self.certs / f"{stem}.crt", self.certs / f"{stem}.key"
        )

    def client_tls(self) -> TLSFiles:
        """The SDK's files: the control-plane CA for the gateway, the node CA for nodes."""
        return TLSFiles(
            self.certs / "controlplane-ca.crt",
            self.certs / "client.crt",
            self.certs / "client.key",
            node_ca=self.certs / "node-ca.crt",
        )


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    from meshserve.devtools.certs import init_certs

    work = tmp_path_factory.mktemp("direct-secured")
    certs = work / "certs"
    init_certs(certs, nodes=["n1"])
    client_tls = TLSFiles(
        certs / "controlplane-ca.crt",
        certs / "client.crt",
        certs / "client.key",
        node_ca=certs / "node-ca.crt",
    )
    join_token, admin_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    acme_key, globex_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    model = make_mlp(work / "mlp.onnx")
    (work / "join").write_text(join_token + "\n")
    (work / "admin").write_text(admin_token + "\n")
    (work / "keys.yaml").write_text(
        "tenants:\n"
        f"  - {{name: acme, keys: [{acme_key}], models: [mlp]}}\n"
        f"  - {{name: globex, keys: [{globex_key}], models: [other]}}\n"
    )
    with LocalMesh(work, env=dict(os.environ), tls=client_tls) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane(
            "cp-1",
            extra=[
                f"--tls-ca={certs / 'controlplane-trust.crt'}",
                f"--tls-node-ca={certs / 'node-ca.crt'}",
                f"--tls-cert={certs / 'controlplane.crt'}",
                f"--tls-key={certs / 'controlplane.key'}",
                f"--join-token-file={work / 'join'}",
                f"--admin-token-file={work / 'admin'}",
                f"--api-keys-file={work / 'keys.yaml'}",
            ],
        )
        mesh.start_node(
            "n1",
            [cp.address],
            direct=True,
            extra=[
                f"--tls-ca={certs / 'controlplane-ca.crt'}",
                f"--tls-client-ca={certs / 'client-ca.crt'}",
                f"--tls-cert={certs / 'node-n1.crt'}",
                f"--tls-key={certs / 'node-n1.key'}",
                f"--join-token-file={work / 'join'}",
            ],
        )
        with AdminClient(cp.address, tls=client_tls, token=admin_token) as admin:
            nodes = wait_until(admin.list_nodes, 30, what="n1 to join")
            admin.register_model("mlp", model.as_uri(), sha256_file(model))
            wait_until(
                lambda: any(
                    c.state == mesh_pb2.READY for n in admin.list_nodes() for c in n.copies
                ),
                60,
                what="a READY copy of mlp",
            )
        yield Secured(mesh, cp, certs, acme_key, globex_key, model, nodes[0].direct_address)


def _channel(s: Secured, stem: str = "client") -> aio.Channel:
    creds = channel_credentials(s.tls(stem))
    assert creds is not None
    return aio.secure_channel(s.node_address, creds)


def _request(model: str = "mlp") -> inference_pb2.ModelInferRequest:
    return build_request(model, {"x": X})


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_tenant_queries_its_models_on_the_node_directly_and_no_other(
    secured: Secured,
) -> None:
    acme = [("x-api-key", secured.acme_key)]
    bearer = [("authorization", f"Bearer {secured.acme_key}")]
    globex = [("x-api-key", secured.globex_key)]
    async with _channel(secured) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        for metadata in (acme, bearer):
            answer = await stub.ModelInfer(_request(), metadata=metadata, timeout=10)
            assert answer.parameters["meshserve_node"].string_param == "n1"
            np.testing.assert_allclose(
                decode_response_outputs(answer)["y"],
                reference_outputs(secured.model, {"x": X})["y"],
                rtol=1e-5,
                atol=1e-5,
            )
        ready = await stub.ModelReady(
            inference_pb2.ModelReadyRequest(name="mlp"), metadata=acme, timeout=10
        )
        assert ready.ready
        meta = await stub.ModelMetadata(
            inference_pb2.ModelMetadataRequest(name="mlp"), metadata=acme, timeout=10
        )
        assert meta.name == "mlp"
        # another tenant's model (and a model that does not exist: no existence leak)
        for model in ("other", "no-such-model"):
            with pytest.raises(aio.AioRpcError) as err:
                await stub.ModelInfer(_request(model), metadata=acme, timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert err.value.details() == f"tenant 'acme' may not query model '{model}'"
        for call in (
            stub.ModelInfer(_request(), metadata=globex, timeout=10),
            stub.ModelReady(inference_pb2.ModelReadyRequest(name="mlp"), metadata=globex),
            stub.ModelMetadata(inference_pb2.ModelMetadataRequest(name="mlp"), metadata=globex),
        ):
            assert await _code(call) == grpc.StatusCode.PERMISSION_DENIED
        # health stays open for probes
        live = await stub.ServerLive(inference_pb2.ServerLiveRequest(), timeout=10)
        assert live.live
        # ModelStreamInfer: the stream is authenticated once, each request's model checked
        stream = stub.ModelStreamInfer(metadata=acme, timeout=10)
        for model in ("mlp", "other"):
            await stream.write(_request(model))
        await stream.done_writing()
        errors = sorted([a.error_message async for a in stream])
        assert errors[0] == "" and errors[1].startswith("PERMISSION_DENIED")


async def test_a_tenant_queries_over_the_multiplexed_stream_with_its_key(
    secured: Secured,
) -> None:
    async with _channel(secured) as channel:
        mux = MuxChannel(channel, metadata=[("x-api-key", secured.acme_key)])
        try:
            answer = await mux.call_message(_request(), timeout=10)
            assert answer.parameters["meshserve_node"].string_param == "n1"
            with pytest.raises(PermissionDenied, match="tenant 'acme' may not query model"):
                await mux.call_message(_request("other"), timeout=10)
            answers = await asyncio.gather(
                *(mux.call_message(_request(), timeout=10) for _ in range(20))
            )
            assert {a.raw_output_contents[0] for a in answers} == {answer.raw_output_contents[0]}
            assert mux.reopened == 0  # the refused frame did not end the stream
        finally:
            await mux.close()


async def test_a_client_certificate_alone_or_a_wrong_key_is_unauthenticated(
    secured: Secured,
) -> None:
    wrong = [("x-api-key", secrets.token_urlsafe(24))]
    async with _channel(secured) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        for metadata in (None, wrong):
            for call in (
                stub.ModelInfer(_request(), metadata=metadata, timeout=10),
                stub.ModelReady(inference_pb2.ModelReadyRequest(name="mlp"), metadata=metadata),
            ):
                assert await _code(call) == grpc.StatusCode.UNAUTHENTICATED
            stream = stub.ModelStreamInfer(metadata=metadata, timeout=10)
            with pytest.raises(aio.AioRpcError):  # the write may already see the refusal
                await stream.write(_request())
                async for _ in stream:
                    pass
            # (a write that lost the race fails INTERNAL "from Core"; the call's status is the
            # node's refusal)
            assert await asyncio.wait_for(stream.code(), 10) == grpc.StatusCode.UNAUTHENTICATED
            mux = MuxChannel(channel, metadata=metadata or ())
            try:
                with pytest.raises(Unauthenticated):
                    await mux.call_message(_request(), timeout=10)
            finally:
                await mux.close()


async def test_a_client_certificate_is_never_a_router_whatever_its_name(
    secured: Secured,
) -> None:
    """Issue 16 finding 7: the client CA's certificates (``client.crt``, or one it issued named
    ``controlplane``) are tenants' callers: without a key UNAUTHENTICATED, with a key only the
    tenant's models. A node's own certificate (the node CA) is not admitted at all."""
    issue_from(secured.certs, "client", "controlplane", "forged-router")
    acme = [("x-api-key", secured.acme_key)]
    globex = [("x-api-key", secured.globex_key)]
    for stem in ("client", "forged-router"):
        async with _channel(secured, stem) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert await _code(stub.ModelInfer(_request(), timeout=10)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            answer = await stub.ModelInfer(_request(), metadata=acme, timeout=10)
            assert answer.parameters["meshserve_node"].string_param == "n1"
            for model, metadata in (("other", acme), ("mlp", globex)):
                call = stub.ModelInfer(_request(model), metadata=metadata, timeout=10)
                assert await _code(call) == grpc.StatusCode.PERMISSION_DENIED
            mux = MuxChannel(channel)
            try:
                with pytest.raises(Unauthenticated):
                    await mux.call_message(_request(), timeout=10)
            finally:
                await mux.close()
    async with _channel(secured, "node-n1") as channel:  # a node's key calling a node
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelInfer(_request(), metadata=acme, timeout=10)
        assert await _code(call) == grpc.StatusCode.UNAVAILABLE  # refused at the handshake


async def test_the_gateway_still_reaches_the_node_directly(secured: Secured) -> None:
    """The control plane's certificate is a router's: let through without a key (the gateway
    checked the tenant); a query through the gateway is answered by the node's direct port."""
    async with _channel(secured, "controlplane") as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        answer = await stub.ModelInfer(_request(), timeout=10)
        assert answer.parameters["meshserve_node"].string_param == "n1"

    def through_gateway() -> str:
        with MeshClient(
            secured.cp.address,
            tls=secured.client_tls(),
            api_key=secured.acme_key,
            routing="gateway",  # the SDK would go to the node's port itself
        ) as client:
            return client.infer("mlp", {"x": X}).node

    assert await asyncio.to_thread(through_gateway) == "n1"


def test_a_standalone_gateway_with_one_ca_per_role_reaches_the_node(secured: Secured) -> None:
    """The standalone gateway verifies the replicas by the control-plane CA and the nodes by
    the node CA; the node lets it through as a router (the control-plane CA issued its
    certificate), and it checks the tenant itself."""
    certs = secured.certs
    (certs.parent / "gateway-key").write_text(secured.acme_key + "\n")  # for the feed
    _, address = secured.mesh.start_gateway(
        [secured.cp.address],
        extra=[
            f"--tls-ca={certs / 'controlplane-ca.crt'}",
            f"--tls-node-ca={certs / 'node-ca.crt'}",
            f"--tls-client-ca={certs / 'client-ca.crt'}",
            f"--tls-cert={certs / 'controlplane.crt'}",
            f"--tls-key={certs / 'controlplane.key'}",
            f"--api-keys-file={certs.parent / 'keys.yaml'}",
            f"--api-key-file={certs.parent / 'gateway-key'}",
        ],
    )
    tls = secured.client_tls()
    with MeshClient(address, tls=tls, api_key=secured.acme_key, routing="gateway") as client:
        result = wait_until(lambda: client.infer("mlp", {"x": X}), 30, what="the gateway's feed")
        assert result.node == "n1"
    with MeshClient(address, tls=tls, api_key=secured.globex_key, routing="gateway") as client:
        with pytest.raises(PermissionDenied):
            client.infer("mlp", {"x": X})


async def test_a_tls_node_without_rights_yet_fails_closed(secured: Secured) -> None:
    """A node started with TLS that has not heard from a control plane (none answers at its
    address) cannot know the tenants' rights: it refuses, UNAVAILABLE, rather than serve open."""
    certs = secured.certs
    nowhere = f"127.0.0.1:{free_port()}"
    address = f"127.0.0.1:{free_port()}"
    lonely = secured.mesh.start_node(
        "lonely",
        [nowhere],
        extra=[
            "--listen",
            address,
            f"--tls-ca={certs / 'controlplane-ca.crt'}",
            f"--tls-client-ca={certs / 'client-ca.crt'}",
            f"--tls-cert={certs / 'node-n1.crt'}",
            f"--tls-key={certs / 'node-n1.key'}",
        ],
    )
    try:
        creds = channel_credentials(secured.tls("client"))
        assert creds is not None
        async with aio.secure_channel(address, creds) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            live = stub.ServerLive(inference_pb2.ServerLiveRequest(), wait_for_ready=True)
            assert (await asyncio.wait_for(live, 30)).live  # health is open
            acme = [("x-api-key", secured.acme_key)]
            with pytest.raises(aio.AioRpcError) as err:
                await stub.ModelInfer(_request(), metadata=acme, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "has not received its access rights" in (err.value.details() or "")
            mux = MuxChannel(channel, metadata=acme)
            try:
                with pytest.raises(Unavailable, match="has not received its access rights"):
                    await mux.call_message(_request(), timeout=10)
            finally:
                await mux.close()
    finally:
        lonely.stop(grace_s=2.0)


def test_api_keys_without_tls_the_gateway_uses_its_router_key(tmp_path: Path) -> None:
    """A mesh with API keys and no certificates (keys first, TLS later): nodes enforce the
    tenants on their direct ports, and the gateway, which has no certificate to show, reaches
    them with its replica's router key; a routed SDK sends its own key to the node."""
    acme = "acme-" + secrets.token_hex(12)
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"tenants:\n  - {{name: acme, keys: [{acme}], models: [mlp]}}\n")
    model = make_mlp(tmp_path / "mlp.onnx")
    with LocalMesh(tmp_path / "mesh") as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=["--api-keys-file", str(keys)])
        node = mesh.start_node("n1", [cp.address], direct=True)
        with AdminClient(cp.address) as admin:
            wait_until(admin.list_nodes, 30, what="n1 to join")
            admin.register_model("mlp", model.as_uri(), sha256_file(model))
            nodes = wait_until(
                lambda: [
                    n
                    for n in admin.list_nodes()
                    if any(c.state == mesh_pb2.READY for c in n.copies)
                ],
                60,
                what="a ready copy",
            )
        expected = reference_outputs(model, {"x": X})
        with MeshClient(cp.address, api_key=acme, routing="gateway") as client:
            result = client.infer("mlp", {"x": X})
            assert result.node == "n1"
            np.testing.assert_allclose(result["y"], expected["y"], rtol=1e-5)
        with MeshClient(cp.address, api_key=acme) as client:  # routed: straight to n1
            assert client.infer("mlp", {"x": X}).node == "n1"
        with grpc.insecure_channel(nodes[0].direct_address) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(_request(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as forged:
                stub.ModelInfer(
                    _request(), timeout=10, metadata=[("x-meshserve-router", "guess" * 8)]
                )
            assert forged.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert node.alive
