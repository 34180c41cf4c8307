"""Session hub: the control-plane side of every node's NodeLink stream.

It composes the link room: :mod:`~meshserve.controlplane.link.handshake` (Hello -> checks ->
Welcome, admission), :mod:`~meshserve.controlplane.link.session` (one node's stream: send queue,
telemetry, tunneled queries) and :mod:`~meshserve.controlplane.link.reconcile` (the pure Load /
Unload decision); the hub owns the stream loop and the node's link record.

Contract:
- A node's link record (``nodes/<node>/<replica>``) exists exactly while the stream is alive:
  it is written when the Hello is accepted and deleted (retried until etcd confirms) when the
  stream ends, always through the registry. It is attached to this replica's own lease — one
  lease per replica, not per node, so 10,000 streams cost one keep-alive — and so expires within
  the TTL if the replica dies. A sweeper deletes any record of this replica that no live stream
  backs (e.g. after etcd was unreachable when a stream ended).
  The record is rewritten only when what it says changed (:func:`link_record`: a copy's state,
  its measurements; not download progress), so a node's reports add etcd revisions only on
  state changes; one writer per replica batches the records that changed at once into one
  transaction (:mod:`~meshserve.controlplane.link.records`).
- A message that does not decode is dropped; the stream lives. So does a Telemetry that the
  ``on_telemetry`` handler fails on (logged with its traceback): a reset would only bring the same
  node back with the same figures.
- :meth:`Hub.reconcile` sends the commands :func:`~meshserve.controlplane.link.reconcile.reconcile`
  decides for each node; commands are idempotent on the node, so resending is harmless. It is
  incremental (:mod:`~meshserve.controlplane.link.scope`): a view change decides only the nodes
  it concerns and those owed a decision, and every ``full_pass_s`` seconds (and when the
  operator confirms unloads) every linked node is decided again, a slow safety net. The unload
  safety floor still judges the whole of each change: a node not decided would decide no
  Unload (its last decision was sent in full), so the Unloads of the nodes decided are the
  Unloads a full pass would decide.
- Every linked node knows the live replica set: its Welcome carries the set at link time, and
  :meth:`Hub.push_replicas` (run by every :meth:`Hub.reconcile`: each change of any mirror,
  the replicas' included, and each maintenance pass) sends a ReplicaSet to every node that was
  told another set, so a replica started later is dialled within seconds and a removed one is
  dropped. An empty set (a view not loaded yet) is never pushed; a set that did not fit a
  node's queue is pushed again at the next reconcile.
- A node is trusted to compute, not to describe itself (:mod:`~meshserve.controlplane.link.trust`):
  its Hello copies count only for registered variants with their sha256; a CopyStatus counts only
  for a Load this replica sent on the stream, naming a sha256 it ordered (refusals are counted on
  the session and logged once per reason); telemetry counts only for copies it is believed to
  hold and within its byte budget here (``telemetry_bytes_per_s``). The labels placement matches
  are not taken from here at all (:mod:`~meshserve.controlplane.snapshot`: admin-side labels).
- Reports are cheap: a CopyStatus schedules one reconcile of its node, and reports that arrive
  while one is scheduled join it (at most one pending per node).
- Right after the Welcome every node gets the tenant rights (``TenantRights``: API key digests
  and the models each may query), which it enforces on its direct port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from functools import partial
from typing import Any

from meshserve.common.errors import EOF, Malformed, ResourceExhausted, ServicerContext
from meshserve.common.tunneling import take_frames
from meshserve.controlplane import keys
from meshserve.controlplane.link.embedded import reconcile_embedded
from meshserve.controlplane.link.floor import UnloadFloor
from meshserve.controlplane.link.handshake import (
    Handshake,
    TokenBucket,
    replica_set,
    replicas_changed,
    welcome,
)
from meshserve.controlplane.link.reconcile import (
    ADOPTION_GRACE_S,
    Decision,
    Load,
    Settled,
    Unload,
    reconcile,
    spec_digest,
)
from meshserve.controlplane.link.records import RecordWriter, link_record
from meshserve.controlplane.link.scope import FULL_PASS_S, ReconcileScope
from meshserve.controlplane.link.session import NodeSession, ReplicaSet
from meshserve.controlplane.link.trust import DEFAULT_TELEMETRY_BYTES_PER_S
from meshserve.controlplane.observe.metrics import controlplane_metrics
from meshserve.controlplane.registry import Registry
from meshserve.controlplane.snapshot import Snapshot, VariantKey
from meshserve.protos import mesh_pb2, mesh_pb2_grpc

# NodeSession, TokenBucket, link_record: re-exported
__all__ = ["Hub", "NodeSession", "TokenBucket", "link_record"]

_log = logging.getLogger("meshserve.controlplane.hub")

CLEANUP_WAIT_S = 30.0  # an ended stream's cleanup waits this long for its record's delete


class Hub(mesh_pb2_grpc.NodeLinkServicer):
    """The NodeLink servicer of one control-plane replica (see the module contract)."""

    def __init__(
        self,
        *,
        registry: Registry,
        replica_id: str,
        lease_ttl_s: int,
        lease_id: Callable[[], int],
        snapshot: Callable[[], Snapshot],
        replicas: Callable[[], list[mesh_pb2.ReplicaInfo]],
        telemetry_interval_ms: int = 2000,
        outbox_size: int = 4096,
        max_message_bytes: int = 64 << 20,
        hello_timeout_s: float = 10.0,
        admissions_per_s: float = 200.0,
        on_telemetry: Callable[[str, mesh_pb2.Telemetry], None] | None = None,
        identify: Callable[[ServicerContext, str], None] | None = None,
        on_alarm: Callable[[str], None] | None = None,
        unload_confirm_s: float = 600.0,
        store_id: Callable[[], str] = str,
        rights: Callable[[], mesh_pb2.TenantRights] = lambda: mesh_pb2.TenantRights(enforce=False),
        telemetry_bytes_per_s: int = DEFAULT_TELEMETRY_BYTES_PER_S,
        full_pass_s: float = FULL_PASS_S,
    ) -> None:
        """``on_telemetry``: called after every Telemetry a node sends, with the node's merged
        latest telemetry (``NodeSession.telemetry``; its drift windows are those of that
        message).
        ``on_alarm``: called with the text of a mass unload the safety floor holds back for
        ``unload_confirm_s`` seconds (see :mod:`~meshserve.controlplane.link.reconcile`).
        ``store_id``: the id of the store placement revisions count in ("" unknown).
        ``identify``: checks that the caller may claim the Hello's node id (raising the status
        that refuses the stream; :meth:`meshserve.controlplane.auth.Guard.identify_node`); None:
        trusted. ``rights``: the tenant rights every node enforces on its direct port, sent down
        each stream right after the Welcome (``Guard.tenant_rights``).
        ``telemetry_bytes_per_s``: each node's telemetry budget here (the excess is dropped).
        ``full_pass_s``: how often :meth:`reconcile` decides every linked node, not only those
        a change concerns (the safety net)."""
        self._telemetry_bytes_per_s = telemetry_bytes_per_s
        self._registry = registry
        self._rights = rights
        self._on_telemetry = on_telemetry
        self._digests: dict[VariantKey, tuple[mesh_pb2.ModelSpec, str]] = {}
        self.replica_id = replica_id
        self._ttl = lease_ttl_s
        self._lease_id = lease_id
        self._snapshot = snapshot
        self._replicas = replicas
        self._telemetry_interval_ms = telemetry_interval_ms
        self._outbox_size = outbox_size
        self._max_message_bytes = max_message_bytes
        self.handshake = Handshake(
            replica_id=replica_id,
            hello_timeout_s=hello_timeout_s,
            admissions_per_s=admissions_per_s,
            identify=identify,
        )
        self.sessions: dict[str, NodeSession] = {}
        self._members: set[str] = set()  # the linked embedded members (decided every pass)
        # the streams whose node has queries in flight (live demand: a scheduling pass reads
        # these, not 10,000 sessions)
        self.flying: dict[str, NodeSession] = {}
        self._cleanups: dict[str, asyncio.Future[None]] = {}
        self._background: set[asyncio.Future[None]] = set()
        self.floor = UnloadFloor(unload_confirm_s, on_alarm)  # mass unloads wait (floor.py)
        self.scope = ReconcileScope(full_pass_s)  # which nodes a pass decides (scope.py)
        self._told_all: ReplicaSet | None = None  # every linked node was told this set
        self._store_id = store_id  # stamped on every Load/Unload (see LoadModel.store_id)
        # the link records, written on change in batches (records.py)
        self.records = RecordWriter(registry, replica_id, lease_id, self.sessions)
        controlplane_metrics().watch_streams(self)

    # -- the stream --------------------------------------------------------------------------

    async def Connect(
        self, request_iterator: AsyncIterator[mesh_pb2.NodeMessage], context: ServicerContext
    ) -> None:  # type: ignore[override]
        hello = await self.handshake.accept(context, self.sessions)
        if hello is None:
            return
        session = NodeSession(
            hello,
            self.replica_id,
            self._outbox_size,
            self._max_message_bytes,
            telemetry_bytes_per_s=self._telemetry_bytes_per_s,
        )
        session.adopt(self._snapshot())  # what the Hello says it holds: only as ordered
        self.sessions[hello.node_id] = session
        if session.embedded:
            self._members.add(hello.node_id)
        self.scope.owe(hello.node_id)  # decided by the next pass, whatever changed
        if hello.node_id in self._snapshot().draining:  # back from a shutdown drain: clear it
            self._spawn(self._mark_draining(hello.node_id, False))
        try:
            previous = self._cleanups.get(hello.node_id)
            if previous is not None:  # the node's last stream is still deleting its record
                await asyncio.shield(previous)
            await self.records.write_now(session)
            replicas = self._replicas()
            session.replicas_said = replica_set(replicas)
            if session.replicas_said != self._told_all:
                self._told_all = None  # the next push looks at every node
            await context.write(
                welcome(
                    replica_id=self.replica_id,
                    replicas=replicas,
                    lease_ttl_s=self._ttl,
                    telemetry_interval_ms=self._telemetry_interval_ms,
                )
            )
            await context.write(mesh_pb2.ControlMessage(tenants=self._rights()))
            _log.info(
                "node %s linked (direct=%s, claimed labels=%s)",
                session.node_id,
                hello.direct_address or "-",
                dict(hello.labels),
            )
            # a writer task only while messages wait; tunneled queries that waited together go
            # in one message to a node that reads them so (common/tunneling.py)
            merge = None
            if hello.tunnel_batches:
                merge = partial(take_frames, single="infer_request", batch="infer_batch")
            session.outbox.attach(context.write, merge)
            self.reconcile_session(session, self._snapshot())
            while True:
                message = await context.read()
                if message is EOF:
                    break
                if isinstance(message, Malformed):  # did not decode: dropped, the stream lives
                    _log.warning("node %s: %s; ignored", session.node_id, message.reason)
                    continue
                self._on_message(session, message)
        finally:
            session.fail_pending()
            if self.sessions.get(session.node_id) is session:
                del self.sessions[session.node_id]
                self._members.discard(session.node_id)
                self.flying.pop(session.node_id, None)
                self.scope.forget(session.node_id)
            # gRPC may cancel this handler more than once; the cleanup runs in its own task so
            # the record is always deleted whatever happens here.
            cleanup = asyncio.ensure_future(self._cleanup(session))
            self._cleanups[session.node_id] = cleanup
            cleanup.add_done_callback(partial(self._forget_cleanup, session.node_id))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(cleanup)

    def _forget_cleanup(self, node_id: str, done: asyncio.Future[None]) -> None:
        if self._cleanups.get(node_id) is done:
            del self._cleanups[node_id]

    async def _cleanup(self, session: NodeSession) -> None:
        await session.outbox.close()
        self.records.forget(session)
        await self.records.settled(session.node_id)  # no batch writes it back after the delete
        try:  # batched with the other streams that ended (records.py), retried there
            await asyncio.wait_for(self.records.delete(session.node_id), CLEANUP_WAIT_S)
        except TimeoutError:
            _log.warning(
                "node %s record not deleted within %.0f s (etcd away?); still queued, and the "
                "sweeper deletes it otherwise",
                session.node_id,
                CLEANUP_WAIT_S,
            )
        _log.info("node %s unlinked", session.node_id)

    def _on_message(self, session: NodeSession, message: mesh_pb2.NodeMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "infer_response":
            session.resolve(message.infer_response)
        elif kind == "infer_answers":
            for answer in message.infer_answers.frames:
                session.resolve(answer)
        elif kind == "copy_status":
            status = message.copy_status
            refused = session.judge(status)
            if refused is None:
                session.report(status)  # the node acted (or refused): decide afresh
                self.records.mark(session)  # a state change: the record says it
                self._track_flights(session)
            elif self._refuse(session, status, refused):
                _log.warning(
                    "node %s reported %s/%s %s (sha256 %s): %s; not believed (logged once per "
                    "reason and stream)",
                    session.node_id,
                    status.model,
                    status.variant,
                    _state_name(status.state),
                    status.sha256[:12] or "-",
                    refused,
                )
            self._reconcile_soon(session)
        elif kind == "telemetry":
            if not session.telemetry_budget.take(message.ByteSize()):
                controlplane_metrics().refused("telemetry_budget")
                if session.telemetry_budget.dropped == 1:
                    _log.warning(
                        "node %s: telemetry over its budget of %d bytes/s here; excess dropped "
                        "(logged once per stream)",
                        session.node_id,
                        self._telemetry_bytes_per_s,
                    )
                return
            before = session.telemetry_dropped
            session.observe(message.telemetry)  # only entries of copies it holds
            self._track_flights(session)
            controlplane_metrics().refused("telemetry_entry", session.telemetry_dropped - before)
            if session.telemetry_dropped and not before:
                _log.warning(
                    "node %s: telemetry about copies it was not ordered to hold; dropped "
                    "(logged once per stream)",
                    session.node_id,
                )
            if self._on_telemetry is not None:
                try:
                    self._on_telemetry(session.node_id, session.telemetry)
                except Exception:  # a monitor's bug must not cut the node off the mesh
                    _log.exception("node %s: telemetry handler failed", session.node_id)
        elif kind == "hello":
            _log.warning("node %s sent a second Hello; ignored", session.node_id)
        elif kind == "draining" and not session.draining:
            session.draining = True
            self._spawn(self._mark_draining(session.node_id, True))

    @staticmethod
    def _refuse(session: NodeSession, status: mesh_pb2.CopyStatus, reason: str) -> bool:
        """Count a report not believed; True the first time its reason is seen on the stream."""
        controlplane_metrics().refused("copy_status")
        return session.claims.refuse(status, reason)

    def _reconcile_soon(self, session: NodeSession) -> None:
        """Reconcile ``session``'s node once the reports queued now are read (coalesced: at
        most one reconcile pending per node, however many reports arrive)."""
        if session.reconcile_due:
            return
        session.reconcile_due = True
        self.scope.owe(session.node_id)  # a pass before it runs decides the node too
        asyncio.get_running_loop().call_soon(self._reconcile_due, session)

    def _reconcile_due(self, session: NodeSession) -> None:
        session.reconcile_due = False
        if self.sessions.get(session.node_id) is session:
            self.reconcile_session(session, self._snapshot())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _mark_draining(self, node_id: str, on: bool) -> None:
        """A node shutting down drains itself: ``draining/<node>`` = ``keys.SHUTDOWN_DRAIN``
        (under this replica's lease, unless the node is drained already), so the leader moves its
        copies and gateways stop routing to it. Its next Hello (a restart) clears that mark; an
        operator's drain (value "") stays, and is never replaced by a shutdown mark."""
        try:
            if on:
                if await self._registry.mark_shutdown_drain(node_id, self._lease_id()):
                    _log.info("node %s is shutting down: draining it", node_id)
                return
            await self._registry.clear_shutdown_drain(node_id)
        except Exception as exc:
            _log.warning("draining mark of node %s: %r", node_id, exc)

    def _track_flights(self, session: NodeSession) -> None:
        if session.flights and self.sessions.get(session.node_id) is session:
            self.flying[session.node_id] = session
        elif self.flying.get(session.node_id) is session:
            del self.flying[session.node_id]

    def rewrite_all(self) -> None:
        """Rewrite every record (after this replica's lease was renewed), in batches."""
        self.records.rewrite_all(self.sessions)

    async def sweep(self, links: Mapping[str, int]) -> int:
        """Delete this replica's node records that no live stream backs; returns how many.
        ``links``: every link record's key and mod revision (the mirror); a record is deleted
        only if it is still that revision (a stream that came back meanwhile keeps its own)."""
        stale = []
        for key in links:
            node_id, replica_id = keys.split_key(key, keys.NODES)
            if (
                replica_id == self.replica_id
                and node_id not in self.sessions
                and (node_id not in self._cleanups)
            ):
                stale.append(key)
        swept = 0
        for key in stale:
            node_id, _ = keys.split_key(key, keys.NODES)
            revision = links[key]
            if await self._registry.delete_node_record(
                node_id, self.replica_id, mod_revision=revision
            ):
                swept += 1
                _log.warning("swept stale record %s", key)
        return swept

    # -- reconciliation ----------------------------------------------------------------------

    def reconcile(self, snapshot: Snapshot, *, full: bool = False) -> None:
        """Move the linked nodes towards ``snapshot``: those the change since the last call
        concerns and those owed a decision, or all of them (``full``, the first call, and every
        ``full_pass_s``): see the module contract and :mod:`~meshserve.controlplane.link.scope`.
        """
        self.push_replicas()
        nodes = self.scope.plan(snapshot, full=full)
        if nodes is None:
            sessions = list(self.sessions.values())
        else:  # embedded members follow aliases, which the change set does not track
            nodes.update(self._members)
            sessions = [s for n in sorted(nodes) if (s := self.sessions.get(n)) is not None]
        try:
            planned = [(s, self._decide(s, snapshot)) for s in sessions]
            # The nodes not decided here would decide no Unload: the whole change's count.
            unloads = sum(isinstance(d, Unload) for _, decisions in planned for d in decisions)
            self.floor.judge(unloads, self._held)
            for session, decisions in planned:
                self._send(session, decisions)
        except BaseException:  # a pass that failed midway: its nodes stay owed
            for session in sessions:
                self.scope.owe(session.node_id)
            raise

    def _held(self) -> int:
        """How many copies the linked nodes hold (what the safety floor weighs Unloads by)."""
        return sum(len(s.copies) for s in self.sessions.values())

    def confirm_unloads(self, confirmation: bytes) -> int:
        """The operator's unload confirmation as seen now (``keys.UNLOAD_CONFIRM``'s value, b""
        absent): a new one releases the episode the floor holds and the held Unloads are sent at
        once; returns how many it released (0: nothing held, see link/floor.py)."""
        released = self.floor.observe_confirmation(confirmation)
        if released:
            self.reconcile(self._snapshot(), full=True)
        return released

    def unloads_held(self) -> bool:
        """True while the safety floor holds a mass unload back (see link/floor.py)."""
        return self.floor.holding()

    def push_replicas(self) -> int:
        """Tell every linked node that was told another replica set the current one; returns
        how many were told (see the module contract)."""
        replicas = self._replicas()
        current = replica_set(replicas)
        if not current or current == self._told_all:
            return 0
        stale = [s for s in self.sessions.values() if s.replicas_said != current]
        if not stale:
            self._told_all = current
            return 0
        message = replicas_changed(replicas)
        told = 0
        for session in stale:
            with contextlib.suppress(ResourceExhausted):  # full queue: the next reconcile
                session.send(message)
                session.replicas_said = current
                told += 1
        self._told_all = current if told == len(stale) else None
        _log.info(
            "replica set %s told to %d of %d nodes",
            ", ".join(f"{r}={a}" for r, a in current),
            told,
            len(stale),
        )
        return told

    def reconcile_session(self, session: NodeSession, snapshot: Snapshot) -> None:
        """Send the commands that move ``session``'s node towards ``snapshot``'s placements.

        A command is sent once per decision (its mark in ``session.sent``) and sent again only
        after the node reported on that variant (any CopyStatus clears the mark), so a node that
        dropped or ignored a command is re-told. A command that does not fit the stream's queue
        is left unmarked, so the next reconcile decides it again.
        """
        try:
            self._send(session, self._decide(session, snapshot))
        except BaseException:
            self.scope.owe(session.node_id)  # decided again by the next pass
            raise

    def _decide(self, session: NodeSession, snapshot: Snapshot) -> tuple[Decision, ...]:
        held = session.reconcile_view()
        linked_s = session.linked_s()
        if session.embedded:  # an application member: its Hello's models, never placements
            decisions = reconcile_embedded(
                snapshot, session.hello.embedded, held, said=session.sent, digest=self._digest
            )
            self.scope.decided(session.node_id, held, fresh=False)
            return decisions
        decisions = reconcile(
            snapshot,
            session.node_id,
            held,
            said=session.sent,
            linked_s=linked_s,
            digest=self._digest,
        )
        self.scope.decided(session.node_id, held, fresh=linked_s < ADOPTION_GRACE_S)
        return decisions

    def _send(self, session: NodeSession, decisions: tuple[Decision, ...]) -> None:
        held_back = self.unloads_held()
        for decision in decisions:
            if isinstance(decision, Settled):
                session.sent[decision.key] = decision.mark
                continue
            if held_back and isinstance(decision, Unload):
                self.scope.owe(session.node_id)  # decided again once confirmed or released
                continue  # the safety floor
            message = decision.message()
            stamped = message.load if isinstance(decision, Load) else message.unload
            stamped.store_id = self._store_id()
            try:
                session.send(message)
            except ResourceExhausted:
                self.scope.owe(session.node_id)  # a full queue: the next pass decides it again
            else:
                session.sent[decision.key] = decision.mark
                if isinstance(decision, Load):  # a report of it will be believed
                    session.ordered_load(decision.key, decision.spec.sha256)
                else:
                    session.ordered_unload(decision.key)
                _log.info(
                    "%s %s/%s -> node %s (rev %d)",
                    "load" if isinstance(decision, Load) else "unload",
                    decision.key[0],
                    decision.key[1],
                    session.node_id,
                    decision.revision,
                )

    def _digest(self, key: VariantKey, spec: mesh_pb2.ModelSpec) -> str:
        """The monitoring digest a copy of ``spec`` should report (cached per spec object)."""
        cached = self._digests.get(key)
        if cached is not None and cached[0] is spec:
            return cached[1]
        digest = spec_digest(key, spec)
        self._digests[key] = (spec, digest)
        return digest

    async def close(self, timeout_s: float | None = None) -> None:
        """Fail every pending tunneled query and wait for the streams' cleanups (record
        deletes) and background writes; after ``timeout_s`` (None: no bound) those still
        running are cancelled -- with etcd unreachable they would retry for ~30 s, while the
        records they delete expire with this replica's lease anyway."""
        for session in list(self.sessions.values()):
            session.fail_pending()
        pending = {*self._cleanups.values(), *self._background}
        if not pending:
            await self.records.close()
            return
        _, late = await asyncio.wait(pending, timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
        await self.records.close()


def _state_name(state: int) -> str:
    """A reported copy state's name, or its number when the enum has none (a newer or hostile
    node: the log line must not raise)."""
    try:
        return mesh_pb2.CopyState.Name(state)  # type: ignore[arg-type]
    except ValueError:
        return f"state {state}"
