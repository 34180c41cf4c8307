"""Real-etcd test fixture support: a thin re-export of :mod:`controlplane.etcd.server`.

``EtcdServer`` is :class:`~controlplane.etcd.server.EtcdProcess`: ``.url``, ``.stop()``,
``.kill()``, ``.restart()`` (same ports and data dir), ``.close()``; logs go to
``<workdir>/etcd.log``.
"""

from __future__ import annotations

from controlplane.etcd.server import (
    EtcdNotFoundError,
    EtcdProcess,
    EtcdStartError,
    find_etcd_binary,
)


class EtcdServer(EtcdProcess):
    """A throw-away single-member etcd on free loopback ports (see ``EtcdProcess``)."""


__all__ = ["EtcdNotFoundError", "EtcdProcess", "EtcdServer", "EtcdStartError", "find_etcd_binary"]
