"""The registry seam: every etcd write of the control plane, behind one typed interface.

:class:`Registry` is the contract; :class:`EtcdRegistry` implements it on an etcd client (the
key schema and value codecs are :mod:`meshserve.controlplane.keys`; see docs/etcd-schema.md).
No other module of the control plane writes to etcd except :mod:`meshserve.controlplane.etcd`
(sessions, elections). Reads that want the watched view use the prefix mirrors; the registry
reads only where a write depends on what it read.

Racing writes are single etcd transactions, as in etcd's ``clientv3/concurrency``: a write that
depends on a read compares what it read (a key's ``mod_revision``, a prefix unchanged since the
read's revision, a key's existence) in the same transaction as the write. A lost race is retried
from a fresh read where the call means "apply my change to whatever is there" (the drift
profile, an alias change, a variant's removal), at most a few times; then the call fails with
UNAVAILABLE ("retry"). Nothing is ever written half: a call's keys change at one revision.

Errors: the domain errors of :mod:`meshserve.common.errors` (the admin API passes them on as
gRPC statuses); etcd trouble surfaces as aetcd's own errors (``TRANSIENT_ERRORS``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from meshserve.controlplane.etcd._client import (
    EtcdStatus,
)
from meshserve.protos import mesh_pb2

__all__ = ["CAS_ATTEMPTS", "TXN_OPS", "AliasPlan", "Registry", "SeqCounter", "VariantKey"]

VariantKey = tuple[str, str]
#: ``plan(current alias or None, registered versions) -> new alias``: pure, may raise a domain
#: error; returning ``current`` itself means "no change" (nothing is written).
AliasPlan = Callable[[mesh_pb2.Alias | None, list[str]], mesh_pb2.Alias]

#: Attempts of a compare-and-swap that is retried on a lost race.
CAS_ATTEMPTS = 5
#: Operations per placement transaction (etcd refuses more than 128 by default).
TXN_OPS = 100


@dataclass(frozen=True, slots=True)
class SeqCounter:
    """The event ring's sequence counter as last seen: the last sequence number handed out and
    the counter key's ``mod_revision`` (0: the key does not exist yet)."""

    last: int = 0
    revision: int = 0


