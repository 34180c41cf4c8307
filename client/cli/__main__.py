"""``python -m meshserve.client.cli`` runs meshctl."""

from meshserve.client.cli import main

main()
