"""The node process: composes store, copies, inference handler, optional OIP server and agent.

Lifecycle (one place): :meth:`Node.start` → serve → (SIGTERM: :meth:`Node.drain`, the copies
move elsewhere first) → :meth:`Node.stop` (close the links, stop the server with a grace period
for in-flight queries, unload, shut the worker pool down).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from grpc import aio

from meshserve.common.errors import map_errors, tolerant_decoding
from meshserve.common.health import INFERENCE, NODE_INFERENCE, Health, add_standard_services
from meshserve.common.rest_server import RestHandlers, RestServer, build_app, ssl_context
from meshserve.common.security import TLSFiles, load_cas, server_credentials
from meshserve.node.agent import Agent
from meshserve.node.copies import CopyManager
from meshserve.node.link import direct_server_options
from meshserve.node.monitor import PredictionLog
from meshserve.node.mux import MuxServicer
from meshserve.node.rights import ROUTERS, Rights
from meshserve.node.service import InferenceHandler, NodeInferenceServicer
from meshserve.node.store import ModelStore, SourcePolicy
from meshserve.node.telemetry import HEARTBEAT_S
from meshserve.protos import inference_pb2_grpc, mesh_pb2, mesh_pb2_grpc

__all__ = ["Node", "NodeConfig"]

_log = logging.getLogger("meshserve.node")


def default_node_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class NodeConfig:
    control_planes: list[str]
    node_id: str = field(default_factory=default_node_id)
    labels: dict[str, str] = field(default_factory=dict)
    listen: str | None = None  # host:port for the direct OIP server; None = tunnel only
    advertise: str | None = None  # address clients use for the direct port (default: listen)
    cache_dir: Path = Path(".meshserve/cache")
    max_message_bytes: int = 64 << 20
    workers: int = max(1, os.cpu_count() or 1)
    fault_delay_s: float = 0.0  # fault injection: delay added to every query (tests, chaos)
    memory_bytes: int = 0  # memory offered for copies; 0 = the machine's
    inline_max_us: float = 100.0  # copies faster than this run on the event loop (0: never)
    lan_only: bool = False  # serve --listen to local clients, never advertise it (behind NAT)
    keepalive_ms: int = 10_000  # ping the control plane this often (notices a dead path)
    telemetry_max_bytes_per_s: int = 2048  # telemetry budget per control-plane link; 0: none
    telemetry_buffer_bytes: int = 64 << 10  # summaries kept while no control plane is connected
    telemetry_log_s: float = 0.0  # log the telemetry bytes sent this often; 0: never
    telemetry_heartbeat_s: float = HEARTBEAT_S  # a full telemetry message this often (else deltas)
    prediction_log_dir: Path | None = (
        None  # models that opt in log here; None: cache_dir/predictions
    )
    prediction_log_max_bytes: int = 128 << 20  # the log's bound on disk (rotating files)
    max_in_flight_per_copy: int = 256  # admission: queries one copy holds (0: no limit)
    drain_timeout_s: float = 30.0  # SIGTERM: wait this long for copies to move elsewhere
    shutdown_grace_s: float = 10.0  # then in-flight queries + close, bounded by this (total)
    shed_late: bool = True  # refuse / drop queries that cannot finish before their deadline
    download_deadline_s: float = 1800.0  # one artifact download, all attempts: then it fails
    download_min_rate_bps: float = 1024.0  # a download slower than this (over the window) fails
    download_rate_window_s: float = 30.0
    artifact_sources: SourcePolicy = field(default_factory=SourcePolicy)  # file:// roots, hosts
    # dial the CP with TLS (tls.ca: the control-plane CA); serve --listen with TLS (+CA: mTLS
    # only, admitting the routers (tls.ca) and clients (tls.client_ca))
    tls: TLSFiles | None = None
    join_token: str | None = field(default=None, repr=False)  # sent on NodeLink.Connect
    insecure_join: bool = False  # without TLS, send the join token to non-loopback replicas too
    # client certificate names let through the direct port's tenant checks (the mesh's routers,
    # which checked the tenant already; see meshserve.node.rights)
    trusted_routers: frozenset[str] = ROUTERS
    mux_max_in_flight: int = 1024  # queries one multiplexed stream runs at once (then: reads stop)
    http_listen: str = ""  # OIP over HTTP/REST on this HOST:PORT ("": off; common/rest_server)


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.workers, thread_name_prefix="ort"
        )
        files = 8
        self.prediction_log = PredictionLog(
            config.prediction_log_dir or config.cache_dir / "predictions",
            max_file_bytes=max(1 << 16, config.prediction_log_max_bytes // files),
            max_files=files,
        )
        self.copies = CopyManager(
            ModelStore(
                config.cache_dir,
                deadline_s=config.download_deadline_s,
                min_rate_bps=config.download_min_rate_bps,
                rate_window_s=config.download_rate_window_s,
                sources=config.artifact_sources,
            ),
            self._executor,
            batch_concurrency=config.workers,
            inline_max_us=config.inline_max_us,
            prediction_log=self.prediction_log,
        )
        self.handler = InferenceHandler(
            config.node_id,
            self.copies,
            fault_delay_s=config.fault_delay_s,
            max_in_flight_per_copy=config.max_in_flight_per_copy,
            parallelism=config.workers,
            shed_late=config.shed_late,
        )
        # who may query the direct port: fails closed with TLS until the control plane says
        # (routers: certificates the control-plane CA, --tls-ca, issued)
        self.rights = Rights(
            config.node_id,
            fail_closed=config.tls is not None,
            routers=config.trusted_routers,
            router_cas=load_cas(config.tls.ca_bytes()) if config.tls is not None else (),
        )
        self._server: aio.Server | None = None
        self.rest: RestServer | None = None  # OIP over HTTP/REST (set by start with http_listen)
        self.health: Health | None = None  # grpc.health.v1 on --listen (none: tunnel only)
        self.direct_address = ""
        self.agent: Agent | None = None
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        cfg = self.config
        await asyncio.to_thread(self.prediction_log.open)
        direct = map_errors(NodeInferenceServicer(self.handler, self.copies, self.rights))
        if cfg.listen:
            self._server = aio.server(options=direct_server_options(cfg.max_message_bytes))
            inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                direct, tolerant_decoding(self._server)
            )
            mesh_pb2_grpc.add_NodeInferenceServicer_to_server(  # the multiplexed fast path
                map_errors(
                    MuxServicer(
                        self.handler,
                        rights=self.rights,
                        max_in_flight=cfg.mux_max_in_flight,
                        max_message_bytes=cfg.max_message_bytes,
                    )
                ),
                tolerant_decoding(self._server),
            )
            if cfg.tls is None:
                port = self._server.add_insecure_port(cfg.listen)
            else:  # with a CA, only callers with a certificate it (the gateways) or
                # tls.client_ca (clients) issued
                creds = server_credentials(cfg.tls, require_client_cert=cfg.tls.ca is not None)
                port = self._server.add_secure_port(cfg.listen, creds)
            host = (cfg.advertise or cfg.listen).rsplit(":", 1)[0]
            self.direct_address = "" if cfg.lan_only else cfg.advertise or f"{host}:{port}"
            self.health = await add_standard_services(self._server, (INFERENCE, NODE_INFERENCE))
            await self._server.start()
            _log.info(
                "node %s serving OIP directly on %s%s",
                cfg.node_id,
                f"{host}:{port}",
                " (LAN only: not advertised)" if cfg.lan_only else "",
            )
        if cfg.http_listen:  # the direct port's handlers (tenant rights included), over REST
            self.rest = RestServer(
                build_app(RestHandlers.of(direct), max_body_bytes=cfg.max_message_bytes),
                cfg.http_listen,
                tls=ssl_context(
                    cfg.tls, require_client_cert=cfg.tls is not None and cfg.tls.ca is not None
                ),
                what=f"node {cfg.node_id}: ",
            )
            await self.rest.start()
        self.agent = Agent(
            node_id=cfg.node_id,
            labels=cfg.labels,
            direct_address=self.direct_address,
            seeds=cfg.control_planes,
            copies=self.copies,
            handler=self.handler,
            max_message_bytes=cfg.max_message_bytes,
            memory_bytes=cfg.memory_bytes,
            keepalive_ms=cfg.keepalive_ms,
            telemetry_max_bytes_per_s=cfg.telemetry_max_bytes_per_s,
            telemetry_buffer_bytes=cfg.telemetry_buffer_bytes,
            telemetry_log_s=cfg.telemetry_log_s,
            telemetry_heartbeat_s=cfg.telemetry_heartbeat_s,
            tls=cfg.tls,
            join_token=cfg.join_token,
            insecure_join=cfg.insecure_join,
            rights=self.rights,
        )
        self.agent.start()
        self._flusher = asyncio.create_task(self._flush_log(), name="prediction log flush")
        _log.info("node %s dialling %s", cfg.node_id, ", ".join(cfg.control_planes))

    async def _flush_log(self, interval_s: float = 1.0) -> None:
        """Logged predictions reach the file within about ``interval_s``."""
        while True:
            await asyncio.sleep(interval_s)
            self.prediction_log.flush()

    async def drain(self, timeout_s: float | None = None) -> None:
        """Leave gracefully (SIGTERM): tell the control plane this node is going, so it moves the
        copies elsewhere (the new ones warm before these are unloaded, see the hub) while this
        node keeps answering; return once no copy is left, no replica is linked (nobody to hand
        over to), or ``timeout_s`` (default: the config's) has passed; then wait (bounded) for
        the queries in flight. :meth:`stop` follows (deregisters: the streams end)."""
        if self.health is not None:  # probes see NOT_SERVING while the copies move
            await self.health.shutdown()
        if self.agent is None:
            return
        timeout = self.config.drain_timeout_s if timeout_s is None else timeout_s
        started = time.monotonic()
        self.agent.drain(timeout)
        _log.info(
            "node %s draining: waiting up to %.0f s for its copies to move",
            self.config.node_id,
            timeout,
        )
        while time.monotonic() - started < timeout:
            held = [e for e in self.copies.entries() if e.state == mesh_pb2.READY]
            if not held or not self.agent.connected_replicas():
                break
            await asyncio.sleep(0.1)
        left = [
            f"{e.model}/{e.variant}" for e in self.copies.entries() if e.state == mesh_pb2.READY
        ]
        flight_s = min(10.0, self.config.shutdown_grace_s / 2)  # the rest is for stop()
        for _ in range(int(flight_s * 10)):  # in-flight queries finish
            if not any(e.in_flight for e in self.copies.entries()):
                break
            await asyncio.sleep(0.1)
        _log.info(
            "node %s drained in %.1f s%s",
            self.config.node_id,
            time.monotonic() - started,
            f" (still held, not moved: {', '.join(left)})" if left else "",
        )

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.health is not None:
            await self.health.shutdown()
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self.agent is not None:
            await self.agent.close()
        if self.rest is not None:
            try:
                await asyncio.wait_for(self.rest.stop(), grace_s + 1.0)
            except TimeoutError:
                _log.error("node %s: the REST server's stop overran", self.config.node_id)
        if self._server is not None:
            await self._server.stop(grace_s)
        await self.copies.close()
        self.prediction_log.close()
        await asyncio.to_thread(self._executor.shutdown, True)
