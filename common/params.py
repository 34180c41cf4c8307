"""Reserved Open Inference Protocol request/response parameter names used between the SDK, the
gateway and the nodes (one place, so the hops cannot drift apart)."""

from __future__ import annotations

from typing import Final

__all__ = ["CLIENT_ZONE", "PREFER"]

# Set by the gateway on a query it switched to a less accurate variant: the more accurate
# acceptable variants (most accurate first) whose cached answer the node may return instead.
PREFER: Final = "meshserve_prefer"

# Set by a client (SDK keyword ``zone=``) on a query: the zone it runs in (a string). The gateway
# prefers ready copies on nodes labelled with that ``zone`` (see
# meshserve.common.routing.locality).
CLIENT_ZONE: Final = "client_zone"
