"""The NodeLink handshake: Hello -> checks -> Welcome.

Contract:
- The first NodeMessage of a stream must be a Hello, sent within the hello timeout
  (DEADLINE_EXCEEDED otherwise), naming a valid node id (INVALID_ARGUMENT otherwise).
- ``identify`` (when set) checks that the caller may claim that node id and raises the status
  that refuses the stream.
- New streams are admitted at a bounded rate (:class:`TokenBucket`); the excess is refused with
  UNAVAILABLE and retries with the node's jittered backoff (reconnect storms).
- One stream per node per replica: a second concurrent stream is refused with ALREADY_EXISTS.
- The checks run in that order; :func:`check_hello` and :func:`welcome` are pure, and
  :meth:`Handshake.accept` is the only step that reads from or aborts the stream.
- After the Welcome, every change of the replica set reaches the node as
  :func:`replicas_changed` (pure, like :func:`replica_set`, the comparable form of a set).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

import grpc

from meshserve.common.errors import ServicerContext
from meshserve.protos import mesh_pb2

__all__ = [
    "Handshake",
    "Refusal",
    "TokenBucket",
    "check_hello",
    "replica_set",
    "replicas_changed",
    "welcome",
]

_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up (pure; injectable clock)."""

    def __init__(
        self, *, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._when = clock()

    def take(self, amount: float = 1.0) -> bool:
        """Take ``amount`` tokens if there are that many; False: refuse (nothing taken)."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._when) * self.rate)
        self._when = now
        if self._tokens >= amount:
            self._tokens -= amount
            return True
        return False


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a stream is refused: the status it ends with."""

    code: grpc.StatusCode
    details: str


LATE_HELLO = Refusal(
    grpc.StatusCode.DEADLINE_EXCEEDED, "the first NodeMessage must be a Hello, sent at once"
)


def check_hello(first: object) -> mesh_pb2.Hello | Refusal:
    """The Hello of a stream's first read, or why the stream is refused (anything but a
    NodeMessage holding a Hello: ``EOF``, a message that did not decode, another body)."""
    if not isinstance(first, mesh_pb2.NodeMessage) or not first.HasField("hello"):
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the first NodeMessage must be a Hello")
    hello = first.hello
    if not _NODE_ID.match(hello.node_id):
        return Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"invalid node_id {hello.node_id!r}: 1-128 of [A-Za-z0-9_.:-], "
            "starting with a letter or digit",
        )
    return hello


def welcome(
    *,
    replica_id: str,
    replicas: Sequence[mesh_pb2.ReplicaInfo],
    lease_ttl_s: int,
    telemetry_interval_ms: int,
) -> mesh_pb2.ControlMessage:
    """The Welcome a linked node gets: this replica, every replica, the lease TTL and how
    often to send telemetry."""
    return mesh_pb2.ControlMessage(
        welcome=mesh_pb2.Welcome(
            replica_id=replica_id,
            replicas=replicas,
            lease_ttl_seconds=lease_ttl_s,
            telemetry_interval_ms=telemetry_interval_ms,
            tunnel_batches=True,  # infer_answers read (hub._on_message)
        )
    )


def replica_set(replicas: Sequence[mesh_pb2.ReplicaInfo]) -> tuple[tuple[str, str], ...]:
    """``replicas`` as a comparable value: (id, address) pairs, sorted."""
    return tuple(sorted((r.replica_id, r.address) for r in replicas))


def replicas_changed(replicas: Sequence[mesh_pb2.ReplicaInfo]) -> mesh_pb2.ControlMessage:
    """What a linked node is told when the replica set changed: every live replica (it dials
    the new ones and drops the links to replicas no longer listed)."""
    return mesh_pb2.ControlMessage(replicas=mesh_pb2.ReplicaSet(replicas=replicas))


class Handshake:
    """The checks a new stream passes before it is linked (see the module contract)."""

    def __init__(
        self,
        *,
        replica_id: str,
        hello_timeout_s: float,
        admissions_per_s: float,
        identify: Callable[[ServicerContext, str], None] | None = None,
    ) -> None:
        self.replica_id = replica_id
        self._hello_timeout = hello_timeout_s
        self._identify = identify
        self.admission = TokenBucket(rate=admissions_per_s, burst=max(1.0, admissions_per_s))

    async def accept(
        self, context: ServicerContext, linked: Container[str]
    ) -> mesh_pb2.Hello | None:
        """Read the Hello and run the checks; ``linked``: the nodes with a live stream here.
        Returns the Hello, or None once the stream was aborted with the refusal's status."""
        hello = await self._check(context, linked)
        if isinstance(hello, Refusal):
            await context.abort(hello.code, hello.details)
            return None
        return hello

    async def _check(
        self, context: ServicerContext, linked: Container[str]
    ) -> mesh_pb2.Hello | Refusal:
        try:
            first = await asyncio.wait_for(context.read(), self._hello_timeout)
        except TimeoutError:
            return LATE_HELLO
        hello = check_hello(first)
        if isinstance(hello, Refusal):
            return hello
        if self._identify is not None:
            self._identify(context, hello.node_id)  # a refusal ends the stream with its status
        if not self.admission.take():
            # A reconnect storm (a region back from an outage): nodes retry with jittered
            # backoff, so refusing the excess spreads them out instead of stalling everyone.
            return Refusal(
                grpc.StatusCode.UNAVAILABLE,
                f"replica {self.replica_id} admits {self.admission.rate:g} new streams/s; "
                "retry with backoff",
            )
        if hello.node_id in linked:
            return Refusal(
                grpc.StatusCode.ALREADY_EXISTS,
                f"node {hello.node_id} already has a live stream to replica {self.replica_id}",
            )
        return hello
