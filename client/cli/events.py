"""``meshctl events``: the decision log (placements, scaling, evictions, drains, policy changes,
drift and accuracy alarms), newest last; ``--follow`` polls and prints each new event once, in
sequence order, until Ctrl-C or a status that retrying cannot fix: a control plane that is
restarting (UNAVAILABLE, DEADLINE_EXCEEDED) is waited out with backoff, saying so once, and the
follow resumes after the last event printed.
"""

from __future__ import annotations

import datetime
from typing import Annotated

import typer
from rich.table import Table

from meshserve.client.cli._common import DEFAULT_TARGET, Target, admin_client, console
from meshserve.protos import mesh_pb2

__all__ = ["events"]


def _row(e: mesh_pb2.Event) -> list[str]:
    when = datetime.datetime.fromtimestamp(e.unix_ms / 1000).strftime("%H:%M:%S.%f")[:-3]
    model_name = f"{e.model}/{e.variant}" if e.model else ""
    return [str(e.seq), when, e.kind, model_name, e.node_id, e.message, e.replica_id]


def events(
    limit: int = 50,
    kind: str = "",
    model: str = "",
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="keep printing new events; waits out a control plane that restarts (Ctrl-C stops)",
        ),
    ] = False,
    interval_s: Annotated[float, typer.Option(help="poll interval with --follow")] = 1.0,
    target: Target = DEFAULT_TARGET,
) -> None:
    """The decision log: placements, scaling, evictions, drains, policy changes, drift and
    accuracy alarms (newest last)."""
    with admin_client(target) as admin:
        if not follow:
            _table(admin.list_events(limit, kind, model))
            return
        polls = admin.follow_events(
            limit, kind, model, interval_s=max(0.1, interval_s), on_state=_notice
        )
        try:
            _table(next(polls))
            for batch in polls:
                for e in batch:
                    console.print("  ".join(_row(e)), highlight=False)
        except KeyboardInterrupt:
            return


def _table(items: list[mesh_pb2.Event]) -> None:
    table = Table("seq", "time", "kind", "model", "node", "message", "replica")
    for e in items:
        table.add_row(*_row(e))
    console.print(table)


def _notice(line: str) -> None:
    console.print(f"[yellow]{line}[/yellow]", highlight=False)
