"""Whose query it is, from the router that checked it to the node that logs its prediction.

A node logs a prediction under the tenant that asked, and joins a tenant's feedback only to that
tenant's predictions (a tenant cannot move another's accuracy with the other's request ids).
A caller on a node's own port is the tenant of its API key. A query forwarded by a router (a
gateway, a replica's tunnel) names its caller instead: the SHA-256 (hex) of the API key the
router was given, under :data:`CALLER_KEY` in the call metadata (unary) or the frame's
``trace_context`` map (multiplexed stream, tunnel). The router sets it from its own caller with
:func:`bind_caller` (for the request's task), and every forward adds :func:`caller_pairs`; a
node believes it only from a router (:mod:`meshserve.node.rights`). A digest is no secret: nodes
hold every key's digest already. On the node, each entry point (direct unary and stream, the
multiplexed stream, the tunnel) sets the tenant of the query it answers with :func:`set_tenant`
(for its task); the prediction log reads :func:`current_tenant`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Final

from meshserve.common.security import API_KEY_HEADER, AUTHORIZATION_HEADER

__all__ = [
    "CALLER_KEY",
    "bind_caller",
    "caller_pairs",
    "current_tenant",
    "key_digest",
    "set_tenant",
]

#: Metadata / trace-context key of the caller's API key digest on a forwarded query.
CALLER_KEY: Final = "x-meshserve-caller"

_caller: ContextVar[str] = ContextVar("meshserve_caller", default="")
_tenant: ContextVar[str] = ContextVar("meshserve_tenant", default="")


def key_digest(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """SHA-256 (hex) of the API key in ``metadata`` (``x-api-key``, else a bearer); "" none."""
    bearer = ""
    for key, value in metadata or ():
        if not isinstance(value, str):
            continue
        if key == API_KEY_HEADER:
            return hashlib.sha256(value.encode()).hexdigest()
        if key == AUTHORIZATION_HEADER and value[:7].lower() == "bearer ":
            bearer = value[7:].strip()
    return hashlib.sha256(bearer.encode()).hexdigest() if bearer else ""


def bind_caller(metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
    """The current request (its task and the tasks it starts) forwards its caller's digest."""
    _caller.set(key_digest(metadata))


def caller_pairs() -> tuple[tuple[str, str], ...]:
    """What a forward adds (metadata pairs, or map items): the bound caller, if any."""
    digest = _caller.get()
    return ((CALLER_KEY, digest),) if digest else ()


def set_tenant(tenant: str) -> None:
    """On a node: the query answered in this task (and the tasks it starts) is ``tenant``'s."""
    _tenant.set(tenant)


def current_tenant() -> str:
    """The tenant of the query this task answers ("": unknown, or a mesh without API keys)."""
    return _tenant.get()
