"""Object-store artifact URIs (issue 17 item 5) through the model store, against a real
S3-compatible server: moto's server mode on loopback (``ThreadedMotoServer`` on a free port),
reached by s3fs with the endpoint a node gets from ``--s3-endpoint-url``.

Covers: a fetch that hashes right, a wrong sha256 (permanent), an interrupted download that
resumes from its ``.part`` (cancelled after the first MiB, then fetched again), the size limit
before any byte moves, a missing object (transient), the bucket allow-list, a backend that is
not installed (permanent, naming the extra), and the schemes the control plane accepts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshserve.controlplane import validation
from meshserve.devtools.local import free_port
from meshserve.node.store import ModelStore, SourcePolicy, StoreError
from meshserve.node.transfer import CHUNK, SCHEMES

BUCKET = "models"
BLOB = os.urandom(3 * CHUNK + 123)  # several progress chunks, not a round number
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """The endpoint of a moto S3 server on loopback holding ``s3://models/blob.bin``."""
    import boto3
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        for key, value in CREDENTIALS.items():
            env.setenv(key, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="blob.bin", Body=BLOB)
            yield endpoint
        finally:
            server.stop()


def store(tmp: Path, endpoint: str, **kw: object) -> ModelStore:
    buckets = kw.pop("buckets", None)
    sources = SourcePolicy(s3_endpoint_url=endpoint, buckets=buckets)  # type: ignore[arg-type]
    return ModelStore(tmp / "cache", retries=1, sources=sources, **kw)  # type: ignore[arg-type]


