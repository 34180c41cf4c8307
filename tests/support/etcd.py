"""Real-etcd test fixture support: a thin re-export of :mod:`meshserve.devtools.etcd`.

``EtcdServer`` is :class:`~meshserve.devtools.etcd.EtcdProcess`: ``.url``, ``.stop()``,
``.kill()``, ``.restart()`` (same ports and data dir), ``.close()``; logs go to
``<workdir>/etcd.log``. ``EtcdServer(secure=True)``: TLS, client certificates and auth on
(``.client_auth()`` connects; ``.issue_client_cert(cn)`` makes a certificate naming no user).
"""

from __future__ import annotations

from meshserve.devtools.etcd import (
    EtcdNotFoundError,
    EtcdProcess,
    EtcdStartError,
    find_etcd_binary,
)


class EtcdServer(EtcdProcess):
    """A throw-away single-member etcd on free loopback ports (see ``EtcdProcess``)."""


__all__ = ["EtcdNotFoundError", "EtcdProcess", "EtcdServer", "EtcdStartError", "find_etcd_binary"]
