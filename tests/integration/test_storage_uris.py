"""Storage URIs (issue 17 item 5): a real node process fetches its ONNX model from ``s3://``,
served by a local S3-compatible server (moto's server mode on loopback, ``ThreadedMotoServer``
on a free port), reached with the node flag ``--s3-endpoint-url`` and the standard ``AWS_*``
credential variables; the model is registered through :class:`AdminClient` with its sha256 and
answers a query from :class:`MeshClient`. A wrong sha256 fails the copy permanently, a bucket
outside ``--artifact-bucket`` is refused permanently.

Real etcd, a real control plane and node (processes), real onnxruntime, traffic on loopback.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from meshserve.client import MeshClient
from meshserve.client._admin import AdminClient
from meshserve.devtools.demo_models import make_mlp, sha256_file
from meshserve.devtools.local import LocalMesh, free_port, wait_until
from meshserve.protos import mesh_pb2
from tests.support.mesh import wait_copies

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

BUCKET = "models"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class Mesh:
    def __init__(self, address: str, workdir: Path) -> None:
        self.address = address
        self.workdir = workdir


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[str, object]]:
    """(endpoint, boto3 client) of a moto S3 server on loopback with bucket ``models``."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )
        client.create_bucket(Bucket=BUCKET)
        client.create_bucket(Bucket="elsewhere")
        yield endpoint, client
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mesh(s3: tuple[str, object], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """etcd, a control plane, and node ``n1`` reading s3 artifacts from the moto server, only
    from bucket ``models``."""
    endpoint, _ = s3
    workdir = tmp_path_factory.mktemp("storage")
    with LocalMesh(workdir) as local:
        local.start_etcd()
        cp = local.start_controlplane("cp-1")
        local.start_node(
            "n1",
            [cp.address],
            extra=["--s3-endpoint-url", endpoint, "--artifact-bucket", BUCKET],
            env=CREDENTIALS,
        )
        yield Mesh(cp.address, workdir)


def upload(s3: tuple[str, object], bucket: str, key: str, path: Path) -> str:
    _, client = s3
    client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())  # type: ignore[attr-defined]
    return f"s3://{bucket}/{key}"


def failure(admin: AdminClient, model: str) -> mesh_pb2.CopyFailure | None:
    for placement in admin.list_placements(model):
        if "n1" in placement.failures:
            return placement.failures["n1"]
    return None


def test_a_node_serves_a_model_fetched_from_s3(mesh: Mesh, s3: tuple[str, object]) -> None:
    onnx = make_mlp(mesh.workdir / "mlp.onnx", seed=11)
    uri = upload(s3, BUCKET, "mlp/v1/model.onnx", onnx)
    with AdminClient(mesh.address) as admin:
        admin.register_model("from-s3", uri, sha256_file(onnx))
        wait_copies(admin, "from-s3", 1, timeout=60)
    x = np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)
    with MeshClient(mesh.address) as client:
        out = client.infer("from-s3", {"x": x})
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": x})
    np.testing.assert_allclose(next(iter(out.values())), expected, rtol=1e-5)  # the bytes from s3


@pytest.mark.parametrize(
    ("bucket", "wrong_sha", "reason"),
    [
        (BUCKET, True, "sha256 mismatch"),
        ("elsewhere", False, "--artifact-bucket"),
    ],
)
def test_a_refused_s3_artifact_fails_the_copy_permanently(
    mesh: Mesh, s3: tuple[str, object], bucket: str, wrong_sha: bool, reason: str
) -> None:
    onnx = make_mlp(mesh.workdir / f"{bucket}.onnx", seed=12)
    uri = upload(s3, bucket, "bad.onnx", onnx)
    model = f"bad-{bucket}"
    with AdminClient(mesh.address) as admin:
        admin.register_model(model, uri, "ab" * 32 if wrong_sha else sha256_file(onnx))
        record = wait_until(lambda: failure(admin, model), 60, what=f"the copy of {model} to fail")
        assert record.permanent and reason in record.reason, record
        states = {c.state for n in admin.list_nodes() for c in n.copies if c.model == model}
        assert mesh_pb2.READY not in states
