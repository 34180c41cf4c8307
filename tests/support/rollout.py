"""Rollout helpers for tests of a mesh of real processes (integration and chaos suites)."""

from __future__ import annotations

from pathlib import Path

from meshserve.client._admin import AdminClient
from meshserve.devtools.local import wait_until
from meshserve.protos import mesh_pb2
from tests.support.mesh import register_file

__all__ = ["roll_out", "wait_shifted"]


def wait_shifted(
    admin: AdminClient, model: str, version: str, *, alias: str = "live", timeout: float = 60.0
) -> mesh_pb2.AliasStatus:
    """Wait until ``version`` takes ``alias``'s queries: all of them, or its canary share when
    it is the alias's canary. Returns the alias's status then."""

    def shifted() -> mesh_pb2.AliasStatus | None:
        for status in admin.list_aliases(model):
            if status.alias.alias != alias:
                continue
            if status.alias.canary_version == version:
                return status if status.canary_active else None
            return status if status.serving == version else None
        return None

    status: mesh_pb2.AliasStatus = wait_until(
        shifted, timeout, interval=0.05, what=f"{model}/{alias} traffic on {version}"
    )
    return status


def roll_out(
    admin: AdminClient,
    model: str,
    version: str,
    path: Path | None = None,
    *,
    alias: str = "live",
    canary_percent: float = 0.0,
    copies: int = 1,
    timeout: float = 60.0,
) -> mesh_pb2.AliasStatus:
    """Register ``path`` as version ``version`` of ``model`` (when given; its one variant named
    after it, ``copies`` copies),
    point ``alias`` at it (or canary ``canary_percent`` % of its queries there) at once, while
    it still loads, and return once the traffic shifted (:func:`wait_shifted`)."""
    if path is not None:
        register_file(admin, model, path, version=version, copies=copies)
    admin.rollout(model, version, alias=alias, canary_percent=canary_percent)
    return wait_shifted(admin, model, version, alias=alias, timeout=timeout)
