"""Location-aware narrowing of the gateway's candidate copies (pure; no I/O).

The zone a query prefers is the one it names (request parameter ``client_zone``, see
:data:`meshserve.common.params.CLIENT_ZONE`), else the gateway's own (``--zone``), else none. Nodes
carry
their zone as the label ``zone`` (``meshserve-node --labels zone=a``).
"""

from __future__ import annotations

from collections.abc import Sequence

from meshserve.common.routing.view import NodeView

__all__ = ["ZONE_LABEL", "prefer_local"]

ZONE_LABEL = "zone"


def prefer_local(candidates: Sequence[NodeView], zone: str) -> list[NodeView]:
    """The candidates to pick among for a query preferring ``zone``.

    Contract:

    * ``zone`` empty: every candidate (no preference).
    * some candidates have ``labels["zone"] == zone``: exactly those.
    * none has: every candidate (fall back to any zone rather than fail the query).

    Order is kept and the input is not modified; the result is empty only when ``candidates``
    is. Callers remove copies already tried *before* narrowing, so a retry falls back to other
    zones once the local copies are exhausted.
    """
    if not zone:
        return list(candidates)
    local = [n for n in candidates if n.labels.get(ZONE_LABEL) == zone]
    return local or list(candidates)
