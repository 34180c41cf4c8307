"""PURE: the failure records of a placement, and when a node whose copy failed is tried again.

A copy that FAILED on a node keeps the node out of the variant's candidates (``Placement.failed``,
read by the ``not_failed`` filter) for a while, not for ever. Each such node has a
:class:`~meshserve.protos.mesh_pb2.CopyFailure` record in ``Placement.failures``:

* a **transient** failure (the node says ``CopyStatus.permanent`` false: connection refused,
  timeout, 5xx, a download too slow) is retried automatically: the node becomes a candidate again
  at ``retry_unix_ms``, after the :class:`RetryPolicy`'s backoff for the number of consecutive
  failures there (30 s, 2 min, 10 min, then 10 min each by default);
* a **permanent** one (sha256 mismatch, not ONNX, over the size limit, a refused request) waits;
* any record is dropped, and the node is a candidate at once, when the spec's artifact
  (sha256 or uri) or registration (``registered_unix_ms``: each RegisterModel sets it) differs
  from the one the failure happened under, or when an admin asked for a retry on that node
  (``ModelSpec.retry_requests``, written by ``meshctl placements retry``) since;
* a node whose copy becomes READY loses its record (the scheduler drops it).

Everything here is a function of its arguments: the clock is the ``now_ms`` the leader passes
in (milliseconds since the epoch); nothing reads time, etcd or the network.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshserve.protos import mesh_pb2

__all__ = [
    "DEFAULT_RETRY",
    "RetryPolicy",
    "carried",
    "describe",
    "next_retry_ms",
    "parse_backoff",
    "reasons",
    "record_failure",
    "retry_requests",
]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long a node stays out after its ``n``-th consecutive transient failure:
    ``backoff_s[n - 1]``, the last value for every later failure (the cap)."""

    backoff_s: tuple[float, ...] = (30.0, 120.0, 600.0)

    def __post_init__(self) -> None:
        if not self.backoff_s or any(s <= 0 for s in self.backoff_s):
            raise ValueError(f"retry backoff must be positive seconds, got {self.backoff_s}")

    def delay_ms(self, attempts: int) -> int:
        step = self.backoff_s[min(max(1, attempts), len(self.backoff_s)) - 1]
        return int(step * 1000)


DEFAULT_RETRY = RetryPolicy()


def parse_backoff(text: str) -> RetryPolicy:
    """``"30,120,600"`` -> a :class:`RetryPolicy`; ValueError with the reason otherwise."""
    try:
        steps = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"retry backoff {text!r}: expected seconds such as 30,120,600") from None
    return RetryPolicy(steps)


def retry_requests(spec: mesh_pb2.ModelSpec, node_id: str) -> int:
    """Manual retries asked for ``node_id`` (its own plus those for every node)."""
    return int(spec.retry_requests.get(node_id, 0)) + int(spec.retry_requests.get("", 0))


def _current(spec: mesh_pb2.ModelSpec, node_id: str, record: mesh_pb2.CopyFailure) -> bool:
    """The record still applies: same artifact, same registration, no manual retry since."""
    return (
        record.sha256 == spec.sha256.lower()
        and record.artifact_uri == spec.artifact_uri
        and record.registered_unix_ms == spec.registered_unix_ms
        and record.retry_requests == retry_requests(spec, node_id)
    )


def carried(
    spec: mesh_pb2.ModelSpec,
    old: mesh_pb2.Placement | None,
    now_ms: int,
    policy: RetryPolicy = DEFAULT_RETRY,
) -> tuple[dict[str, str], dict[str, mesh_pb2.CopyFailure]]:
    """``(failed, records)`` to start this pass from: the nodes still kept out (node -> reason)
    and the failure records still in force. Records that no longer apply are dropped (node a
    candidate again, backoff reset); a transient record whose retry time has come stays (the
    next failure backs off further) but its node leaves ``failed``. A node in ``old.failed``
    without a record (written before records existed) gets a transient one, first step."""
    if old is None:
        return {}, {}
    records: dict[str, mesh_pb2.CopyFailure] = {}
    failed: dict[str, str] = {}
    for node_id, stored in old.failures.items():
        if _current(spec, node_id, stored):
            records[node_id] = stored
    for node_id, reason in old.failed.items():
        record = records.get(node_id)
        if node_id not in old.failures:
            record = records[node_id] = _record(spec, node_id, reason, False, 1, now_ms, policy)
        if record is None:
            continue  # its record no longer applies: a candidate again
        if record.permanent or now_ms < record.retry_unix_ms:
            failed[node_id] = reason
    return failed, records


def _record(
    spec: mesh_pb2.ModelSpec,
    node_id: str,
    reason: str,
    permanent: bool,
    attempts: int,
    now_ms: int,
    policy: RetryPolicy,
) -> mesh_pb2.CopyFailure:
    return mesh_pb2.CopyFailure(
        reason=reason,
        permanent=permanent,
        attempts=attempts,
        retry_unix_ms=0 if permanent else now_ms + policy.delay_ms(attempts),
        sha256=spec.sha256.lower(),
        artifact_uri=spec.artifact_uri,
        registered_unix_ms=spec.registered_unix_ms,
        retry_requests=retry_requests(spec, node_id),
    )


def record_failure(
    spec: mesh_pb2.ModelSpec,
    node_id: str,
    status: mesh_pb2.CopyStatus,
    prior: mesh_pb2.CopyFailure | None,
    now_ms: int,
    policy: RetryPolicy = DEFAULT_RETRY,
) -> mesh_pb2.CopyFailure:
    """The record of a copy of ``spec`` that just FAILED on ``node_id`` (``prior``: the record
    of its earlier failures there still in force, if any): one more consecutive attempt, the
    next retry after the policy's backoff (none when the node says the failure is permanent)."""
    attempts = (prior.attempts if prior is not None else 0) + 1
    reason = status.reason or "copy failed"
    return _record(spec, node_id, reason, status.permanent, attempts, now_ms, policy)


def next_retry_ms(placements: Iterable[mesh_pb2.Placement]) -> int | None:
    """The earliest time a node kept out by a transient failure becomes a candidate again
    (None: no such node): the leader plans again then, even if nothing else changed."""
    due = [
        p.failures[n].retry_unix_ms
        for p in placements
        for n in p.failed
        if n in p.failures and not p.failures[n].permanent and p.failures[n].retry_unix_ms
    ]
    return min(due) if due else None


def describe(model: str, node_id: str, reason: str, record: mesh_pb2.CopyFailure | None) -> str:
    """What ``explain placement`` says of a node kept out by a failure: why, whether it heals by
    itself and when, and the command that retries it now."""
    manual = f"`meshctl placements retry {model} --node {node_id}`"
    if record is None:
        return f"a copy of this variant failed on the node: {reason} (retry: {manual})"
    if record.permanent:
        return (
            f"a copy of this variant failed on the node: {record.reason} (permanent, "
            f"{record.attempts} attempt(s)); waits for a new artifact or registration, or {manual}"
        )
    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.retry_unix_ms / 1000))
    return (
        f"a copy of this variant failed on the node: {record.reason} (transient, "
        f"{record.attempts} attempt(s)); next automatic retry at {at}, or now with {manual}"
    )


def reasons(placement: mesh_pb2.Placement | None) -> Mapping[str, str]:
    """node -> :func:`describe` text for every node ``placement`` keeps out."""
    if placement is None:
        return {}
    return {
        node_id: describe(
            placement.model,
            node_id,
            reason,
            placement.failures[node_id] if node_id in placement.failures else None,
        )
        for node_id, reason in placement.failed.items()
    }
