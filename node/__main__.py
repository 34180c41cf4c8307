"""``meshserve-node``: join a mesh by dialling out to its control plane."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
from pathlib import Path

from meshserve.common.process import (
    add_listen_options,
    configure_logging,
    configure_metrics,
    configure_tracing,
    exit_deadline,
    install_task_dump,
    listen_address,
    run,
)
from meshserve.common.security import (
    SecurityConfigError,
    TLSFiles,
    is_loopback_target,
    read_secret,
)
from meshserve.node.app import Node, NodeConfig, default_node_id
from meshserve.node.store import SourcePolicy
from meshserve.node.telemetry import HEARTBEAT_S


def parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"label {item!r} is not key=value")
        labels[key] = value
    return labels


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshserve-node", description=__doc__)
    p.add_argument(
        "--control-plane",
        required=True,
        help="control-plane address(es), comma-separated host:port",
    )
    p.add_argument("--node-id", default=None, help="stable node id (default: hostname-random)")
    p.add_argument("--labels", type=parse_labels, default={}, help="e.g. tier=edge,zone=a")
    p.add_argument(
        "--listen",
        default=None,
        help="also serve the inference API directly on host:port (default: tunnel only)",
    )
    p.add_argument("--advertise", default=None, help="address clients use for --listen")
    p.add_argument(
        "--lan-only",
        action="store_true",
        help="serve --listen to clients on the local network but do not advertise it to the "
        "control plane (a node behind NAT: the control plane reaches it through its stream)",
    )
    p.add_argument(
        "--keepalive-ms",
        type=int,
        default=10_000,
        help="ping the control plane this often; a dead path is noticed in ~1.5x (min 500)",
    )
    p.add_argument(
        "--telemetry-max-bytes-per-s",
        type=int,
        default=2048,
        help="telemetry budget per control-plane link: the least busy copies' entries are "
        "dropped, then the interval lengthened, to stay under it (0: unbounded)",
    )
    p.add_argument(
        "--telemetry-buffer-kb",
        type=int,
        default=64,
        help="telemetry summaries kept while no control plane is connected (oldest dropped "
        "first); sent first on reconnect",
    )
    p.add_argument(
        "--telemetry-heartbeat-s",
        type=float,
        default=HEARTBEAT_S,
        help="send a full telemetry message on each link this often; in between only the "
        "copies whose figures changed (an idle node sends nothing)",
    )
    p.add_argument(
        "--telemetry-log-s",
        type=float,
        default=0.0,
        help="log the telemetry bytes sent per link this often (0: never)",
    )
    p.add_argument("--cache-dir", type=Path, default=Path(".meshserve/cache"))
    p.add_argument(
        "--prediction-log-dir",
        type=Path,
        default=None,
        help="where models that opt in log predictions (default: <cache-dir>/predictions)",
    )
    p.add_argument(
        "--prediction-log-max-mb",
        type=int,
        default=128,
        help="bound of the prediction log on disk (rotating files; oldest dropped)",
    )
    p.add_argument("--max-message-mb", type=int, default=64)
    p.add_argument(
        "--inline-max-us",
        type=float,
        default=100.0,
        help="copies whose measured run takes at most this long run on the event loop instead "
        "of a worker thread (cheaper than the hand-off); 0 turns it off",
    )
    p.add_argument(
        "--memory-mb",
        type=int,
        default=0,
        help="memory offered to the mesh for model copies (default: all of the machine's)",
    )
    p.add_argument(
        "--max-in-flight-per-copy",
        type=int,
        default=256,
        help="admission: queries one copy holds at once; beyond, and for queries that could "
        "not finish before their deadline, RESOURCE_EXHAUSTED at once (0: no limit)",
    )
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        default=30.0,
        help="on SIGTERM, wait up to this long for the control plane to move this node's "
        "copies elsewhere (new copies warm first) before finishing in-flight work and leaving",
    )
    p.add_argument(
        "--download-deadline-s",
        type=float,
        default=1800.0,
        help="an artifact download (every attempt included) fails after this long; the "
        "control plane retries it later with backoff",
    )
    p.add_argument(
        "--download-min-rate",
        type=float,
        default=1024.0,
        help="bytes/s: a download that moves fewer bytes than this over --download-rate-window-s "
        "fails (a stuck or trickling server), retried later; 0 turns the rule off",
    )
    p.add_argument(
        "--download-rate-window-s",
        type=float,
        default=30.0,
        help="the window of --download-min-rate, in seconds",
    )
    p.add_argument(
        "--artifact-root",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="a directory file:// artifacts may be read from (repeatable; '/' for anywhere). "
        "Default: none, file:// artifacts are refused",
    )
    p.add_argument(
        "--artifact-host",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="a host http(s) artifacts may be downloaded from (repeatable; default: any). "
        "Redirects are followed within the same scheme, host and port only",
    )
    p.add_argument(
        "--artifact-bucket",
        action="append",
        default=[],
        metavar="BUCKET",
        help="a bucket (container) s3://, gs://, az:// artifacts may be read from (repeatable; "
        "default: any)",
    )
    p.add_argument(
        "--s3-endpoint-url",
        default=None,
        metavar="URL",
        help="the endpoint of an S3-compatible server (MinIO, Ceph) for s3:// artifacts; "
        "default: botocore's configuration (AWS_ENDPOINT_URL, ~/.aws/config). Credentials: "
        "the AWS_* environment variables, ~/.aws, or an instance role",
    )
    p.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=10.0,
        help="after the drain: queries in flight (up to half of it) and closing, bounded by "
        "this; SIGTERM -> exit takes at most --drain-timeout-s plus this (min 1)",
    )
    g = p.add_argument_group("security (docs/security.md)")
    g.add_argument(
        "--tls-ca",
        default="",
        help="PEM CA the control plane's certificate must chain to (the control-plane CA only: "
        "a CA that also issues node certificates lets a stolen node key pose as the control "
        "plane); --listen admits certificates it issued as routers",
    )
    g.add_argument(
        "--tls-client-ca",
        default="",
        help="PEM CA(s) of clients (SDKs) that --listen admits besides the routers; they query "
        "with a tenant's API key (default: only routers)",
    )
    g.add_argument(
        "--tls-cert",
        default="",
        help="PEM certificate naming this node's id (CN): presented to the control plane, and "
        "served on --listen (with --tls-ca, --listen then admits only mTLS clients)",
    )
    g.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    g.add_argument(
        "--join-token-file",
        default="",
        help="file holding the join token the mesh expects (without TLS it is sent to loopback "
        "control planes only)",
    )
    g.add_argument(
        "--insecure-join",
        action="store_true",
        help="without TLS, send the join token to non-loopback control planes too, in the clear "
        "(anyone on the path can read it and join)",
    )
    p.add_argument(
        "--no-deadline-shedding",
        action="store_true",
        help="queue every query whatever its deadline (benchmark baseline; default: refuse "
        "queries that cannot finish in time, drop those whose deadline passed in the queue)",
    )
    p.add_argument("--log-level", default="INFO")
    add_listen_options(p)
    p.add_argument(
        "--fault-delay-ms",
        type=float,
        default=0.0,
        help="fault injection: add this delay to every query (to test routing); default 0",
    )
    return p


async def _serve(config: NodeConfig, metrics_listen: str = "") -> None:
    configure_tracing("meshserve-node")
    configure_metrics("meshserve-node", metrics_listen)
    node = Node(config)
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(sig: int) -> None:
        received.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    install_task_dump(loop)
    await node.start()
    await stop.wait()
    graceful = received[0] == signal.SIGTERM  # a graceful stop: hand the copies over first
    grace_s = (config.drain_timeout_s if graceful else 0.0) + config.shutdown_grace_s
    # The sequence bounds itself to the grace; the deadline catches what it cannot (a download
    # thread stuck in a read, which the worker pool's shutdown would join forever).
    exit_deadline(grace_s + 1.0, f"node {config.node_id}")
    deadline = loop.time() + grace_s
    if graceful:
        stop.clear()  # a second signal cuts the drain short
        waits = [asyncio.ensure_future(node.drain()), asyncio.ensure_future(stop.wait())]
        _done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    budget = max(0.5, deadline - loop.time())
    try:
        await asyncio.wait_for(node.stop(grace_s=min(5.0, budget / 2)), budget)
    except TimeoutError:
        logging.getLogger("meshserve.node").error("closing overran %.1fs; exiting", budget)


def _http_listen(value: str, prog: str) -> str:
    """``--http-listen`` checked now (a bad value ends the process naming it)."""
    if value:
        try:
            listen_address(value, "--http-listen")
        except ValueError as exc:
            raise SystemExit(f"{prog}: {exc}") from None
    return value


def main(argv: list[str] | None = None) -> None:
    ns = _parser().parse_args(argv)
    configure_logging(ns.log_level)
    labels: dict[str, str] = ns.labels
    labels.setdefault("tier", "core" if ns.listen else "edge")
    try:
        tls = TLSFiles.from_options(ns.tls_ca, ns.tls_cert, ns.tls_key)
        if ns.tls_client_ca:
            if tls is None or tls.ca is None:
                raise SecurityConfigError("--tls-client-ca needs --tls-ca")
            tls = dataclasses.replace(tls, client_ca=Path(ns.tls_client_ca))
        if tls is not None:
            tls.pair()  # unreadable files fail now, not at the first handshake
            tls.callers_ca_bytes()
            if ns.listen and tls.cert is None:
                raise SecurityConfigError("--listen with TLS needs --tls-cert and --tls-key")
        token = (
            read_secret(Path(ns.join_token_file), "join token file") if ns.join_token_file else None
        )
        remote = [a for a in ns.control_plane.split(",") if a.strip()]
        remote = [a.strip() for a in remote if not is_loopback_target(a.strip())]
        if token and tls is None and remote and not ns.insecure_join:
            raise SecurityConfigError(
                f"not sending the join token to {', '.join(remote)} in the clear: dial the "
                "control plane with TLS (--tls-ca), or pass --insecure-join to accept that risk"
            )
    except SecurityConfigError as exc:
        raise SystemExit(f"meshserve-node: {exc}") from None
    config = NodeConfig(
        control_planes=[a.strip() for a in ns.control_plane.split(",") if a.strip()],
        node_id=ns.node_id or default_node_id(),
        labels=labels,
        listen=ns.listen,
        advertise=ns.advertise,
        cache_dir=ns.cache_dir,
        prediction_log_dir=ns.prediction_log_dir,
        prediction_log_max_bytes=max(1, ns.prediction_log_max_mb) << 20,
        max_message_bytes=ns.max_message_mb << 20,
        fault_delay_s=max(0.0, ns.fault_delay_ms) / 1000.0,
        memory_bytes=max(0, ns.memory_mb) << 20,
        inline_max_us=max(0.0, ns.inline_max_us),
        lan_only=ns.lan_only,
        keepalive_ms=max(500, ns.keepalive_ms),
        telemetry_max_bytes_per_s=max(0, ns.telemetry_max_bytes_per_s),
        telemetry_buffer_bytes=max(0, ns.telemetry_buffer_kb) << 10,
        telemetry_log_s=max(0.0, ns.telemetry_log_s),
        telemetry_heartbeat_s=max(0.1, ns.telemetry_heartbeat_s),
        max_in_flight_per_copy=max(0, ns.max_in_flight_per_copy),
        drain_timeout_s=max(0.0, ns.drain_timeout_s),
        shutdown_grace_s=max(1.0, ns.shutdown_grace_s),
        download_deadline_s=max(1.0, ns.download_deadline_s),
        download_min_rate_bps=max(0.0, ns.download_min_rate),
        download_rate_window_s=max(0.5, ns.download_rate_window_s),
        artifact_sources=SourcePolicy(
            file_roots=tuple(p.absolute() for p in ns.artifact_root),
            http_hosts=frozenset(h.lower() for h in ns.artifact_host) or None,
            buckets=frozenset(b.lower() for b in ns.artifact_bucket) or None,
            s3_endpoint_url=ns.s3_endpoint_url or None,
        ),
        tls=tls,
        join_token=token,
        insecure_join=ns.insecure_join,
        http_listen=_http_listen(ns.http_listen, "meshserve-node"),
    )
    run(_serve(config, ns.metrics_listen))


if __name__ == "__main__":
    main()
