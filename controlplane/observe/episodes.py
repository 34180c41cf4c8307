"""Alarm episodes: what outlives a control-plane replica of a drift or accuracy alarm.

An *episode* runs from the alarm being raised to it being cleared, per ``(kind, model,
variant)``. The leader opens it in etcd (``alarms/<kind>/<model>/<variant>``, through
:meth:`~meshserve.controlplane.registry.Registry.open_alarm`) before it records the event, and
closes it (``close_alarm``) before it records the clearing event; both are transactions that
succeed once, so an episode is raised once and cleared once whichever replica leads, across
restarts and leader changes.

Contract:

* :class:`Episode` is the stored record: the figure the alarm was raised on (labelled answers,
  accuracy, the nodes whose feedback made it) and the message. Encoded as JSON (sorted keys);
  :func:`decode` never raises (an unreadable record reads as an open episode with no figure).
* :func:`judge_accuracy` is the accuracy decision, pure: *raise*, *clear* or nothing, from the
  feedback summed now, the open episode (if any) and whether this leader is *settled* (its grace
  after taking the lead is over, so the nodes that hold the data had time to link). A judgement
  needs at least ``min_feedback`` labelled answers; an open episode is cleared only on a figure
  at least as complete as the one it was raised on (every node it named reports again, or as
  many labelled answers), so a partial view after a restart never raises a second alarm nor
  clears one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from meshserve.controlplane import keys

__all__ = [
    "Episode",
    "EpisodeKey",
    "Feedback",
    "Verdict",
    "decode",
    "encode",
    "judge_accuracy",
    "open_episodes",
]

#: ``(kind, model, variant)``
EpisodeKey = tuple[str, str, str]


@dataclass(frozen=True)
class Episode:
    kind: str  # "drift" or "accuracy"
    model: str
    variant: str
    message: str = ""
    labelled: int = 0  # accuracy: labelled answers the alarm was raised on
    accuracy: float = -1.0
    nodes: tuple[str, ...] = ()  # accuracy: the nodes whose feedback made the figure
    unix_ms: int = 0
    replica_id: str = ""


@dataclass(frozen=True)
class Feedback:
    """One variant's feedback summed over the nodes reporting it now."""

    labelled: int
    accuracy: float  # -1: no labels joined
    nodes: frozenset[str] = field(default_factory=frozenset)


class Verdict(Enum):
    RAISE = "raise"
    CLEAR = "clear"


def encode(episode: Episode) -> bytes:
    record = {
        "kind": episode.kind,
        "model": episode.model,
        "variant": episode.variant,
        "message": episode.message,
        "labelled": episode.labelled,
        "accuracy": episode.accuracy,
        "nodes": list(episode.nodes),
        "unix_ms": episode.unix_ms,
        "replica_id": episode.replica_id,
    }
    return json.dumps(record, sort_keys=True).encode()


def decode(kind: str, model: str, variant: str, value: bytes) -> Episode:
    """The episode stored at ``alarm_key(kind, model, variant)`` (the key names it; the value
    adds the figure)."""
    try:
        record = json.loads(value)
        return Episode(
            kind,
            model,
            variant,
            message=str(record.get("message", "")),
            labelled=int(record.get("labelled", 0)),
            accuracy=float(record.get("accuracy", -1.0)),
            nodes=tuple(str(n) for n in record.get("nodes", ())),
            unix_ms=int(record.get("unix_ms", 0)),
            replica_id=str(record.get("replica_id", "")),
        )
    except (ValueError, TypeError, AttributeError):
        return Episode(kind, model, variant)


def open_episodes(items: Mapping[str, bytes]) -> dict[EpisodeKey, Episode]:
    """The episodes stored under ``alarms/`` (keys that do not parse are skipped)."""
    out: dict[EpisodeKey, Episode] = {}
    for key, value in items.items():
        kind, _, rest = key[len(keys.ALARMS) :].partition("/")
        model, _, variant = rest.partition("/")
        if kind and model:
            out[(kind, model, variant)] = decode(kind, model, variant, value)
    return out


def judge_accuracy(
    now: Feedback,
    episode: Episode | None,
    *,
    min_accuracy: float | None,
    min_feedback: int,
    settled: bool,
) -> Verdict | None:
    """Raise, clear, or leave the accuracy alarm of one variant (see the module contract)."""
    if min_accuracy is None or not settled:
        return None
    if now.labelled < max(min_feedback, 1) or now.accuracy < 0:
        return None
    low = now.accuracy < min_accuracy
    if episode is None:
        return Verdict.RAISE if low else None
    complete = set(episode.nodes) <= now.nodes or now.labelled >= episode.labelled
    if not low and complete:
        return Verdict.CLEAR
    return None