async def test_s3_fetch_verifies_the_sha256_and_caches(s3: str, tmp_path: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    path = await store(tmp_path, s3).fetch(
        f"s3://{BUCKET}/blob.bin", BLOB_SHA, progress=lambda d, t: seen.append((d, t))
    )
    assert path.read_bytes() == BLOB and path.name == f"{BLOB_SHA}.onnx"
    assert seen[-1] == (len(BLOB), len(BLOB)) and len(seen) == 4  # per MiB, with the total


async def test_s3_wrong_sha256_is_permanent_and_leaves_nothing(s3: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="sha256 mismatch") as info:
        await store(tmp_path, s3).fetch(f"s3://{BUCKET}/blob.bin", "ab" * 32)
    assert info.value.permanent
    assert not list((tmp_path / "cache").iterdir())


async def test_an_interrupted_s3_download_resumes_from_its_part(s3: str, tmp_path: Path) -> None:
    uri = f"s3://{BUCKET}/blob.bin"
    models = store(tmp_path, s3)
    part = tmp_path / "cache" / f"{BLOB_SHA}.part"
    part.parent.mkdir(parents=True)
    cancel = threading.Event()  # what a cancelled fetch sets: stopped after the first MiB
    with pytest.raises(StoreError, match="was cancelled"):
        models._transfer.download(uri, BLOB_SHA, part, lambda d, t: cancel.set(), cancel)
    assert part.stat().st_size == CHUNK  # kept for the next fetch
    seen: list[int] = []
    path = await models.fetch(uri, BLOB_SHA, progress=lambda d, t: seen.append(d))
    assert path.read_bytes() == BLOB
    assert seen[0] == 2 * CHUNK  # resumed after the first MiB, not started over
    assert not part.exists()


async def test_a_part_that_is_no_prefix_of_the_object_fails_and_is_dropped(
    s3: str, tmp_path: Path
) -> None:
    part = tmp_path / "cache" / f"{BLOB_SHA}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 10)  # an older object's bytes
    models = store(tmp_path, s3)
    with pytest.raises(StoreError, match="sha256 mismatch"):
        await models.fetch(f"s3://{BUCKET}/blob.bin", BLOB_SHA)
    assert not part.exists()  # the next fetch starts over
    assert (await models.fetch(f"s3://{BUCKET}/blob.bin", BLOB_SHA)).read_bytes() == BLOB


async def test_a_whole_part_of_another_object_is_dropped_and_fetched_again(
    s3: str, tmp_path: Path
) -> None:
    part = tmp_path / "cache" / f"{BLOB_SHA}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(bytes(len(BLOB)))  # the right size, the wrong bytes
    path = await store(tmp_path, s3).fetch(f"s3://{BUCKET}/blob.bin", BLOB_SHA)
    assert path.read_bytes() == BLOB


async def test_s3_object_over_the_size_limit_is_refused_before_any_byte(
    s3: str, tmp_path: Path
) -> None:
    seen: list[int] = []
    with pytest.raises(StoreError, match="over the limit of 1048576") as info:
        await store(tmp_path, s3, max_artifact_bytes=CHUNK).fetch(
            f"s3://{BUCKET}/blob.bin", BLOB_SHA, progress=lambda d, t: seen.append(d)
        )
    assert info.value.permanent and not seen


async def test_a_missing_s3_object_is_transient(s3: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such object") as info:
        await store(tmp_path, s3).fetch(f"s3://{BUCKET}/not-yet.onnx", BLOB_SHA)
    assert not info.value.permanent  # it may be uploaded yet


async def test_aws_endpoint_url_from_the_environment_is_honoured(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)  # botocore's own setting, no node flag
    models = ModelStore(tmp_path / "cache", retries=0)
    assert (await models.fetch(f"s3://{BUCKET}/blob.bin", BLOB_SHA)).read_bytes() == BLOB


async def test_an_unreachable_endpoint_is_transient(s3: str, tmp_path: Path) -> None:
    sources = SourcePolicy(s3_endpoint_url=f"http://127.0.0.1:{free_port()}")  # nobody there
    models = ModelStore(tmp_path / "cache", retries=0, sources=sources)
    with pytest.raises(StoreError, match="EndpointConnectionError") as info:
        await models.fetch(f"s3://{BUCKET}/blob.bin", BLOB_SHA)
    assert not info.value.permanent  # retried later by the control plane


async def test_a_bucket_outside_the_allow_list_is_refused(s3: str, tmp_path: Path) -> None:
    models = store(tmp_path, s3, buckets=frozenset({"other"}))
    with pytest.raises(StoreError, match="--artifact-bucket") as info:
        await models.fetch(f"s3://{BUCKET}/blob.bin", BLOB_SHA)
    assert info.value.permanent
    allowed = store(tmp_path, s3, buckets=frozenset({BUCKET}))
    assert (await allowed.fetch(f"s3://{BUCKET}/blob.bin", BLOB_SHA)).exists()


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("s3://models/a/b.onnx", True),
        ("gs://Models/b.onnx", True),
        ("az://models@acct.blob.core.windows.net/b.onnx", True),
        ("az://other@models.blob.core.windows.net/b.onnx", False),
        ("s3://models-2/b.onnx", False),
    ],
)
def test_the_bucket_allow_list_reads_the_bucket_or_container(uri: str, allowed: bool) -> None:
    policy = SourcePolicy(buckets=frozenset({"models"}))
    if allowed:
        policy.check_bucket(uri)
    else:
        with pytest.raises(StoreError, match="not among this node's artifact buckets"):
            policy.check_bucket(uri)


@pytest.mark.parametrize(("uri", "extra"), [("gs://b/m.onnx", "gcs"), ("az://c/m.onnx", "azure")])
async def test_a_backend_that_is_not_installed_names_its_extra(
    tmp_path: Path, uri: str, extra: str
) -> None:
    backend = {"gcs": "gcsfs", "azure": "adlfs"}[extra]
    if importlib.util.find_spec(backend) is not None:
        pytest.skip(f"{backend} is installed here")
    with pytest.raises(StoreError, match=rf"pip install 'meshserve\[{extra}\]'") as info:
        await ModelStore(tmp_path / "cache").fetch(uri, BLOB_SHA)
    assert info.value.permanent


@pytest.mark.parametrize("uri", ["memory://b/m.onnx", "simplecache::s3://b/m.onnx"])
async def test_other_fsspec_protocols_are_refused(tmp_path: Path, uri: str) -> None:
    with pytest.raises(StoreError, match="unsupported artifact URI scheme") as info:
        await ModelStore(tmp_path / "cache").fetch(uri, BLOB_SHA)
    assert info.value.permanent


def test_the_control_plane_accepts_exactly_the_schemes_a_node_fetches() -> None:
    assert validation._ARTIFACT_SCHEMES == frozenset(SCHEMES)
