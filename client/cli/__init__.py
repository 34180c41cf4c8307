"""``meshctl``: the command line of the mesh (one module per command group)."""

from meshserve.client.cli.app import main

__all__ = ["main"]
