"""The placement policy in force on this replica, hot-reloaded from the mirrored YAML.

Contract:

* :meth:`PolicySource.current` returns the policy stored at ``keys.POLICY`` as this replica's
  mirror holds it, or the built-in :data:`~meshserve.common.policy.config.DEFAULT_POLICY` when
  none is stored. The YAML is parsed once per change (per mod revision of the key), not per call.
* A stored policy that does not parse (written around the Admin API, which validates) is logged
  and the last good one stays in force; a deleted policy brings the default back.
* No I/O of its own: it reads the mirror it is given (at call time: the replica opens its mirrors
  after building this) and never raises for what is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from meshserve.common.policy.config import DEFAULT_POLICY, Policy, PolicyError, parse_policy
from meshserve.controlplane import keys

__all__ = ["PolicySource", "StoredPolicy"]

_log = logging.getLogger("meshserve.controlplane")


class StoredPolicy(Protocol):
    """What is read of the policy's mirror (a :class:`~meshserve.controlplane.etcd.PrefixMirror`
    of ``keys.POLICY``)."""

    def items(self) -> Mapping[str, bytes]: ...

    def mod_revisions(self) -> Mapping[str, int]: ...


class PolicySource:
    """The policy in force (see the module contract)."""

    def __init__(self, mirror: Callable[[], StoredPolicy]) -> None:
        """``mirror``: returns the mirror of ``keys.POLICY``; called at every :meth:`current`."""
        self._mirror = mirror
        self._last: tuple[int, Policy] = (0, DEFAULT_POLICY)  # (mod revision, policy): one swap

    def current(self) -> Policy:
        mirror = self._mirror()
        revision = mirror.mod_revisions().get(keys.POLICY, 0)
        last_revision, last = self._last
        if revision == last_revision:
            return last
        text = mirror.items().get(keys.POLICY)
        try:
            policy = DEFAULT_POLICY if text is None else parse_policy(text.decode())
        except (PolicyError, UnicodeDecodeError) as exc:
            _log.error("stored policy (rev %d) is invalid, keeping the last: %s", revision, exc)
            policy = last
        else:
            _log.info("placement policy %r in force (rev %d)", policy.name, revision)
        self._last = (revision, policy)
        return policy
