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

from meshserve.client.cli._common import (
    DEFAULT_TARGET,
    Output,
    OutputFormat,
    Target,
    admin_client,
    console,
    emit,
    emit_line,
    err_console,
    table,
)
from meshserve.client.cli._records import event_record
from meshserve.protos import mesh_pb2

__all__ = ["events"]


def _row(e: mesh_pb2.Event) -> list[str]:
    when = datetime.datetime.fromtimestamp(e.unix_ms / 1000).strftime("%H:%M:%S.%f")[:-3]
    model_name = f"{e.model}/{e.variant}" if e.model else ""
    return [str(e.seq), when, e.kind, model_name, e.node_id, e.message, e.replica_id]


def events(
    limit: Annotated[int, typer.Option(help="at most this many events (the newest)")] = 50,
    kind: Annotated[
        str, typer.Option(help="only events of this kind (placement, scale, drain, policy, ...)")
    ] = "",
    model: Annotated[str, typer.Option(help="only events about this model")] = "",
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="keep printing new events; waits out a control plane that restarts (Ctrl-C stops)",
        ),
    ] = False,
    interval_s: Annotated[float, typer.Option(help="poll interval with --follow")] = 1.0,
    output: Output = OutputFormat.table,
    target: Target = DEFAULT_TARGET,
) -> None:
    """The decision log: placements, scaling, evictions, drains, policy changes, drift and
    accuracy alarms (newest last). With --follow and -o json: one JSON object per line."""
    with admin_client(target) as admin:
        if not follow:
            items = admin.list_events(limit, kind, model)
            emit(output, {"events": [event_record(e) for e in items]}, lambda: _table(items))
            return
        polls = admin.follow_events(
            limit, kind, model, interval_s=max(0.1, interval_s), on_state=_notice
        )
        try:
            first = next(polls)
            if output is OutputFormat.table:
                _table(first)
            else:
                for e in first:
                    emit_line(output, event_record(e), "")
            for batch in polls:
                for e in batch:
                    emit_line(output, event_record(e), "  ".join(_row(e)))
        except KeyboardInterrupt:
            return


def _table(items: list[mesh_pb2.Event]) -> None:
    t = table("seq", "time", "kind", "model", "node", "message", "replica")
    for e in items:
        t.add_row(*_row(e))
    console.print(t)


def _notice(line: str) -> None:
    err_console.print(f"[yellow]{line}[/yellow]", highlight=False)
