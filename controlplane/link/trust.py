"""What the control plane believes of a node's reports: a node is trusted to compute, not to
describe itself (docs/security.md, "What a node is believed about").

Contract (pure: no I/O, no clock):

- :func:`adopted` decides which copies a node's Hello names (a node back from a cut) count: a
  copy of a registered variant with that variant's sha256. Any other claim is left out of the
  view and only kept as :class:`Claims` so the node can be told to unload it.
- :func:`judge` decides whether one CopyStatus is believed: UNLOADED always (the copy is gone);
  any other state only for a variant the control plane ordered on this stream (a Load sent, or
  a copy adopted from the Hello) naming a sha256 it ordered there; and never beyond
  :data:`MAX_COPIES_PER_NODE` copies. It returns None (believed) or the reason it is not.
- :func:`held_telemetry` keeps only the entries of a Telemetry about copies the node is
  believed to hold; the rest are dropped (drift, feedback, load of copies never ordered).
- :class:`ByteBudget` is a node's telemetry budget on the control plane: bytes per second with a
  burst; a Telemetry over it is dropped (and counted), whatever the node's own budget says.
- :class:`Claims` bounds what is remembered of refused reports (:data:`MAX_CLAIMS`) and counts
  refusals by reason, so each reason is logged once per stream.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Final

from meshserve.controlplane.link.handshake import TokenBucket
from meshserve.controlplane.snapshot import Snapshot, VariantKey
from meshserve.protos import mesh_pb2

__all__ = [
    "DEFAULT_TELEMETRY_BYTES_PER_S",
    "MAX_CLAIMS",
    "MAX_COPIES_PER_NODE",
    "NEVER_ORDERED",
    "OTHER_SHA256",
    "TOO_MANY",
    "ByteBudget",
    "Claims",
    "adopted",
    "held_telemetry",
    "judge",
]

#: Copies one node is believed to hold at most (a placement names a node for one copy of a
#: variant; beyond this, reports are refused).
MAX_COPIES_PER_NODE: Final = 1024
#: Refused claims remembered per stream (so the node can be told to unload them); more are
#: counted and forgotten.
MAX_CLAIMS: Final = 1024

#: A node's telemetry budget on the control plane: 32 times a node's default (2 KiB/s), with a
#: burst of 16 s of it (a node back from a cut sends its offline buffer, 64 KiB by default).
DEFAULT_TELEMETRY_BYTES_PER_S: Final = 64 << 10

NEVER_ORDERED: Final = "a copy the control plane never ordered on this stream"
OTHER_SHA256: Final = "a sha256 the control plane did not order for that copy"
TOO_MANY: Final = f"over {MAX_COPIES_PER_NODE} copies"


def adopted(
    snapshot: Snapshot, copies: Iterable[mesh_pb2.CopyStatus]
) -> tuple[list[mesh_pb2.CopyStatus], list[mesh_pb2.CopyStatus]]:
    """The Hello's copies split into (believed, refused): believed when the variant is
    registered with that sha256 (the artifact the control plane orders for it), at most
    :data:`MAX_COPIES_PER_NODE`, UNLOADED ones dropped."""
    believed: list[mesh_pb2.CopyStatus] = []
    refused: list[mesh_pb2.CopyStatus] = []
    for copy in copies:
        if copy.state == mesh_pb2.UNLOADED:
            continue
        spec = snapshot.models.get((copy.model, copy.variant))
        ok = spec is not None and bool(spec.sha256) and copy.sha256 == spec.sha256.lower()
        (believed if ok and len(believed) < MAX_COPIES_PER_NODE else refused).append(copy)
    return believed, refused


def judge(
    status: mesh_pb2.CopyStatus,
    ordered: Mapping[VariantKey, Collection[str]],
    held: Collection[VariantKey],
) -> str | None:
    """None when ``status`` is believed, else why not (see the module contract). ``ordered``:
    the sha256s ordered per variant on this stream; ``held``: the variants believed held."""
    if status.state == mesh_pb2.UNLOADED:
        return None
    key = (status.model, status.variant)
    shas = ordered.get(key)
    if shas is None:
        return NEVER_ORDERED
    if status.sha256.lower() not in shas:
        return OTHER_SHA256
    if key not in held and len(held) >= MAX_COPIES_PER_NODE:
        return TOO_MANY
    return None


def held_telemetry(
    telemetry: mesh_pb2.Telemetry, held: Collection[VariantKey]
) -> tuple[mesh_pb2.Telemetry, int]:
    """``telemetry`` with only the entries of copies in ``held``, and how many were dropped
    (the message itself when none was)."""
    keep = [m for m in telemetry.models if (m.model, m.variant) in held]
    dropped = len(telemetry.models) - len(keep)
    if not dropped:
        return telemetry, 0
    out = mesh_pb2.Telemetry()
    out.CopyFrom(telemetry)
    del out.models[:]
    out.models.extend(keep)
    return out, dropped


class Claims:
    """What a node claimed and was not believed (bounded), and refusals counted by reason."""

    def __init__(self) -> None:
        self.copies: dict[VariantKey, mesh_pb2.CopyStatus] = {}
        self.refused: Counter[str] = Counter()

    def refuse(self, status: mesh_pb2.CopyStatus, reason: str) -> bool:
        """Count a refused report (kept, when there is room, so the node can be told to unload
        it); True the first time ``reason`` is seen (log it then)."""
        key = (status.model, status.variant)
        if key in self.copies or len(self.copies) < MAX_CLAIMS:
            self.copies[key] = status
        self.refused[reason] += 1
        return self.refused[reason] == 1

    def forget(self, key: VariantKey) -> None:
        self.copies.pop(key, None)

    def as_unheld(
        self, believed: Mapping[VariantKey, mesh_pb2.CopyStatus]
    ) -> dict[VariantKey, mesh_pb2.CopyStatus]:
        """What reconcile is told the node holds: the believed copies, and each refused claim
        without its sha256 (so a placed variant is ordered afresh, an unplaced one unloaded)."""
        out = {
            key: mesh_pb2.CopyStatus(model=key[0], variant=key[1], state=claim.state)
            for key, claim in self.copies.items()
            if key not in believed
        }
        out.update(believed)
        return out


class ByteBudget(TokenBucket):
    """``rate`` bytes per second, at most ``burst`` saved up (pure; injectable clock); counts
    what it refused."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(rate=rate, burst=burst, clock=clock)
        self.dropped = 0  # messages refused
        self.dropped_bytes = 0

    def take(self, amount: float = 1.0) -> bool:
        """Spend ``amount`` bytes if the budget holds them (True); else count a drop (False)."""
        if super().take(amount):
            return True
        self.dropped += 1
        self.dropped_bytes += int(amount)
        return False
