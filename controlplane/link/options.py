"""gRPC options of a replica's server (node streams, Admin, the gateway) and of its channels to
nodes' direct ports.

Contract: :func:`server_options` is pure. Keepalive pings notice a dead path to a node (a NAT that
lost its mapping, a cut cable) in about ``keepalive_ms`` x 1.5; nodes may ping as often as every
second without being refused; no message in either direction exceeds ``max_message_bytes``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["server_options"]


def server_options(max_message_bytes: int, keepalive_ms: int = 10_000) -> list[tuple[str, Any]]:
    """The option list for ``grpc.aio.server`` (and the gateway's channels to nodes)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", max(1000, keepalive_ms // 2)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]
