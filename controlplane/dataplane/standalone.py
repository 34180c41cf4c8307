"""``meshserve-gateway``: a standalone gateway, routing from the routing feed (scale out as N).

The same :class:`~meshserve.controlplane.dataplane.gateway.Gateway` a replica embeds, behind its
own OIP server, fed by a replica's routing feed
(:class:`~meshserve.common.routing.feed.FeedClient`, any replica of ``--feed``) instead of
etcd and node streams: stateless, so operators run any number behind a load balancer.

Contract:

- Routing: from the feed's view (:meth:`FeedClient.snapshot`) and the live load it carries
  (:meth:`FeedState.load`); queries to nodes with a direct address go over one multiplexed
  stream per node (unary with ``--unary``). No node streams (``linked`` is empty, no tunnel), no
  etcd, no wake key.
- A variant with no direct copy (tunnel-only copies, or scaled to zero) is handed whole to a
  replica's gateway (:class:`ReplicaRelay`): a replica holding the stream of a node with a READY
  copy of it when the feed names one, else any replica the feed lists (then the ``--feed``
  addresses); one retry on another replica after UNAVAILABLE, inside the deadline.
- Until the feed delivered its first full view, ServerReady is false and queries answer
  UNAVAILABLE (never NOT_FOUND from an empty view). ServerLive is always true.
- Security, like a replica: ``--tls-cert``/``--tls-key`` (+ ``--tls-ca``: callers' certificates,
  ``--tls-client-auth``), ``--api-keys-file`` (callers' API keys and the models each tenant may
  query, checked by :class:`~meshserve.controlplane.auth.Guard`); ``--api-key-file``: this
  gateway's own key, sent to the feed, the nodes and the replicas (with TLS, or to loopback
  addresses only). With ``--tls-ca`` the same certificate is this gateway's client certificate
  and the CA verifies the replicas (the control-plane CA), ``--tls-node-ca`` the nodes (default
  ``--tls-ca``); ``--tls-client-ca`` adds callers' CAs (one CA per role: a node's certificate
  never passes as a replica, see :mod:`meshserve.devtools.certs`).
- SIGTERM/SIGINT: the server stops (calls in flight get a grace), then the node streams, the
  replica channels and the feed close, each awaited and bounded; the process exits within
  ``--shutdown-grace-s``.
- Traces: the same tree as a replica's gateway (``gateway ModelInfer`` → ``gateway route`` →
  ``gateway forward`` → the node), a relayed query's forward span (path ``replica``) being the
  parent of the replica's ``gateway ModelInfer``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from meshserve.common.errors import (
    StatusError,
    Unavailable,
    from_code,
    map_errors,
    tolerant_decoding,
)
from meshserve.common.health import DRAIN_S, INFERENCE, Health, add_standard_services
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
from meshserve.common.rest_server import RestHandlers, RestServer, build_app, ssl_context
from meshserve.common.routing.feed import FeedClient
from meshserve.common.routing.view import Snapshot
from meshserve.common.security import (
    SecurityConfigError,
    TLSFiles,
    channel_credentials,
    read_secret,
    server_credentials,
)
from meshserve.controlplane.auth import AuthConfig, Guard, load_api_keys
from meshserve.controlplane.dataplane.admission import Admission
from meshserve.controlplane.dataplane.gateway import Gateway, add_gateway_to_server
from meshserve.controlplane.dataplane.options import add_gateway_options
from meshserve.controlplane.link.options import node_channel_options, server_options
from meshserve.protos import mesh_pb2

__all__ = ["ReplicaRelay", "StandaloneConfig", "StandaloneGateway", "main"]

_log = logging.getLogger("meshserve.gateway")

#: ModelInfer of a replica's gateway, called with the caller's bytes.
_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class StandaloneConfig:
    feed: Sequence[str]  # replica addresses (any of them publishes the feed)
    listen: str = "127.0.0.1:8002"
    zone: str = ""  # preferred for queries naming no client_zone ("": none)
    # the listener's certificate (+ CA: callers, replicas; node_ca: nodes; client_ca: callers)
    tls: TLSFiles | None = None
    require_client_cert: bool = True  # with tls and a CA: every caller presents a certificate
    auth: AuthConfig = field(default_factory=AuthConfig)  # callers' API keys (tenants)
    api_key: str | None = field(default=None, repr=False)  # own key: feed, nodes, replicas
    max_message_bytes: int = 64 << 20
    keepalive_ms: int = 10_000
    max_in_flight_per_copy: int = 128  # admission per model: x ready copies (0: off)
    max_in_flight_per_client: int = 1024  # admission per client (0: off)
    mux: bool = True  # direct queries over multiplexed streams (False: unary calls)
    shutdown_grace_s: float = 5.0
    http_listen: str = ""  # OIP over HTTP/REST on this HOST:PORT ("": off; common/rest_server)


class ReplicaRelay:
    """The standalone gateway's ``fallback``: a whole query to a replica's gateway (see the
    module contract). One channel per replica address, closed by :meth:`close`."""

    def __init__(
        self,
        feed: FeedClient,
        *,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        self._feed = feed
        self._credentials = credentials
        self._options = list(options)
        self._channels: dict[str, aio.Channel] = {}
        self._calls: dict[str, Any] = {}

    def addresses(self, spec: mesh_pb2.ModelSpec) -> list[str]:
        """Replica addresses to try for ``spec``: those holding a stream of a node with a READY
        copy first (shuffled), then every other replica the feed or ``--feed`` names."""
        state = self._feed.state
        by_id = {r.replica_id: r.address for r in state.replicas if r.address}
        holding: list[str] = []
        for node in self._feed.snapshot().ready_nodes((spec.name, spec.variant)):
            for replica in sorted(node.replicas):
                address = by_id.get(replica)
                if address and address not in holding:
                    holding.append(address)
        random.shuffle(holding)
        others = [a for a in [*by_id.values(), *self._feed.targets] if a not in holding]
        random.shuffle(others)
        return list(dict.fromkeys([*holding, *others]))

    def _call(self, address: str) -> Any:
        call = self._calls.get(address)
        if call is None:
            if self._credentials is None:
                channel = aio.insecure_channel(address, options=self._options)
            else:
                channel = aio.secure_channel(address, self._credentials, options=self._options)
            self._channels[address] = channel
            call = self._calls[address] = channel.unary_unary(
                _MODEL_INFER, request_serializer=None, response_deserializer=None
            )
        return call

    async def __call__(
        self,
        request: bytes,
        spec: mesh_pb2.ModelSpec,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]],
    ) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        failure: StatusError | None = None
        for address in self.addresses(spec)[:2]:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                answer: bytes = await self._call(address)(
                    request, timeout=left, metadata=tuple(metadata)
                )
                return answer
            except aio.AioRpcError as exc:
                error = from_code(exc.code().value[0], exc.details() or exc.code().name)
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise error from None
                failure = Unavailable(f"replica {address}: {error.message}")
        if failure is not None:
            raise failure
        raise Unavailable(
            f"model {spec.name!r} variant {spec.variant!r} has no copy this gateway reaches "
            "directly, and no replica is known to forward it to"
        )

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        self._calls.clear()
        await asyncio.gather(*(c.close(None) for c in channels), return_exceptions=True)


class StandaloneGateway:
    """One standalone gateway: OIP server, gateway, routing feed (see the module contract)."""

    def __init__(self, config: StandaloneConfig) -> None:
        self.config = config
        self.address = ""
        self.feed: FeedClient | None = None
        self.gateway: Gateway | None = None
        self.relay: ReplicaRelay | None = None
        self._server: aio.Server | None = None
        self.health: Health | None = None  # grpc.health.v1: SERVING once the feed is ready
        self._serving: asyncio.Task[None] | None = None
        self.rest: RestServer | None = None  # OIP over HTTP/REST (set by start with http_listen)

    def snapshot(self) -> Snapshot:
        """The feed's view; UNAVAILABLE before its first full view (an empty view would answer
        NOT_FOUND for every model)."""
        feed = self.feed
        if feed is None or not feed.ready:
            raise Unavailable("this gateway has no routing feed yet; retry")
        return feed.snapshot()

    def ready(self) -> bool:
        return self.feed is not None and self.feed.ready

    async def start(self) -> None:
        cfg = self.config
        self._server = server = aio.server(
            options=server_options(cfg.max_message_bytes, cfg.keepalive_ms)
        )
        mtls = cfg.tls is not None and cfg.tls.ca is not None and cfg.require_client_cert
        if cfg.tls is None:
            port = server.add_insecure_port(cfg.listen)
        else:
            port = server.add_secure_port(
                cfg.listen, server_credentials(cfg.tls, require_client_cert=mtls)
            )
        host = cfg.listen.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"
        guard = Guard(cfg.auth)
        channel_options = node_channel_options(cfg.max_message_bytes, cfg.keepalive_ms)
        # to nodes and replicas: the CA verifies them, our certificate and key (if any) are the
        # client's, our API key (if any) rides on every call
        outward_tls = cfg.tls if cfg.tls and cfg.tls.ca else None
        outward = channel_credentials(outward_tls, cfg.api_key)
        to_nodes = channel_credentials(outward_tls and outward_tls.for_nodes(), cfg.api_key)
        self.feed = feed = FeedClient(
            cfg.feed, tls=cfg.tls if cfg.tls and cfg.tls.ca else None, api_key=cfg.api_key
        )
        self.relay = ReplicaRelay(feed, credentials=outward, options=channel_options)
        self.gateway = gateway = Gateway(
            snapshot=self.snapshot,
            channel_options=channel_options,
            ready=self.ready,
            telemetry=feed.state.load,
            fallback=self.relay,
            zone=cfg.zone,
            admission=Admission(
                per_copy=cfg.max_in_flight_per_copy, per_client=cfg.max_in_flight_per_client
            ),
            node_credentials=to_nodes,
            stream_check=guard.stream_check,
            tenant_of=guard.tenant_name,
            mux=cfg.mux,
            max_message_bytes=cfg.max_message_bytes,
        )

        def changed(update: mesh_pb2.FeedUpdate) -> None:
            if update.full or update.entries or update.removed:
                gateway.notify()
            if update.full or update.removed:  # nodes may be gone: their measures and streams
                nodes = feed.snapshot().nodes
                gateway.forget(lambda key: key[0] in nodes)

        feed.subscribe(changed)
        add_gateway_to_server(map_errors(guard.inference(gateway)), tolerant_decoding(server))
        self.health = health = await add_standard_services(server, (INFERENCE,), serving=False)
        feed.start()
        await server.start()
        if cfg.http_listen:  # the same handlers as gRPC's ModelInfer & co, auth included
            self.rest = RestServer(
                build_app(RestHandlers.of(gateway), max_body_bytes=cfg.max_message_bytes),
                cfg.http_listen,
                tls=ssl_context(cfg.tls, require_client_cert=mtls),
                what="gateway: ",
            )
            await self.rest.start()
        self._serving = asyncio.create_task(self._serving_once_ready(health), name="health")
        _log.info(
            "gateway serving on %s (feed from %s, zone %r, %s to nodes)",
            self.address,
            ", ".join(feed.targets),
            cfg.zone,
            "streams" if cfg.mux else "unary calls",
        )

    async def wait_ready(self, timeout: float) -> None:
        """Wait for the feed's first full view (raises its refusal, or UNAVAILABLE)."""
        assert self.feed is not None, "start() first"
        await self.feed.wait_ready(timeout)

    async def _serving_once_ready(self, health: Health) -> None:
        """Health turns SERVING once the feed delivered its first full view (before, every
        query would answer UNAVAILABLE); a refused or failed wait is tried again."""
        assert self.feed is not None
        while True:
            try:
                await self.feed.wait_ready(60.0)
                break
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(1.0)
        await health.set(True)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stop serving (calls in flight get ``grace_s``), then close the node streams, the
        replica channels and the feed; each step bounded, all awaited."""
        if self._serving is not None:
            self._serving.cancel()
            await asyncio.gather(self._serving, return_exceptions=True)
        if self.health is not None:  # probes see NOT_SERVING while the rest stops
            await self.health.shutdown()
        steps: list[tuple[str, Any, float]] = []
        if self.rest is not None:
            steps.append(("rest", self.rest.stop(), 2.0))
        if self.health is not None:  # clients balancing on our health have moved away
            steps.append(("drain", self.health.drain(min(DRAIN_S, grace_s)), DRAIN_S + 0.5))
        if self._server is not None:
            steps.append(("server", self._server.stop(grace_s), grace_s + 1.0))
        if self.gateway is not None:
            steps.append(("node streams", self.gateway.close(), 1.0))
        if self.relay is not None:
            steps.append(("replica channels", self.relay.close(), 1.0))
        if self.feed is not None:
            steps.append(("routing feed", self.feed.close(), 1.0))
        for name, step, budget in steps:
            try:
                await asyncio.wait_for(step, budget)
            except TimeoutError:
                _log.error("shutdown step %r overran %.1fs; skipped", name, budget)
            except Exception as exc:
                _log.warning("shutdown step %r failed: %r", name, exc)


# -- the command ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshserve-gateway", description=__doc__.split("\n")[0])
    p.add_argument(
        "--feed",
        required=True,
        help="control-plane replicas publishing the routing feed: HOST:PORT[,HOST:PORT...]",
    )
    p.add_argument("--listen", default="127.0.0.1:8002", help="host:port of the OIP server")
    add_gateway_options(p)
    p.add_argument("--max-message-mb", type=int, default=64)
    p.add_argument("--keepalive-ms", type=int, default=10_000, help="keepalive of streams to nodes")
    p.add_argument(
        "--unary",
        action="store_true",
        help="send queries to nodes as unary calls instead of over multiplexed streams",
    )
    p.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=5.0,
        help="SIGTERM/SIGINT -> exit within this long: calls in flight get up to half of it",
    )
    g = p.add_argument_group("security (docs/security.md)")
    g.add_argument("--tls-cert", default="", help="PEM certificate of the listener (enables TLS)")
    g.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    g.add_argument(
        "--tls-ca",
        default="",
        help="PEM CA certificates callers must chain to (mutual TLS) and that replicas and "
        "nodes are verified with (this gateway's certificate is then its client certificate)",
    )
    g.add_argument(
        "--tls-node-ca",
        default="",
        help="PEM CA of the nodes' direct ports (default: --tls-ca); with one CA per role, "
        "--tls-ca is the control-plane CA and this the node CA",
    )
    g.add_argument(
        "--tls-client-ca",
        default="",
        help="PEM CA(s) of callers admitted besides --tls-ca's (e.g. the client CA)",
    )
    g.add_argument(
        "--tls-client-auth",
        choices=("required", "none"),
        default="required",
        help="with --tls-ca: 'required' (every caller presents a certificate) or 'none'",
    )
    g.add_argument(
        "--api-keys",
        "--api-keys-file",
        dest="api_keys",
        default="",
        help="YAML of tenants, their API keys and the models each may query (as the "
        "replica's); inference then needs a key (x-api-key or authorization: Bearer)",
    )
    g.add_argument(
        "--api-key-file",
        default="",
        help="this gateway's own API key, sent to the routing feed, the nodes and the replicas",
    )
    p.add_argument("--log-level", default="INFO")
    add_listen_options(p)
    return p


def _http_listen(value: str, prog: str) -> str:
    """``--http-listen`` checked now (a bad value ends the process naming it)."""
    if value:
        try:
            listen_address(value, "--http-listen")
        except ValueError as exc:
            raise SystemExit(f"{prog}: {exc}") from None
    return value


def config_from_args(argv: Sequence[str] | None = None) -> tuple[StandaloneConfig, Any]:
    """The configuration (and the parsed namespace) from a command line; a bad option or file
    ends the process with a message naming it (never a secret)."""
    ns = _parser().parse_args(argv)
    feed = [t.strip() for t in ns.feed.split(",") if t.strip()]
    if not feed:
        raise SystemExit("meshserve-gateway: --feed needs at least one replica address")
    try:
        tls = TLSFiles.from_options(ns.tls_ca, ns.tls_cert, ns.tls_key)
        if tls is not None and tls.cert is None:
            raise SecurityConfigError("--tls-ca needs the listener's --tls-cert and --tls-key")
        if (ns.tls_node_ca or ns.tls_client_ca) and (tls is None or tls.ca is None):
            raise SecurityConfigError("--tls-node-ca and --tls-client-ca need --tls-ca")
        if tls is not None:
            tls = replace(
                tls,
                node_ca=Path(ns.tls_node_ca) if ns.tls_node_ca else None,
                client_ca=Path(ns.tls_client_ca) if ns.tls_client_ca else None,
            )
            tls.pair()  # unreadable files fail now, not at the first handshake
            tls.callers_ca_bytes()
            tls.for_nodes().ca_bytes()
        tenants = load_api_keys(Path(ns.api_keys)) if ns.api_keys else None
        api_key = read_secret(Path(ns.api_key_file), "API key file") if ns.api_key_file else None
    except SecurityConfigError as exc:
        raise SystemExit(f"meshserve-gateway: {exc}") from None
    config = StandaloneConfig(
        feed=tuple(feed),
        listen=ns.listen,
        zone=ns.zone.strip(),
        tls=tls,
        require_client_cert=ns.tls_client_auth == "required",
        auth=AuthConfig(tenants=tenants),
        api_key=api_key,
        max_message_bytes=ns.max_message_mb << 20,
        keepalive_ms=max(1000, ns.keepalive_ms),
        max_in_flight_per_copy=max(0, ns.max_in_flight_per_copy),
        max_in_flight_per_client=max(0, ns.max_in_flight_per_client),
        mux=not ns.unary,
        shutdown_grace_s=max(1.0, ns.shutdown_grace_s),
        http_listen=_http_listen(ns.http_listen, "meshserve-gateway"),
    )
    return config, ns


async def _serve(config: StandaloneConfig, metrics_listen: str = "") -> None:
    configure_tracing("meshserve-gateway")
    configure_metrics("meshserve-gateway", metrics_listen)
    gateway = StandaloneGateway(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    install_task_dump(loop)
    try:
        await gateway.start()
    except BaseException:
        await gateway.stop(grace_s=0.0)
        raise

    async def announce() -> None:
        with contextlib.suppress(Exception):
            await gateway.wait_ready(3600.0)
            assert gateway.feed is not None
            _log.info("routing feed ready (revision %d)", gateway.feed.state.revision)

    ready = asyncio.ensure_future(announce())
    await stop.wait()
    # the sequence below bounds itself; the deadline catches what it cannot (a stuck thread)
    exit_deadline(config.shutdown_grace_s + 1.0, f"gateway {gateway.address}")
    ready.cancel()
    await gateway.stop(grace_s=min(3.0, config.shutdown_grace_s / 2))
    _log.info("gateway %s stopped", gateway.address)


def main(argv: Sequence[str] | None = None) -> None:
    config, ns = config_from_args(argv)
    configure_logging(ns.log_level)
    run(_serve(config, ns.metrics_listen))


if __name__ == "__main__":
    main()
