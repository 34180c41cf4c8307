"""The command-line options every gateway takes, the replica's embedded one and a standalone
``meshserve-gateway`` alike (one definition, so their flags and defaults cannot drift)."""

from __future__ import annotations

import argparse

__all__ = ["add_gateway_options"]


def add_gateway_options(p: argparse.ArgumentParser) -> None:
    """``--zone``, ``--max-in-flight-per-copy``, ``--max-in-flight-per-client``."""
    p.add_argument(
        "--zone",
        default="",
        help="this gateway's zone: queries naming no client_zone prefer copies on nodes "
        "labelled zone=<this> (default: no preference)",
    )
    p.add_argument(
        "--max-in-flight-per-copy",
        type=int,
        default=128,
        help="admission: queries a model may have in flight at this gateway, per ready copy; "
        "beyond, RESOURCE_EXHAUSTED at once with a retry-after hint (0: no limit)",
    )
    p.add_argument(
        "--max-in-flight-per-client",
        type=int,
        default=1024,
        help="admission: queries one client may have in flight at this gateway: with API keys "
        "its tenant; without, its x-client-id metadata (its own choice), else its host "
        "(0: no limit)",
    )
