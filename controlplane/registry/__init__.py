"""The registry seam: every etcd write of the control plane, behind one typed interface.

:class:`Registry` (the contract: which writes exist and the rules they follow — racing writes
are single transactions) is in :mod:`.contract`; :class:`EtcdRegistry` implements it on an etcd
client in :mod:`.etcd_registry`. No other module of the control plane writes to etcd except
:mod:`meshserve.controlplane.etcd` (sessions, elections). See docs/etcd-schema.md.
"""

from meshserve.controlplane.registry.contract import (
    CAS_ATTEMPTS,
    TXN_OPS,
    AliasPlan,
    Registry,
    SeqCounter,
    VariantKey,
)
from meshserve.controlplane.registry.etcd_registry import EtcdRegistry

__all__ = [
    "CAS_ATTEMPTS",
    "TXN_OPS",
    "AliasPlan",
    "EtcdRegistry",
    "Registry",
    "SeqCounter",
    "VariantKey",
]
