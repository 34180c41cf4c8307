"""meshserve client SDK.

>>> from client import MeshClient
>>> with MeshClient("127.0.0.1:8001") as mesh:
...     result = mesh.infer("digits", {"x": batch})
...     result["y"], result.node
"""

from meshserve.client._embedded import EmbeddedModel, EmbeddedOptions, EmbeddedStatus
from meshserve.client._retry import NO_RETRY, RetryPolicy
from meshserve.client._sdk import AsyncMeshClient, InferResult, MeshClient, MeshError
from meshserve.common.security import TLSFiles

__all__ = [
    "NO_RETRY",
    "AsyncMeshClient",
    "EmbeddedModel",
    "EmbeddedOptions",
    "EmbeddedStatus",
    "InferResult",
    "MeshClient",
    "MeshError",
    "RetryPolicy",
    "TLSFiles",
]
