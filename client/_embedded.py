"""Embedded mode: what an application passes to run models in-process (no heavy imports here).

``MeshClient(target, embedded=["digits"])`` runs ``digits`` inside the application process
(the runtime is :mod:`meshserve.client._member`, imported, with onnxruntime, only when a client
names embedded models) and joins the mesh as a *member* of kind ``embedded``: it dials the
control plane like a node (NodeLink, outbound only), is listed by ``meshctl nodes list`` and on
the live map, is never placed onto and never routed to, follows the model's ``live`` alias (or
a pinned version) through rollouts and rollbacks, and reports telemetry, drift sketches and
joined feedback like a node. Every other model still goes through the mesh.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["EmbeddedModel", "EmbeddedOptions", "EmbeddedStatus", "embedded_models"]


@dataclass(frozen=True, slots=True)
class EmbeddedModel:
    """A model the application runs itself: the version ``alias`` points at, or ``version``
    when pinned (then rollouts do not move it)."""

    model: str
    version: str = ""
    alias: str = "live"


def _member_id() -> str:
    return f"{socket.gethostname()}-app-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class EmbeddedOptions:
    """How the embedded member runs. ``member_id``: its id in the mesh (default: host name +
    a random suffix); ``cache_dir``: verified artifacts, the prediction log and the record of
    the versions last loaded (what it serves from when the control plane is unreachable at
    start); ``labels``: shown, never matched; ``join_token``/``insecure_join``: as a node's
    (``--join-token``, ``--insecure-join``); the client's ``tls`` is used for the link too (its
    certificate must name ``member_id`` where the control plane checks node certificates);
    ``artifact_roots``: the directories ``file://`` artifacts may be read from (None:
    anywhere); ``workers``: threads for loading and warming copies; the telemetry settings are
    a node's (``telemetry_buffer_bytes``: the bound of what is kept while unlinked)."""

    member_id: str = field(default_factory=_member_id)
    cache_dir: Path = Path(".meshserve/embedded")
    labels: Mapping[str, str] = field(default_factory=dict)
    join_token: str | None = field(default=None, repr=False)
    insecure_join: bool = False
    artifact_roots: Sequence[Path] | None = None
    workers: int = 1
    keepalive_ms: int = 10_000
    telemetry_max_bytes_per_s: int = 2048
    telemetry_buffer_bytes: int = 64 << 10
    telemetry_heartbeat_s: float = 30.0
    prediction_log_max_bytes: int = 32 << 20


@dataclass(frozen=True, slots=True)
class EmbeddedStatus:
    """What the member reports of itself (``MeshClient.embedded_status()``)."""

    member_id: str
    linked: int  # control-plane replicas it holds a stream to
    buffered: int  # telemetry summaries kept while unlinked, not delivered yet
    telemetry_bytes_sent: int
    serving: Mapping[str, tuple[str, tuple[str, ...]]]  # model -> (version, READY variants)


def embedded_models(embedded: Sequence[str | EmbeddedModel]) -> tuple[EmbeddedModel, ...]:
    """``embedded`` as :class:`EmbeddedModel` values (a name follows ``live``); ValueError on
    an empty or repeated name."""
    out: list[EmbeddedModel] = []
    for item in embedded:
        want = EmbeddedModel(item) if isinstance(item, str) else item
        if not want.model:
            raise ValueError("an embedded model needs a name")
        if any(w.model == want.model for w in out):
            raise ValueError(f"embedded model {want.model!r} named twice")
        out.append(want)
    return tuple(out)