class Registry(Protocol):
    """Every write the control plane makes to its store. Implementations: :class:`EtcdRegistry`
    (production, integration tests) and an in-memory fake for unit tests.

    Contract shared by all methods: a call changes its keys atomically (one revision); a call
    that raises wrote nothing, except an etcd error whose reply was lost (the outcome is
    unknown, as for any remote write).
    """

    # -- models, versions and aliases (Admin API) --------------------------------------------

    async def register_model(self, spec: mesh_pb2.ModelSpec) -> bool:
        """Store ``spec`` (validated by the caller) at ``models/<name>/<variant>``, replacing
        what is there; True when the variant is new. The model's first version becomes its
        ``live`` alias in the same write (``rollout.first_live``; a model without one gets it
        now). InvalidArgument if an alias of the model has the variant's or the version's name,
        or the names clash with the model's other variants (``rollout.check_registration``) —
        checked against the same revision as the write."""
        ...

    async def set_drift_profile(
        self, model: str, variant: str, profile: mesh_pb2.DriftProfile
    ) -> None:
        """Set the stored spec's drift reference, keeping every other field as stored now
        (read-modify-write on the key's mod revision, retried). NotFound: no such variant."""
        ...

    async def remove_variant(self, model: str, variant: str) -> int:
        """Delete one variant (1 removed, 0 absent). FailedPrecondition when it is the last
        variant of a version an alias points at (version or canary) while the model has other
        versions; the model's last variant goes with the model's aliases. The write compares
        that no alias or variant changed since the check."""
        ...

    async def remove_model(self, model: str) -> int:
        """Delete every variant and every alias of ``model`` in one transaction; returns how
        many variants were removed."""
        ...

    async def aliases(self, model: str) -> list[mesh_pb2.Alias]:
        """The model's aliases as stored (a linearizable read), by name."""
        ...

    async def request_retry(self, model: str, variant: str, node_id: str) -> list[str]:
        """Ask the leader to place copies of ``model`` (only ``variant`` when given) on
        ``node_id`` ("" = every node) again, whatever failed there: one more manual retry in
        each stored spec's ``retry_requests`` (read-modify-write on its mod revision, retried);
        the scheduler drops failure records made before it. Returns the variants touched, by
        name. NotFound: no such model or variant."""
        ...

    async def change_alias(
        self, model: str, alias: str, plan: AliasPlan
    ) -> tuple[mesh_pb2.Alias, mesh_pb2.Alias | None]:
        """Apply ``plan`` to the alias as stored and the model's registered versions (names of
        versions, ``rollout.version_of`` each variant); returns
        ``(new, old)``. The write compares the alias's mod revision, that no variant of the
        model was written since the read, and that the versions the new record names still
        exist. NotFound: the model has no variant."""
        ...

    # -- policy, drain and wake marks -------------------------------------------------------

    async def apply_policy(self, text: str) -> int:
        """Store the policy YAML as given (validated by the caller); returns its revision."""
        ...

    async def policy(self) -> tuple[str, int] | None:
        """The stored policy text and its mod revision; None when none was applied."""
        ...

    async def label_node(
        self, node_id: str, set_labels: Mapping[str, str], remove: Sequence[str]
    ) -> dict[str, str]:
        """Change a node's admin-side labels (``node-labels/<node>``, no lease: they outlive the
        node's streams): ``set_labels`` added or replaced, then ``remove`` dropped; the key is
        deleted when no label is left. A compare-and-swap; returns the labels now stored."""
        ...

    async def drain(self, node_id: str) -> None:
        """An operator's drain mark (value "", no lease: it stays until :meth:`undrain`)."""
        ...

    async def undrain(self, node_id: str) -> None:
        """Remove the node's drain mark, whoever set it."""
        ...

    async def mark_shutdown_drain(self, node_id: str, lease: int) -> bool:
        """A node shutting down: mark it draining under ``lease`` unless a mark exists (an
        operator's drain is never replaced); True when this call set it."""
        ...

    async def clear_shutdown_drain(self, node_id: str) -> bool:
        """Remove the node's mark only if it is a shutdown mark; True when removed."""
        ...

    async def confirm_unloads(self) -> bytes:
        """The operator confirms a mass unload the safety floor holds: ``UNLOAD_CONFIRM``'s count
        incremented (compare-and-swap, no lease), stamped with the time; returns the value
        written (every replica's watch releases its held episode on a new value)."""
        ...

    async def wake(self, key: VariantKey, lease: int) -> None:
        """A query waits for a copy of a variant scaled to zero: set ``wake/<m>/<v>`` under
        ``lease``. Calls are counted per variant on this registry."""
        ...

    async def unwake(self, key: VariantKey) -> None:
        """The end of one :meth:`wake`; the last one deletes the mark if it is still the one
        this registry wrote (another replica's mark stays)."""
        ...

    # -- replicas, node link records, placements ------------------------------------------

    async def register_replica(self, info: mesh_pb2.ReplicaInfo, lease: int) -> None:
        """This replica's record, under its session lease."""
        ...

    async def put_node_records(
        self, replica_id: str, infos: Sequence[mesh_pb2.NodeInfo], lease: int
    ) -> None:
        """The link records of nodes whose streams ``replica_id`` holds, under its lease: one
        transaction per ``TXN_OPS`` records (each record is written whole; a failed call may
        have written some of the transactions before it)."""
        ...

    async def delete_node_records(self, replica_id: str, node_ids: Sequence[str]) -> None:
        """Delete the link records ``replica_id`` wrote for ``node_ids`` (their streams ended):
        one transaction per ``TXN_OPS`` (a record already gone is no error)."""
        ...

    async def delete_node_record(
        self, node_id: str, replica_id: str, *, mod_revision: int | None = None
    ) -> bool:
        """Delete a link record; with ``mod_revision`` only if the record is still that one
        (a sweep must not delete a record a new stream just wrote). True when deleted."""
        ...

    async def write_placements(
        self,
        upserts: Mapping[VariantKey, mesh_pb2.Placement],
        deletes: Iterable[VariantKey],
        leader: str,
    ) -> bool:
        """Write a scheduling pass, in transactions of at most ``TXN_OPS`` operations each
        guarded by ``leader`` still holding the leader key; False (and the rest unwritten) as
        soon as one is refused."""
        ...

    # -- alarm episodes (observe/alarms.py) -----------------------------------------------------

    async def open_alarm(
        self, kind: str, model: str, variant: str, value: bytes, leader: str
    ) -> int:
        """Open an alarm episode: put ``value`` at ``alarms/<kind>/<model>/<variant>`` iff no
        episode is open there and ``leader`` holds the leader key (one transaction). Returns the
        revision of the write, 0 when refused (already open: raised once per episode; or
        ``leader`` no longer leads)."""
        ...

    async def close_alarm(self, kind: str, model: str, variant: str, leader: str) -> int:
        """Close the open episode of ``(kind, model, variant)`` iff one is open and ``leader``
        holds the leader key. Returns the revision of the delete, 0 when refused (nothing open:
        cleared once; or ``leader`` no longer leads)."""
        ...

    async def keep_captured_reference(
        self, model: str, variant: str, profile: mesh_pb2.DriftProfile
    ) -> bool:
        """Store a drift reference captured from production windows as the variant's, only
        while the stored spec has none (an operator's profile always wins; read-modify-write on
        the key's mod revision, retried). True when stored; False when the variant is gone, has
        a reference, or kept changing."""
        ...

    # -- the event ring --------------------------------------------------------------------

    async def append_events(
        self, batch: Sequence[mesh_pb2.Event], counter: SeqCounter, capacity: int
    ) -> tuple[bool, SeqCounter]:
        """Number ``batch`` (at most ``capacity`` events) after ``counter.last`` (setting each
        event's ``seq``), and in one transaction that compares the counter's mod revision with
        ``counter.revision``: store the events, advance the counter and trim the ring to its
        newest ``capacity`` events.
        Returns ``(True, new counter)``, or ``(False, the counter as stored)`` after a lost
        race (nothing written: renumber and retry)."""
        ...

    async def has_event(self, event: mesh_pb2.Event) -> bool:
        """Whether ``event`` is stored at its ``seq`` byte for byte (did a write whose reply
        was lost commit?)."""
        ...

    async def read_events(self) -> list[bytes]:
        """The ring's stored values, newest first."""
        ...

    # -- the store itself (maintenance) ------------------------------------------------------

    async def store_status(self) -> EtcdStatus:
        """The store's identity and size now: cluster id, current revision (linearizable),
        database size. Used to notice a store that lost its data (the revision went backwards or
        the cluster changed) and to state its size."""
        ...

    async def compact(self, revision: int) -> bool:
        """Drop the history older than ``revision`` (the current values stay); True when done,
        False when that revision was compacted already."""
        ...

    async def ensure_store_id(self, candidate: str) -> str:
        """The store's id (``keys.STORE_ID``): ``candidate`` written if the store has none yet
        (create-if-absent, no lease), else the one stored."""
        ...
