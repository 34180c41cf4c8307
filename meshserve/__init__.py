"""meshserve: a gRPC model mesh with a control plane.

The public surface of the Python SDK::

    from meshserve import MeshClient
    from meshserve.errors import NotFound

    with MeshClient("127.0.0.1:8001") as mesh:
        result = mesh.infer("digits", {"X": batch})  # dict of numpy arrays
        result["label"], result.node, result.variant

Everything else (``meshserve.controlplane``, ``meshserve.node``, ``meshserve.common`` ...) is the
implementation of the deployables; its modules may change between releases.
"""

from meshserve.client import (
    NO_RETRY,
    AsyncMeshClient,
    InferResult,
    MeshClient,
    MeshError,
    RetryPolicy,
    TLSFiles,
)

__all__ = [
    "NO_RETRY",
    "AsyncMeshClient",
    "InferResult",
    "MeshClient",
    "MeshError",
    "RetryPolicy",
    "TLSFiles",
]
