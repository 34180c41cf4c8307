"""A control-plane replica: composes etcd mirrors, hub, gateway, admin API and the leader loop.

Composition only: every part is built in its room (the node link in ``link/``, the query path in
``dataplane/``, the leader and the policy in force in ``placement/``, events, alarms and telemetry
readers in ``observe/``) and wired here; this module holds the lifecycle, in one place:
:meth:`ControlPlane.start` → serve → :meth:`ControlPlane.stop`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from grpc import aio

from meshserve.common.errors import Unavailable, map_errors, tolerant_decoding
from meshserve.common.health import (
    ADMIN,
    DRAIN_S,
    INFERENCE,
    NODE_LINK,
    ROUTING_FEED,
    Health,
    add_standard_services,
)
from meshserve.common.rest_server import RestHandlers, RestServer, build_app, ssl_context
from meshserve.common.security import (
    TLSFiles,
    channel_credentials,
    load_cas,
    server_credentials,
)
from meshserve.controlplane import keys
from meshserve.controlplane.admin import AdminService
from meshserve.controlplane.auth import AuthConfig, Guard
from meshserve.controlplane.dataplane.admission import Admission
from meshserve.controlplane.dataplane.feed import FeedPublisher, FeedService
from meshserve.controlplane.dataplane.gateway import Gateway, add_gateway_to_server
from meshserve.controlplane.etcd import Election, EtcdAuth, PrefixMirror, connect
from meshserve.controlplane.etcd.guard import StoreGuard
from meshserve.controlplane.link.hub import Hub
from meshserve.controlplane.link.options import node_channel_options, server_options
from meshserve.controlplane.link.presence import Presence, replica_list
from meshserve.controlplane.observe.alarms import Alarms
from meshserve.controlplane.observe.events import EventLog
from meshserve.controlplane.observe.telemetry import live_in_flight
from meshserve.controlplane.observe.ui.server import UiServer, UiSources
from meshserve.controlplane.observe.webhook import Webhook
from meshserve.controlplane.placement.explain import explain_placement
from meshserve.controlplane.placement.failures import DEFAULT_RETRY, RetryPolicy
from meshserve.controlplane.placement.leader import LeaderLoop
from meshserve.controlplane.placement.policy_source import PolicySource
from meshserve.controlplane.registry import EtcdRegistry, Registry
from meshserve.controlplane.snapshot import Snapshot, SnapshotBuilder, VariantKey
from meshserve.protos import inference_pb2, mesh_pb2, mesh_pb2_grpc

__all__ = ["ControlPlane", "ControlPlaneConfig"]

_log = logging.getLogger("meshserve.controlplane")


#: The least time a shutdown step is given, however late the sequence runs.
_STEP_FLOOR_S = 0.2

#: What a replica without etcd reports NOT_SERVING (grpc.health.v1): itself as a whole, Admin
#: (writes fail) and NodeLink (node records cannot be written). Inference and the routing feed
#: go on from the last view, so a probe of ``inference.GRPCInferenceService`` stays SERVING.
_NEEDS_ETCD = ("", ADMIN, NODE_LINK)


def _node_known(nodes: Mapping[str, object], key: tuple[str, str, str]) -> bool:
    return key[0] in nodes


def default_replica_id() -> str:
    return f"cp-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class ControlPlaneConfig:
    etcd_url: str  # one etcd URL or several, comma-separated (controlplane/etcd/link.py)
    etcd_auth: EtcdAuth | None = None  # TLS files, user and password for etcd (None: plain)
    listen: str = "127.0.0.1:8001"
    advertise: str | None = None
    replica_id: str = field(default_factory=default_replica_id)
    lease_ttl_s: int = 5
    max_message_bytes: int = 64 << 20
    telemetry_interval_ms: int = 2000
    keepalive_ms: int = 10_000
    etcd_wait_s: float = 30.0  # keep retrying etcd at start this long
    admissions_per_s: float = 200.0  # new node streams admitted per second
    zone: str = ""  # this gateway's zone: preferred for queries that name none ("": none)
    # the listener's certificate (+ CA: its callers, and nodes' direct ports unless node_ca)
    tls: TLSFiles | None = None
    require_client_cert: bool = True  # with tls and a CA: mTLS for every caller, node ids checked
    auth: AuthConfig = field(default_factory=AuthConfig)  # join tokens, admin token, API keys
    max_in_flight_per_copy: int = 128  # gateway admission per model: x ready copies (0: off)
    max_in_flight_per_client: int = 1024  # gateway admission per client (0: off)
    shutdown_grace_s: float = 10.0  # SIGTERM -> exit, whatever etcd does (docs/resilience.md)
    unload_confirm_s: float = 600.0  # the safety floor holds a mass unload back this long
    etcd_keep_revisions: int = 10_000  # the leader compacts etcd, keeping this much history
    retry: RetryPolicy = DEFAULT_RETRY  # backoff before a node where a copy failed is tried again
    # placement matches the labels nodes claim in their Hello too, not only admin-side ones
    # (`meshctl nodes label`): for a local mesh whose nodes are all yours (docs/security.md)
    trust_node_labels: bool = False
    http_listen: str = ""  # OIP over HTTP/REST on this HOST:PORT ("": off; common/rest_server)
    ui_listen: str = ""  # the live map on this HOST:PORT ("": off; observe/ui, docs/ui.md)


class ControlPlane:
    def __init__(self, config: ControlPlaneConfig) -> None:
        self.config = config
        self.replica_id = config.replica_id
        self.address = ""
        self._etcd: Any = None
        self.registry: Registry | None = None  # every etcd write (set by start)
        self._presence: Presence | None = None  # this replica's lease and record (set by start)
        self._mirrors: dict[str, PrefixMirror] = {}
        self._snapshot: Snapshot | None = None
        self._builder = SnapshotBuilder()
        self._links_seen = self._labels_seen = -1  # mirror journal cursors (changes_since)
        self._change_pending = False  # a rebuild is scheduled (see _changed)
        self._server: aio.Server | None = None
        self.health: Health | None = None  # grpc.health.v1 on the listener (set by start)
        self._tasks: list[asyncio.Task[None]] = []
        self.hub: Hub | None = None
        self.gateway: Gateway | None = None
        self.rest: RestServer | None = None  # OIP over HTTP/REST (set by start with http_listen)
        self.ui: UiServer | None = None  # the live map (set by start with ui_listen)
        self.feed: FeedPublisher | None = None  # the routing feed (set by start)
        self.leader: LeaderLoop | None = None
        self.events: EventLog | None = None
        self.policy = PolicySource(lambda: self._mirrors[keys.POLICY])  # read after start
        self.alarms = Alarms(
            monitoring=lambda: self.policy.current().spec.monitoring,
            models=lambda: self.snapshot().models,
            telemetry=self._telemetry,
            is_leader=self._is_leader,
            events=lambda: self.events,
            registry=lambda: self.registry,
            episodes=self._alarm_episodes,
            replica_id=self.replica_id,
            # a new leader judges accuracy once the nodes had time to link and report to it
            grace_s=config.lease_ttl_s + 3 * config.telemetry_interval_ms / 1000,
        )
        self.webhook = Webhook(lambda: self.policy.current().spec.monitoring.webhook)
        self.store = StoreGuard(  # the store's identity and history (a maintenance step)
            status=lambda: self._registry().store_status(),
            compact=lambda revision: self._registry().compact(revision),
            mirrors=lambda: list(self._mirrors.values()),
            is_leader=self._is_leader,
            alarm=partial(self._alarm, "etcd_data_lost"),
            keep=config.etcd_keep_revisions,
            store_id=lambda candidate: self._registry().ensure_store_id(candidate),
        )

    # -- the view ----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            m = self._mirrors
            self._links_seen, links = m[keys.NODES].changes_since(self._links_seen)
            self._labels_seen, labels = m[keys.NODE_LABELS].changes_since(self._labels_seen)
            try:
                self._snapshot = self._builder.build(
                    m[keys.MODELS].items(),
                    m[keys.PLACEMENTS].items(),
                    m[keys.NODES].items(),
                    placement_revisions=m[keys.PLACEMENTS].mod_revisions(),
                    placements_revision=m[keys.PLACEMENTS].revision,
                    draining=m[keys.DRAINING].items(),
                    wake=m[keys.WAKE].items(),
                    aliases=m[keys.ALIASES].items(),
                    node_labels=m[keys.NODE_LABELS].items(),
                    trust_node_labels=self.config.trust_node_labels,
                    changed=None if links is None or labels is None else links | labels,
                )
            except BaseException:  # the changes were not taken in: the next build reads all
                self._links_seen = self._labels_seen = -1
                raise
        return self._snapshot

    def _telemetry(self) -> dict[str, mesh_pb2.Telemetry]:
        """The latest telemetry of every node streaming here, by node id (a copy)."""
        sessions = {} if self.hub is None else self.hub.sessions
        return {node_id: s.telemetry for node_id, s in list(sessions.items())}

    def _alarm_episodes(self) -> tuple[int, Mapping[str, bytes]] | None:
        mirror = self._mirrors.get(keys.ALARMS)
        return None if mirror is None else (mirror.revision, mirror.items())

    def _registry(self) -> Registry:
        assert self.registry is not None, "ControlPlane.start() was not awaited"
        return self.registry

    def _is_leader(self) -> bool:
        election = self.leader.election if self.leader is not None else None
        return election is not None and election.is_leader

    def _changed(self) -> None:
        """A mirror changed: the view is rebuilt and acted on once per turn of the event loop,
        however many mirrors notified in it (one rebuild of a 10,000-node view, not one each)."""
        self._snapshot = None
        if not self._change_pending:
            self._change_pending = True
            asyncio.get_running_loop().call_soon(self._act_on_change)

    def _act_on_change(self) -> None:
        self._change_pending = False
        try:
            if self.leader is not None:
                self.leader.wake()
            if self.hub is not None:
                self.hub.reconcile(self.snapshot())
            if self.gateway is not None:
                self.gateway.notify()
            if self.feed is not None:
                self.feed.notify()
        except Exception:
            _log.exception("acting on a change of the view failed; the next change retries")

    async def _wake(self, key: VariantKey, on: bool) -> None:
        """Ask the leader for a copy of a scaled-to-zero variant (``on``), or withdraw it. The key
        lives under this replica's lease: it cannot outlive the replica."""
        assert self.registry is not None and self._presence is not None
        if on:
            await self.registry.wake(key, self._presence.lease_id)
        else:
            await self.registry.unwake(key)

    @staticmethod
    async def _connect_etcd(url: str, wait_s: float, auth: EtcdAuth | None = None) -> Any:
        """Connect to etcd, retrying with backoff for up to ``wait_s`` (a replica may start
        before etcd is ready to serve); then the last error propagates."""
        deadline = time.monotonic() + wait_s
        delay = 0.2
        while True:
            try:
                return await connect(url, auth=auth)
            except ConnectionError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                _log.warning("etcd at %s not reachable yet (%s); retrying", url, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _unload_confirmation(self) -> bytes:
        """The operator's latest unload confirmation (``keys.UNLOAD_CONFIRM``; b"" absent)."""
        mirror = self._mirrors.get(keys.UNLOAD_CONFIRM)
        value = None if mirror is None else mirror.items().get(keys.UNLOAD_CONFIRM)
        return b"" if value is None else bytes(value)

    def _unload_confirmed(self) -> None:
        if self.hub is not None:
            self.hub.confirm_unloads(self._unload_confirmation())

    def _alarm(self, kind: str, text: str) -> None:
        """An alarm about the store or the view: an event (webhook, ``meshctl events``)."""
        if self.events is not None:
            self.events.record(kind, message=text)

    async def _maintain(self, interval_s: float = 2.0) -> None:
        """Keep this replica's lease (renew it if lost: re-register, rewrite every node record,
        the leader loop re-campaigns on its own) and sweep node records no stream backs."""
        assert self._presence is not None
        presence = self._presence
        while True:
            await asyncio.sleep(interval_s)
            try:  # the store itself first: a replaced store is reloaded before anything acts
                await self.store.step()
                reachable = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reachable = False
                _log.warning("store check failed: %r", exc)
            if self.health is not None:  # no etcd: this replica neither admits nor links
                await self.health.set(reachable, _NEEDS_ETCD)
            try:
                if await presence.renew_if_lost() and self.hub is not None:
                    self.hub.rewrite_all()
                if self.hub is not None:
                    await self.hub.sweep(self._mirrors[keys.NODES].mod_revisions())
                    self.hub.reconcile(self.snapshot())  # decisions that waited on a grace
                self.alarms.check_accuracy()
                if self.gateway is not None:
                    known = partial(_node_known, self.snapshot().nodes)
                    self.gateway.forget(known)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("maintenance pass failed: %r", exc)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self._etcd = await self._connect_etcd(cfg.etcd_url, cfg.etcd_wait_s, cfg.etcd_auth)
        self.registry = registry = EtcdRegistry(self._etcd)
        options = server_options(cfg.max_message_bytes, cfg.keepalive_ms)
        self._server = aio.server(options=options)
        mtls = cfg.tls is not None and cfg.tls.ca is not None and cfg.require_client_cert
        if cfg.tls is None:
            port = self._server.add_insecure_port(cfg.listen)
        else:
            creds = server_credentials(cfg.tls, require_client_cert=mtls)
            port = self._server.add_secure_port(cfg.listen, creds)
        node_ca = cfg.tls.for_nodes().ca_bytes() if cfg.tls and cfg.tls.node_ca else None
        guard = Guard(cfg.auth, verify_node_identity=mtls, node_cas=load_cas(node_ca))
        host = cfg.listen.rsplit(":", 1)[0]
        self.address = cfg.advertise or f"{host}:{port}"

        self._presence = presence = Presence(
            etcd=self._etcd,
            registry=registry,
            replica_id=self.replica_id,
            lease_ttl_s=cfg.lease_ttl_s,
        )
        await presence.open(self.address)
        prefixes = (
            keys.MODELS,
            keys.PLACEMENTS,
            keys.NODES,
            keys.REPLICAS,
            keys.DRAINING,
            keys.POLICY,
            keys.WAKE,
            keys.ALIASES,
            keys.NODE_LABELS,
        )
        for prefix in prefixes:
            mirror = PrefixMirror(self._etcd, prefix)
            await mirror.start()
            mirror.subscribe(self._changed)
            self._mirrors[prefix] = mirror
        try:  # the store's id and identity before any command is sent (then every 2 s)
            await self.store.step()
        except Exception as exc:
            _log.warning("store check failed: %r", exc)
        self._mirrors[keys.ALARMS] = alarms = PrefixMirror(self._etcd, keys.ALARMS)
        await alarms.start()  # open alarm episodes: read by self.alarms, not by the snapshot
        # the operator's unload confirmations: read by the hub's safety floor (link/floor.py)
        self._mirrors[keys.UNLOAD_CONFIRM] = confirms = PrefixMirror(
            self._etcd, keys.UNLOAD_CONFIRM
        )
        await confirms.start()

        self.hub = Hub(
            registry=registry,
            replica_id=self.replica_id,
            lease_ttl_s=cfg.lease_ttl_s,
            lease_id=lambda: presence.lease_id,
            snapshot=self.snapshot,
            replicas=lambda: replica_list(self._mirrors[keys.REPLICAS].items()),
            telemetry_interval_ms=cfg.telemetry_interval_ms,
            admissions_per_s=cfg.admissions_per_s,
            on_telemetry=self.alarms.on_telemetry,
            identify=guard.identify_node,
            max_message_bytes=cfg.max_message_bytes,
            on_alarm=partial(self._alarm, "unload_floor"),
            unload_confirm_s=cfg.unload_confirm_s,
            store_id=lambda: self.store.store_id,
            rights=guard.tenant_rights,
        )
        self.hub.confirm_unloads(self._unload_confirmation())  # the one seen before any episode
        confirms.subscribe(self._unload_confirmed)
        self.events = EventLog(registry, self.replica_id)
        self.events.start()
        self.events.subscribe(self.webhook.offer)
        self.webhook.start()
        self.alarms.watch()
        hub = self.hub

        def telemetry(node_id: str, key: VariantKey) -> mesh_pb2.ModelTelemetry | None:
            session = hub.sessions.get(node_id)
            return None if session is None else session.copy_telemetry(key)

        async def tunnel(
            node_id: str,
            request: inference_pb2.ModelInferRequest,
            timeout: float | None,
            trace_context: dict[str, str],
        ) -> inference_pb2.ModelInferResponse:
            session = hub.sessions.get(node_id)
            if session is None:
                raise Unavailable(f"node {node_id} is not linked to this replica")
            return await session.tunnel(request, timeout, trace_context)

        self.gateway = Gateway(
            snapshot=self.snapshot,
            channel_options=node_channel_options(cfg.max_message_bytes, cfg.keepalive_ms),
            ready=lambda: True,
            linked=hub.sessions,
            telemetry=telemetry,
            tunnel=tunnel,
            events=self.events,
            wake=self._wake,
            zone=cfg.zone,
            node_credentials=channel_credentials(cfg.tls.for_nodes())
            if cfg.tls and cfg.tls.ca
            else None,
            node_metadata=guard.router_metadata,
            stream_check=guard.stream_check,
            tenant_of=guard.tenant_name,
            admission=Admission(
                per_copy=cfg.max_in_flight_per_copy, per_client=cfg.max_in_flight_per_client
            ),
            # direct queries over multiplexed streams; MESHSERVE_GATEWAY_MUX=0: unary calls
            mux=os.environ.get("MESHSERVE_GATEWAY_MUX", "1") != "0",
            max_message_bytes=cfg.max_message_bytes,
        )
        mesh_pb2_grpc.add_NodeLinkServicer_to_server(
            map_errors(guard.node_link(self.hub)), tolerant_decoding(self._server)
        )
        mesh_pb2_grpc.add_AdminServicer_to_server(
            map_errors(
                guard.admin(
                    AdminService(
                        registry=registry,
                        snapshot=self.snapshot,
                        hub=self.hub,
                        policy=self.policy.current,
                        events=self.events,
                        live_load=self.gateway.live_load,
                        health=self.alarms.health,
                    )
                )
            ),
            tolerant_decoding(self._server),
        )
        add_gateway_to_server(  # ModelInfer passes the request's and the answer's bytes through
            map_errors(guard.inference(self.gateway)), tolerant_decoding(self._server)
        )
        self.feed = self._routing_feed(self.hub)
        mesh_pb2_grpc.add_RoutingFeedServicer_to_server(
            map_errors(FeedService(self.feed, guard.feed_filter)), tolerant_decoding(self._server)
        )
        self.feed.start()
        self.health = await add_standard_services(
            self._server, (INFERENCE, ADMIN, NODE_LINK, ROUTING_FEED)
        )
        await self._server.start()
        if cfg.http_listen:  # the same handlers as gRPC's ModelInfer & co, auth included
            self.rest = RestServer(
                build_app(RestHandlers.of(self.gateway), max_body_bytes=cfg.max_message_bytes),
                cfg.http_listen,
                tls=ssl_context(cfg.tls, require_client_cert=mtls),
                what=f"replica {self.replica_id}: ",
            )
            await self.rest.start()
        if cfg.ui_listen:
            await self._start_ui(cfg, presence)

        hub = self.hub
        self.leader = LeaderLoop(
            registry=registry,
            election=lambda: Election(self._etcd, presence.session, keys.LEADER, self.replica_id),
            replica_id=self.replica_id,
            snapshot=self.snapshot,
            policy=self.policy.current,
            in_flight=lambda: live_in_flight(hub.flying),
            events=self.events,
            retry=self.config.retry,
        )
        self._tasks.append(asyncio.create_task(self.leader.run(), name="leader"))
        self._tasks.append(asyncio.create_task(self._maintain(), name="maintain"))
        _log.info(
            "control-plane replica %s serving on %s (etcd %s)",
            self.replica_id,
            self.address,
            cfg.etcd_url,
        )

    async def _start_ui(self, cfg: ControlPlaneConfig, presence: Presence) -> None:
        """The live map (observe/ui): this replica's own view, with two more mirrors (the
        event ring and the leader key) so that no page reads etcd."""
        assert self.hub is not None and self.gateway is not None
        for prefix in (keys.EVENTS, keys.LEADER):
            mirror = PrefixMirror(self._etcd, prefix)
            await mirror.start()
            self._mirrors[prefix] = mirror
        m = self._mirrors
        gateway, address = self.gateway, self.address

        def leader() -> str:
            value = m[keys.LEADER].items().get(keys.LEADER)
            return value.decode(errors="replace") if value else ""

        sources = UiSources(
            snapshot=self.snapshot,
            sessions=self.hub.sessions,
            replica=lambda: mesh_pb2.ReplicaInfo(replica_id=self.replica_id, address=address),
            replicas=lambda: replica_list(m[keys.REPLICAS].items()),
            leader=leader,
            episodes=self.alarms.episodes,
            slo_counts=lambda: {k: (v[0], v[1]) for k, v in gateway.slo_counts.items()},
            events=lambda: m[keys.EVENTS].items(),
            explain=lambda model, variant: explain_placement(
                self.snapshot(), self.policy.current(), model, variant
            ),
            subscribe=[
                m[prefix].subscribe
                for prefix in (
                    keys.NODES,
                    keys.MODELS,
                    keys.PLACEMENTS,
                    keys.ALIASES,
                    keys.DRAINING,
                    keys.EVENTS,
                    keys.LEADER,
                    keys.REPLICAS,
                )
            ],
        )
        tokens = [t for t in (cfg.auth.admin_token, cfg.auth.viewer_token) if t]
        self.ui = UiServer(
            sources,
            cfg.ui_listen,
            tokens=tokens,
            tls=ssl_context(cfg.tls, require_client_cert=False),
        )
        await self.ui.start()

    def _routing_feed(self, hub: Hub) -> FeedPublisher:
        """The routing feed this replica publishes: its view, and live load as its node
        streams report it."""

        def load(node_id: str, key: VariantKey) -> mesh_pb2.ModelTelemetry | None:
            session = hub.sessions.get(node_id)
            return None if session is None else session.copy_telemetry(key)

        return FeedPublisher(
            snapshot=self.snapshot,
            load=load,
            replicas=lambda: replica_list(self._mirrors[keys.REPLICAS].items()),
            replica_id=self.replica_id,
        )

    async def stop(self, grace_s: float = 3.0) -> None:
        """Stop in order within ``config.shutdown_grace_s`` whatever etcd does: leader loop →
        resign → server (calls in flight get ``grace_s``; streams end, node records are deleted
        or left to the lease) → gateway channels → events → mirrors → own lease → etcd client.

        Every step is bounded by its own budget and by what is left of the one deadline (each
        later step keeps a floor of :data:`_STEP_FLOOR_S`); a step that overruns is logged by
        name and abandoned, so the sequence always ends in time. With etcd unreachable the
        steps that need it (resign, record deletes, revoke) fail or run out fast; what they
        would have removed expires with this replica's lease."""

        async def leader_loop() -> None:
            if self.health is not None:  # probes see NOT_SERVING while the rest stops
                await self.health.shutdown()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        async def resign() -> None:
            election = self.leader.election if self.leader is not None else None
            if election is not None and election.is_leader:
                await election.resign()

        async def server() -> None:
            if self.ui is not None:  # its streams end at once
                await self.ui.stop()
            if self.rest is not None:  # REST calls in flight get about a second
                await self.rest.stop()
            if self.feed is not None:  # its streams end first: the server need not wait on them
                await self.feed.close(timeout_s=min(1.0, grace_s))
            if self.health is not None:  # clients balancing on our health have moved away
                await self.health.drain(min(DRAIN_S, grace_s))
            if self._server is not None:
                await self._server.stop(grace_s)
            if self.hub is not None:
                await self.hub.close(timeout_s=1.0)

        async def gateway() -> None:
            if self.gateway is not None:
                await self.gateway.close()

        async def events() -> None:
            await self.webhook.close()
            if self.events is not None:
                await self.events.close()

        async def mirrors() -> None:
            await asyncio.gather(*(m.close() for m in self._mirrors.values()))

        async def session() -> None:
            if self._presence is not None:
                await self._presence.close()

        async def etcd() -> None:
            if self._etcd is not None:
                await self._etcd.close()

        budgets = {  # each step's own bound, seconds (etcd calls are cut short by the deadline)
            leader_loop: 2.5,
            resign: 1.5,
            server: grace_s + 1.5 + min(DRAIN_S, grace_s),
            gateway: 1.0,
            events: 1.5,
            mirrors: 1.0,
            session: 1.5,
            etcd: 1.0,
        }
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace_s
        steps = list(budgets)
        for index, step in enumerate(steps):
            later = len(steps) - index - 1
            left = deadline - loop.time() - later * _STEP_FLOOR_S
            budget = max(_STEP_FLOOR_S, min(budgets[step], left))
            try:
                await asyncio.wait_for(step(), budget)
            except TimeoutError:
                _log.error("shutdown step %r overran %.1fs; skipped", step.__name__, budget)
            except Exception as exc:
                _log.warning("shutdown step %r failed: %r", step.__name__, exc)
