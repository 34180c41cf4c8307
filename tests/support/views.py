"""Hand-built snapshot pieces for pure unit tests of placement (no etcd, no network)."""

from __future__ import annotations

from types import MappingProxyType

from meshserve.controlplane.snapshot import NodeView
from meshserve.protos import mesh_pb2

__all__ = ["GiB", "alias", "node"]

GiB = 1 << 30


def node(
    node_id: str,
    *,
    memory: int = 8 * GiB,
    labels: dict[str, str] | None = None,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    copies: dict[tuple[str, str], int] | None = None,
    sha: str = "a" * 64,
) -> NodeView:
    return NodeView(
        node_id=node_id,
        labels=MappingProxyType(labels or {}),
        hardware=mesh_pb2.Hardware(memory_bytes=memory, execution_providers=providers),
        direct_address="",
        replicas=frozenset({"cp"}),
        copies=MappingProxyType(
            {
                k: mesh_pb2.CopyStatus(
                    model=k[0],
                    variant=k[1],
                    state=state,
                    sha256=sha,  # type: ignore[arg-type]
                    reason="sha256 mismatch" if state == mesh_pb2.FAILED else "",
                )
                for k, state in (copies or {}).items()
            }
        ),
    )


def alias(
    version: str, previous: str = "", canary: str = "", percent: float = 0.0, name: str = "live"
) -> mesh_pb2.Alias:
    """An alias record of model ``m`` (``live`` unless named)."""
    return mesh_pb2.Alias(
        model="m",
        alias=name,
        version=version,
        previous_version=previous,
        canary_version=canary,
        canary_percent=percent,
    )
