"""Helpers for integration tests that run a mesh of real processes (see
meshserve.devtools.local)."""

from __future__ import annotations

from pathlib import Path

from meshserve.client._admin import AdminClient
from meshserve.devtools.local import wait_until
from meshserve.protos import mesh_pb2

__all__ = ["copy_states", "register_file", "wait_copies"]


def register_file(
    admin: AdminClient,
    name: str,
    path: Path,
    *,
    sha256: str | None = None,
    copies: int = 1,
    selector: dict[str, str] | None = None,
    variant: str = "",
    version: str = "",
) -> None:
    from meshserve.devtools.demo_models import sha256_file

    admin.register_model(
        name,
        path.as_uri(),
        sha256 or sha256_file(path),
        copies=copies,
        node_selector=selector,
        variant=variant,
        version=version,
    )


def copy_states(admin: AdminClient, model: str) -> dict[tuple[str, str], int]:
    """(node_id, variant) -> CopyState of every copy of ``model`` as the control plane sees
    it (two variants on one node are two copies)."""
    return {
        (n.node_id, c.variant): c.state
        for n in admin.list_nodes()
        for c in n.copies
        if c.model == model
    }


def wait_copies(
    admin: AdminClient, model: str, count: int, state: int = mesh_pb2.READY, timeout: float = 60.0
) -> dict[tuple[str, str], int]:
    """Wait until ``model`` has at least ``count`` copies (any variants) in ``state``."""
    return dict(
        wait_until(
            lambda: (
                (s := copy_states(admin, model))
                and sum(v == state for v in s.values()) >= count
                and s
            ),
            timeout,
            what=f"{count} {mesh_pb2.CopyState.Name(state)} copies of {model}",  # type: ignore[arg-type]
        )
    )
