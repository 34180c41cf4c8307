"""The etcd key schema (see docs/etcd-schema.md) and value codecs.

Values are protobuf messages stored as JSON (readable with ``etcdctl get --prefix /meshserve``).
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

__all__ = [
    "ALIASES",
    "DRAINING",
    "EVENTS",
    "LEADER",
    "MODELS",
    "NODES",
    "PLACEMENTS",
    "POLICY",
    "REPLICAS",
    "WAKE",
    "alias_key",
    "decode",
    "encode",
    "model_key",
    "node_link_key",
    "placement_key",
    "replica_key",
    "split_key",
]

ROOT = "/meshserve/"
MODELS = ROOT + "models/"  # models/<model>/<variant>      -> ModelSpec   (admin)
PLACEMENTS = ROOT + "placements/"  # placements/<model>/<variant>  -> Placement   (leader)
NODES = ROOT + "nodes/"  # nodes/<node>/<replica>        -> NodeInfo    (leased, hub)
REPLICAS = ROOT + "replicas/"  # replicas/<replica>            -> ReplicaInfo (leased)
LEADER = ROOT + "leader"  # the elected scheduler's replica id (leased)
POLICY = ROOT + "policy"  # the placement policy, YAML text as applied (admin)
EVENTS = ROOT + "events/"  # events/<seq, 20 digits>       -> Event       (ring, any replica)
WAKE = ROOT + "wake/"  # wake/<model>/<variant>         -> unix ms (leased; gateway: scale from 0)
DRAINING = ROOT + "draining/"  # draining/<node>               -> "" (admin; present = draining)
ALIASES = ROOT + "aliases/"  # aliases/<model>/<alias>        -> Alias       (admin)

M = TypeVar("M", bound=Message)


def model_key(model: str, variant: str) -> str:
    return f"{MODELS}{model}/{variant}"


def alias_key(model: str, alias: str) -> str:
    return f"{ALIASES}{model}/{alias}"


def placement_key(model: str, variant: str) -> str:
    return f"{PLACEMENTS}{model}/{variant}"


def node_link_key(node_id: str, replica_id: str) -> str:
    return f"{NODES}{node_id}/{replica_id}"


def replica_key(replica_id: str) -> str:
    return f"{REPLICAS}{replica_id}"


def split_key(key: str, prefix: str) -> tuple[str, str]:
    """``prefix + a/b`` -> ``(a, b)``."""
    first, _, second = key[len(prefix) :].partition("/")
    return first, second


def encode(message: Message) -> bytes:
    return json_format.MessageToJson(message, indent=None, sort_keys=True).encode()


def decode(data: bytes, message: M) -> M:
    json_format.Parse(data, message, ignore_unknown_fields=True)
    return message
