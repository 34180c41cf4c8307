"""meshserve client SDK.

>>> from client import MeshClient
>>> with MeshClient("127.0.0.1:8001") as mesh:
...     result = mesh.infer("digits", {"x": batch})
...     result["y"], result.node
"""

from client._sdk import AsyncMeshClient, InferResult, MeshClient, MeshError

__all__ = ["AsyncMeshClient", "InferResult", "MeshClient", "MeshError"]
