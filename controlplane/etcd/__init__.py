"""etcd primitives of the control plane, on top of the ``aetcd`` asyncio client.

* :class:`Session` -- a lease kept alive in the background (liveness of a process);
* :class:`PrefixMirror` -- an in-memory copy of a key prefix kept in sync by a watch;
* :class:`Election` -- leader election on one key, bound to a session;
* :func:`connect` -- parse an etcd URL list and open a client (TLS, auth, failover: ``link``).

:class:`~meshserve.devtools.etcd.EtcdProcess` (a local etcd child process for tests
and ``meshctl up``) lives in :mod:`meshserve.devtools.etcd` and is not imported here.
"""

from __future__ import annotations

import aetcd.exceptions

from meshserve.controlplane.etcd._client import EtcdClient, status
from meshserve.controlplane.etcd.election import Election
from meshserve.controlplane.etcd.link import (
    DEFAULT_PORT,
    Endpoint,
    EtcdAuth,
    add_etcd_options,
    auth_from_args,
    open_client,
    parse_endpoint,
    parse_endpoints,
)
from meshserve.controlplane.etcd.session import Session, SessionLostError
from meshserve.controlplane.etcd.watch import PrefixMirror

__all__ = [
    "DEFAULT_PORT",
    "Election",
    "Endpoint",
    "EtcdAuth",
    "EtcdClient",
    "PrefixMirror",
    "Session",
    "SessionLostError",
    "add_etcd_options",
    "auth_from_args",
    "connect",
    "parse_endpoints",
    "parse_url",
]

#: gRPC channel options for :func:`connect`: reconnect quickly after an etcd restart
#: (gRPC's default backoff grows to 120 s) and detect dead connections.
_CHANNEL_OPTIONS: dict[str, int] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
}


def parse_url(url: str) -> tuple[str, int]:
    """Parse one plain ``http://host:port``, ``host:port``, ``host`` (port 2379) or
    ``http://[v6addr]:port`` into ``(host, port)`` (lists, ``https://``: :func:`parse_endpoints`).

    :raises ValueError: another scheme, credentials, a path, query or fragment, an empty host,
        or a port that is not in 1..65535.
    """
    endpoint = parse_endpoint(url, schemes=("http",))
    return endpoint.host, endpoint.port


async def connect(
    url: str,
    timeout: float = 5.0,
    *,
    verify: bool = True,
    auth: EtcdAuth | None = None,
) -> EtcdClient:
    """Open an ``aetcd.Client`` for ``url``: one etcd URL or a comma-separated list
    (:func:`parse_endpoints`), with ``auth`` (TLS files, user and password; see
    :mod:`meshserve.controlplane.etcd.link`).

    ``timeout`` bounds every unary RPC (and watch creation) made with the client.
    With ``verify`` (default) a status RPC and a read inside ``/meshserve/`` check that etcd
    answers and admits these credentials (each endpoint is tried in turn); on failure the
    client is closed and :class:`ConnectionError` raised. The caller owns the client and must
    ``await client.close()``.

    :raises ValueError: a malformed URL list, or auth that does not fit it.
    :raises ConnectionError: etcd did not answer, or refused the credentials.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    endpoints = parse_endpoints(url)
    client = open_client(endpoints, auth, timeout=timeout, options=_CHANNEL_OPTIONS)
    try:
        await client.connect()
        if verify:
            for attempt in range(len(endpoints)):
                try:  # a read inside /meshserve/: the credentials are checked too
                    await status(client)
                    break
                except aetcd.exceptions.ConnectionFailedError:
                    if attempt == len(endpoints) - 1:
                        raise
                    client.channel.rotate()
    except Exception as exc:
        await client.close()
        raise ConnectionError(f"cannot reach etcd at {url}: {exc}") from exc
    return client
