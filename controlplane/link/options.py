"""gRPC options of a replica's server (node streams, Admin, the gateway) and of its channels to
nodes' direct ports.

Contract: both functions are pure. Keepalive pings notice a dead path to a node (a NAT that
lost its mapping, a cut cable) in ``keepalive_ms`` to ``keepalive_ms`` x 1.5 (a ping every
``keepalive_ms``, its answer awaited ``keepalive_ms`` / 2, at least 1 s); nodes may ping as often
as every :data:`MIN_PING_FROM_NODES_MS` without being refused (half the node's own floor,
``node.link.MIN_KEEPALIVE_MS``); no message in either direction exceeds
``max_message_bytes``. :func:`node_channel_options` pings a node's direct port no more often than
every :data:`NODE_PING_FLOOR_MS`, which the node's server accepts (``node.link.DIRECT_MIN_PING_MS``
is half of it), so the node never answers GOAWAY ``too_many_pings``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MIN_PING_FROM_NODES_MS", "NODE_PING_FLOOR_MS", "node_channel_options", "server_options"]

#: The replica's server accepts a node's keepalive pings this often (with or without data).
MIN_PING_FROM_NODES_MS = 250

#: The gateway's keepalive to a node's direct port is never more frequent than this.
NODE_PING_FLOOR_MS = 1_000


def server_options(max_message_bytes: int, keepalive_ms: int = 10_000) -> list[tuple[str, Any]]:
    """The option list for the replica's ``grpc.aio.server`` (node streams, Admin, OIP)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", max(1000, keepalive_ms // 2)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_FROM_NODES_MS),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


def node_channel_options(
    max_message_bytes: int, keepalive_ms: int = 10_000
) -> list[tuple[str, Any]]:
    """The option list for the gateway's channels to nodes' direct ports: the message limit and
    keepalive at ``keepalive_ms``, never below :data:`NODE_PING_FLOOR_MS` (what nodes accept)."""
    ping_ms = max(NODE_PING_FLOOR_MS, keepalive_ms)
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", ping_ms),
        ("grpc.keepalive_timeout_ms", max(1000, ping_ms // 2)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
