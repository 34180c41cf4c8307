"""An in-process mesh for integration tests: a real etcd server, a real ControlPlane and real
Node objects with real gRPC servers on loopback and real onnxruntime sessions, all on the test's
event loop (so an in-memory span exporter sees every hop)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from meshserve.client._admin import AdminClient
from meshserve.controlplane.app import ControlPlane, ControlPlaneConfig
from meshserve.devtools.demo_models import sha256_file
from meshserve.node.app import Node, NodeConfig

__all__ = ["InProcMesh", "eventually", "inproc_mesh", "register_by_tier"]


async def eventually(
    predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition"
) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


class InProcMesh:
    def __init__(self, cp: ControlPlane, nodes: list[Node]) -> None:
        self.cp = cp
        self.nodes = nodes

    @property
    def address(self) -> str:
        return self.cp.address


async def register_by_tier(mesh: InProcMesh, model: Path, tiers: Sequence[str]) -> None:
    """Register ``model`` once per tier as ``mlp-<tier>`` (placed on that tier's node) and wait
    until each has a READY copy in the control plane's view."""
    sha = sha256_file(model)
    with AdminClient(mesh.address) as admin:
        for tier in tiers:
            await asyncio.to_thread(
                admin.register_model,
                f"mlp-{tier}",
                model.as_uri(),
                sha,
                node_selector={"tier": tier},
            )
    for tier in tiers:
        await eventually(
            lambda t=tier: mesh.cp.snapshot().ready_nodes((f"mlp-{t}", "default")),
            what=f"mlp-{tier} ready",
        )


@contextlib.asynccontextmanager
async def inproc_mesh(
    etcd_url: str,
    tmp: Path,
    nodes: Sequence[tuple[str, bool]],
    *,
    max_message_bytes: int = 64 << 20,
    inline_max_us: float = 100.0,
) -> AsyncIterator[InProcMesh]:
    """``nodes``: (node_id, direct) pairs; direct nodes also serve OIP on a loopback port."""
    cp = ControlPlane(
        ControlPlaneConfig(
            etcd_url=etcd_url,
            listen="127.0.0.1:0",
            replica_id="cp-test",
            lease_ttl_s=3,
            max_message_bytes=max_message_bytes,
            trust_node_labels=True,  # the nodes below are ours: their tier labels place models
        )
    )
    await cp.start()
    started: list[Node] = []
    try:
        for node_id, direct in nodes:
            node = Node(
                NodeConfig(
                    control_planes=[cp.address],
                    node_id=node_id,
                    labels={"tier": "core" if direct else "edge"},
                    listen="127.0.0.1:0" if direct else None,
                    cache_dir=tmp / f"{node_id}-cache",
                    inline_max_us=inline_max_us,
                )
            )
            await node.start()
            started.append(node)
        await eventually(lambda: len(cp.snapshot().nodes) == len(nodes), what="nodes to join")
        yield InProcMesh(cp, started)
    finally:
        for node in started:
            await _bounded(node.stop(grace_s=1.0), f"stopping node {node.config.node_id}")
        await _bounded(cp.stop(grace_s=1.0), "stopping the control plane")


async def _bounded(step: Awaitable[None], what: str, timeout: float = 20.0) -> None:
    """Run a shutdown step; if it hangs, print every task's stack (the culprit) and fail."""
    try:
        await asyncio.wait_for(step, timeout)
    except TimeoutError:
        for task in asyncio.all_tasks():
            print(repr(task))
            for frame in task.get_stack(limit=15):
                print(f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        raise AssertionError(f"{what} did not finish within {timeout:.0f}s") from None
