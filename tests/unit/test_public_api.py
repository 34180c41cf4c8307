"""The public surface of the SDK: ``meshserve`` and ``meshserve.errors``, pinned.

A name added to or removed from either ``__all__`` is a change of the public API and must show up
here. The errors are the classes a caller catches; each is checked against the gRPC status it
stands for, both ways: its ``code``, and what the SDK raises when a real server answers that
status.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import meshserve
import meshserve.errors
from meshserve.protos import inference_pb2_grpc
from tests.support.fresh import run_fresh

PUBLIC = {
    "NO_RETRY",
    "AsyncMeshClient",
    "InferResult",
    "MeshClient",
    "MeshError",
    "RetryPolicy",
    "TLSFiles",
}
ERRORS: dict[str, grpc.StatusCode] = {
    "InvalidArgument": grpc.StatusCode.INVALID_ARGUMENT,
    "NotFound": grpc.StatusCode.NOT_FOUND,
    "ResourceExhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "Unavailable": grpc.StatusCode.UNAVAILABLE,
    "DeadlineExceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "FailedPrecondition": grpc.StatusCode.FAILED_PRECONDITION,
    "Unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "PermissionDenied": grpc.StatusCode.PERMISSION_DENIED,
}
# The packages of the deployables that an SDK user must never pay for, and the top-level names
# the distribution installed before everything moved under `meshserve.`.
SERVER_PACKAGES = ("meshserve.controlplane", "meshserve.node", "meshserve.devtools")
OLD_TOP_LEVEL = ("client", "common", "controlplane", "devtools", "node", "protos")


def test_meshserve_all_is_pinned() -> None:
    assert set(meshserve.__all__) == PUBLIC
    assert len(meshserve.__all__) == len(PUBLIC)  # no name listed twice
    for name in meshserve.__all__:
        assert getattr(meshserve, name) is not None, name


def test_errors_all_is_pinned() -> None:
    assert set(meshserve.errors.__all__) == {*ERRORS, "MeshError", "StatusError"}
    assert len(meshserve.errors.__all__) == len(ERRORS) + 2
    for name in meshserve.errors.__all__:
        assert isinstance(getattr(meshserve.errors, name), type), name


def test_clients_import_from_the_top() -> None:
    from meshserve import AsyncMeshClient, MeshClient
    from meshserve.client import AsyncMeshClient as AsyncFromClient
    from meshserve.client import MeshClient as FromClient

    assert MeshClient is FromClient
    assert AsyncMeshClient is AsyncFromClient
    assert meshserve.MeshError is meshserve.errors.MeshError


def test_mesh_error_is_the_status_error_servers_raise() -> None:
    """One hierarchy for both sides: what a server raises is what a caller catches."""
    from meshserve.common.errors import StatusError

    assert meshserve.errors.MeshError is StatusError
    assert meshserve.errors.StatusError is StatusError
    assert issubclass(meshserve.errors.MeshError, Exception)


@pytest.mark.parametrize(("name", "code"), ERRORS.items(), ids=list(ERRORS))
def test_each_error_is_a_mesh_error_with_its_status(name: str, code: grpc.StatusCode) -> None:
    cls = getattr(meshserve.errors, name)
    assert issubclass(cls, meshserve.errors.MeshError)
    assert cls.code == code
    error = cls("model 'm' is not registered")
    assert error.code == code
    assert error.message == "model 'm' is not registered"
    with pytest.raises(meshserve.errors.MeshError):
        raise error
    # Classes are distinct: catching one never catches another.
    for other, other_code in ERRORS.items():
        if other != name:
            assert not issubclass(cls, getattr(meshserve.errors, other)), (name, other)
            assert other_code != code


# -- what the SDK raises for each status a real server answers ------------------------------------


class _AbortWithStatus(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """ModelMetadata fails with the status named by the requested model."""

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode[request.name], f"{request.name} for {request.name!r}")


@pytest.fixture(scope="module")
def failing_server() -> Iterator[str]:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_AbortWithStatus(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        srv.stop(grace=None)


@pytest.mark.parametrize(("name", "code"), ERRORS.items(), ids=list(ERRORS))
def test_sdk_raises_the_public_class_for_each_status(
    failing_server: str, name: str, code: grpc.StatusCode
) -> None:
    cls = getattr(meshserve.errors, name)
    with meshserve.MeshClient(failing_server, timeout=10) as mesh:
        with pytest.raises(cls) as caught:
            mesh.model_metadata(code.name)
    assert type(caught.value) is cls
    assert caught.value.code == code
    assert caught.value.message == f"{code.name} for {code.name!r}"


async def test_async_sdk_raises_the_public_classes(failing_server: str) -> None:
    async with meshserve.AsyncMeshClient(failing_server, timeout=10) as mesh:
        for name, code in ERRORS.items():
            with pytest.raises(meshserve.errors.MeshError) as caught:
                await mesh.model_metadata(code.name)
            assert type(caught.value) is getattr(meshserve.errors, name)
            assert caught.value.code == code


def test_unlisted_status_is_still_a_mesh_error(failing_server: str) -> None:
    """A status without its own class (here ABORTED) is a plain MeshError with that code."""
    with meshserve.MeshClient(failing_server, timeout=10) as mesh:
        with pytest.raises(meshserve.errors.MeshError) as caught:
            mesh.model_metadata("ABORTED")
    assert type(caught.value) is meshserve.errors.MeshError
    assert caught.value.code == grpc.StatusCode.ABORTED


# -- importing the SDK imports no server ----------------------------------------------------------


def test_importing_meshserve_imports_no_server_package(tmp_path: Path) -> None:
    """In a fresh interpreter (run outside the repository, so its top folders are not on the
    path), ``import meshserve`` and ``meshserve.errors`` load the SDK only."""
    code = (
        "import json, sys; import meshserve, meshserve.errors; "
        "from meshserve import MeshClient, AsyncMeshClient; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    modules: list[str] = json.loads(run_fresh(code, cwd=tmp_path))
    assert "meshserve.client" in modules  # the walk saw the SDK itself
    servers = [m for m in modules for p in SERVER_PACKAGES if m == p or m.startswith(p + ".")]
    assert not servers, f"importing meshserve imported server code: {servers}"
    old = [m for m in modules if m.split(".")[0] in OLD_TOP_LEVEL]
    assert not old, f"modules outside the meshserve namespace: {old}"
