"""etcd primitives of the control plane, on top of the ``aetcd`` asyncio client.

* :class:`Session` -- a lease kept alive in the background (liveness of a process);
* :class:`PrefixMirror` -- an in-memory copy of a key prefix kept in sync by a watch;
* :class:`Election` -- leader election on one key, bound to a session;
* :func:`connect` -- parse an etcd URL and open a client.

:class:`~meshserve.devtools.etcd.EtcdProcess` (a local etcd child process for tests
and ``meshctl up``) lives in :mod:`meshserve.devtools.etcd` and is not imported here.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import aetcd

from meshserve.controlplane.etcd._client import EtcdClient
from meshserve.controlplane.etcd.election import Election
from meshserve.controlplane.etcd.session import Session, SessionLostError
from meshserve.controlplane.etcd.watch import PrefixMirror

__all__ = [
    "DEFAULT_PORT",
    "Election",
    "EtcdClient",
    "PrefixMirror",
    "Session",
    "SessionLostError",
    "connect",
    "parse_url",
]

#: etcd's standard client port, used when a URL names none.
DEFAULT_PORT = 2379

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
    """Parse ``http://host:port``, ``host:port``, ``host`` (port 2379) or
    ``http://[v6addr]:port`` into ``(host, port)``.

    :raises ValueError: another scheme (TLS is not supported), credentials, a path,
        query or fragment, an empty host, or a port that is not in 1..65535.
    """
    text = url.strip()
    if not text:
        raise ValueError("empty etcd URL")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme != "http":
        raise ValueError(f"unsupported etcd URL scheme {parts.scheme!r} in {url!r}: use http://")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"credentials in etcd URL are not supported: {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"etcd URL must be http://host:port, got {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"etcd URL has no host: {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in etcd URL {url!r}") from exc
    if port is None:
        port = DEFAULT_PORT
    if port == 0:
        raise ValueError(f"bad port in etcd URL {url!r}")
    return host, port


async def connect(
    url: str,
    timeout: float = 5.0,
    *,
    verify: bool = True,
) -> EtcdClient:
    """Open an ``aetcd.Client`` for ``url`` (see :func:`parse_url`).

    ``timeout`` bounds every unary RPC (and watch creation) made with the client.
    With ``verify`` (default) one status RPC checks that etcd answers; on failure the
    client is closed and :class:`ConnectionError` raised.  The caller owns the client
    and must ``await client.close()``.

    :raises ValueError: malformed URL.
    :raises ConnectionError: ``verify`` and etcd did not answer.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    host, port = parse_url(url)
    grpc_host = f"[{host}]" if ":" in host else host  # IPv6 literal
    client = aetcd.Client(grpc_host, port, timeout=timeout, options=dict(_CHANNEL_OPTIONS))
    try:
        await client.connect()
        if verify:
            await client.status()
    except Exception as exc:
        await client.close()
        raise ConnectionError(f"cannot reach etcd at {url}: {exc}") from exc
    return client
