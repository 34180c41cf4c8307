"""The etcd key schema (see docs/etcd-schema.md) and value codecs (pure: no I/O).

Values are protobuf messages stored as JSON (readable with ``etcdctl get --prefix /meshserve``).
Readers (the watch mirrors, the snapshot builder, tests) may use these names; every write goes
through :mod:`meshserve.controlplane.registry`, the one module that writes them.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

__all__ = [
    "ALARMS",
    "ALIASES",
    "DRAINING",
    "EVENTS",
    "EVENTS_SEQ",
    "LEADER",
    "MODELS",
    "NODES",
    "NODE_LABELS",
    "PLACEMENTS",
    "POLICY",
    "REPLICAS",
    "SHUTDOWN_DRAIN",
    "STORE_ID",
    "UNLOAD_CONFIRM",
    "WAKE",
    "alarm_key",
    "alias_key",
    "alias_prefix",
    "decode",
    "draining_key",
    "encode",
    "event_key",
    "model_key",
    "model_prefix",
    "node_labels_key",
    "node_link_key",
    "placement_key",
    "prefix_end",
    "replica_key",
    "split_key",
    "unload_confirmation",
    "unload_confirmations",
    "wake_key",
]

ROOT = "/meshserve/"
MODELS = ROOT + "models/"  # models/<model>/<variant>      -> ModelSpec   (admin)
PLACEMENTS = ROOT + "placements/"  # placements/<model>/<variant>  -> Placement   (leader)
NODES = ROOT + "nodes/"  # nodes/<node>/<replica>        -> NodeInfo    (leased, hub)
#: node-labels/<node> -> NodeLabels (admin: ``meshctl nodes label``; what placement matches)
NODE_LABELS = ROOT + "node-labels/"
REPLICAS = ROOT + "replicas/"  # replicas/<replica>            -> ReplicaInfo (leased)
LEADER = ROOT + "leader"  # the elected scheduler's replica id (leased)
POLICY = ROOT + "policy"  # the placement policy, YAML text as applied (admin)
EVENTS = ROOT + "events/"  # events/<seq, 20 digits>       -> Event       (ring, any replica)
#: The event ring's sequence counter (decimal text): outside ``EVENTS``, so that a prefix read
#: of the ring sees events only.
EVENTS_SEQ = ROOT + "events-seq"
WAKE = ROOT + "wake/"  # wake/<model>/<variant>         -> unix ms (leased; gateway: scale from 0)
DRAINING = ROOT + "draining/"  # draining/<node>               -> "" (admin; present = draining)
ALIASES = ROOT + "aliases/"  # aliases/<model>/<alias>        -> Alias       (admin)
#: alarms/<kind>/<model>/<variant> -> an open alarm episode (JSON, observe/episodes.py; leader)
ALARMS = ROOT + "alarms/"
#: a random id written once per store (no lease): a store that lost its data gets a new one, so
#: nodes know its placement revisions restart (LoadModel.store_id; controlplane/etcd/guard.py)
STORE_ID = ROOT + "store-id"
#: the operator's unload confirmations: "<count> <unix ns>" (admin, compare-and-swap increment);
#: every replica watches it and a new value releases its held mass unload (link/floor.py)
UNLOAD_CONFIRM = ROOT + "unload-confirm"

#: The value of a ``draining/<node>`` key a node set by shutting down (an operator's is "").
SHUTDOWN_DRAIN = b"shutdown"
_SEQ_DIGITS = 20

M = TypeVar("M", bound=Message)


def model_key(model: str, variant: str) -> str:
    return f"{MODELS}{model}/{variant}"


def model_prefix(model: str) -> str:
    """Every variant of one model."""
    return f"{MODELS}{model}/"


def alarm_key(kind: str, model: str, variant: str) -> str:
    """An open alarm episode of ``kind`` ("drift", "accuracy") for one variant."""
    return f"{ALARMS}{kind}/{model}/{variant}"


def alias_key(model: str, alias: str) -> str:
    return f"{ALIASES}{model}/{alias}"


def alias_prefix(model: str) -> str:
    """Every alias of one model."""
    return f"{ALIASES}{model}/"


def draining_key(node_id: str) -> str:
    return f"{DRAINING}{node_id}"


def wake_key(model: str, variant: str) -> str:
    return f"{WAKE}{model}/{variant}"


def event_key(seq: int) -> str:
    """Zero-padded, so the ring's keys sort in sequence order."""
    return f"{EVENTS}{seq:0{_SEQ_DIGITS}d}"


def placement_key(model: str, variant: str) -> str:
    return f"{PLACEMENTS}{model}/{variant}"


def node_link_key(node_id: str, replica_id: str) -> str:
    return f"{NODES}{node_id}/{replica_id}"


def node_labels_key(node_id: str) -> str:
    return f"{NODE_LABELS}{node_id}"


def replica_key(replica_id: str) -> str:
    return f"{REPLICAS}{replica_id}"


def prefix_end(prefix: bytes) -> bytes:
    """The etcd ``range_end`` covering every key that starts with ``prefix`` (its last byte
    below 0xff incremented, the rest dropped; ``b"\\0"``, every key, for an all-0xff prefix)."""
    for i in range(len(prefix) - 1, -1, -1):
        if prefix[i] < 0xFF:
            return prefix[:i] + bytes([prefix[i] + 1])
    return b"\0"


def unload_confirmation(count: int, unix_ns: int) -> bytes:
    """The value of ``UNLOAD_CONFIRM``: the count, and when (unique even when a store that lost
    its data counts from 1 again)."""
    return f"{count} {unix_ns}".encode()


def unload_confirmations(value: bytes | None) -> int:
    """How many confirmations ``UNLOAD_CONFIRM``'s value counts (0: absent or unreadable)."""
    head = (value or b"").split(b" ", 1)[0]
    return int(head) if head.isdigit() else 0


def split_key(key: str, prefix: str) -> tuple[str, str]:
    """``prefix + a/b`` -> ``(a, b)``."""
    first, _, second = key[len(prefix) :].partition("/")
    return first, second


def encode(message: Message) -> bytes:
    return json_format.MessageToJson(message, indent=None, sort_keys=True).encode()


def decode(data: bytes, message: M) -> M:
    json_format.Parse(data, message, ignore_unknown_fields=True)
    return message
