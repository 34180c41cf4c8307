"""``meshctl models rollout | rollback | aliases``: moving an alias between versions.

``rollout`` points an alias (default ``live``) at a version, or gives it a canary share; with
``--wait`` it follows the version's readiness until traffic has shifted, and exits 1 on a timeout,
on a version that failed on every node, or when someone else changed the alias meanwhile (the
Admin API reads etcd, so a different alias is a change, not a lagging view).
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from meshserve.client._admin import AdminClient
from meshserve.client.cli._common import (
    DEFAULT_TARGET,
    Output,
    OutputFormat,
    Target,
    admin_client,
    console,
    emit,
    err_console,
    table,
)
from meshserve.client.cli._records import alias_record
from meshserve.protos import mesh_pb2

__all__ = ["aliases", "aliases_table", "rollback", "rollout"]


def rollout(
    name: Annotated[str, typer.Argument(help="the model")],
    version: Annotated[str, typer.Argument(help="a registered version of it")],
    alias: Annotated[str, typer.Option(help="the alias to move")] = "live",
    canary: Annotated[
        float,
        typer.Option(
            help="send only this percentage of the alias's queries to VERSION (0 < PCT < 100); "
            "0 or 100: all of them"
        ),
    ] = 0.0,
    wait: Annotated[
        bool, typer.Option(help="follow until VERSION's copies are READY and traffic shifted")
    ] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait with --wait")] = 300.0,
    target: Target = DEFAULT_TARGET,
) -> None:
    """Point an alias (default: live, what queries naming no version follow) at VERSION, a
    registered version (all its variants). Its copies load and warm first; traffic shifts once
    they are READY. With --canary PCT only that share of the alias's queries goes to VERSION."""
    with admin_client(target) as admin:
        status = admin.rollout(name, version, alias=alias, canary_percent=canary)
        console.print(f"{name}/{alias}: {_alias_text(status)}")
        if wait:
            _follow_rollout(admin, name, alias, version, timeout)


def _alias_text(status: mesh_pb2.AliasStatus) -> str:
    a = status.alias
    text = f"-> {a.version}, serving {status.serving or '-'}"
    if a.canary_version:
        state = "active" if status.canary_active else "waiting for ready copies"
        text += f", canary {a.canary_version} {a.canary_percent:g}% ({state})"
    return text


def _follow_rollout(
    admin: AdminClient, model: str, alias: str, version: str, timeout: float
) -> None:
    """Poll until ``version`` takes the alias's traffic (or its canary share), printing each
    change of its readiness; exit 1 on a timeout, a failed version or a concurrent change."""
    deadline = time.monotonic() + timeout
    last, canary, percent = "", False, 0.0
    with console.status(f"rolling {model}/{alias} to {version}") as spinner:
        while True:
            status = next((s for s in admin.list_aliases(model) if s.alias.alias == alias), None)
            a = status.alias if status is not None else mesh_pb2.Alias()
            canary, percent = a.canary_version == version, a.canary_percent
            if status is None or (a.version != version and not canary):
                spinner.stop()  # the Admin API reads etcd: this is a change, not a lagging view
                now = _alias_text(status) if status is not None else "removed"
                err_console.print(f"[red]error[/red] {model}/{alias} was changed meanwhile: {now}")
                raise typer.Exit(1)
            ready = {v.version: v for v in status.versions}.get(version)
            line = f"{version}: not placed yet; serving {status.serving or '-'}"
            if ready is not None:
                line = (
                    f"{version}: {ready.ready}/{ready.wanted} copies ready; "
                    f"serving {status.serving or '-'}"
                )
            if line != last:
                console.print(line, highlight=False)
                spinner.update(line)
                last = line
            if status.canary_active if canary else status.serving == version:
                break
            failed = _failed_everywhere(admin, model, version)
            if failed:
                spinner.stop()
                for node_id, why in failed.items():
                    err_console.print(f"[red]failed[/red] {version} on {node_id}: {why}")
                raise typer.Exit(1)
            if time.monotonic() >= deadline:
                spinner.stop()
                err_console.print(
                    f"[yellow]timed out[/yellow] after {timeout:.0f}s; the rollout goes on "
                    f"(meshctl model aliases {model})"
                )
                raise typer.Exit(1)
            time.sleep(0.25)
    share = f"{percent:g}% of " if canary else ""
    console.print(f"[green]✓[/green] {model}/{alias}: {share}traffic on {version}")


def _failed_everywhere(admin: AdminClient, model: str, version: str) -> dict[str, str]:
    """Why ``version``'s copies failed, when one of its variants failed on every node it was
    placed on."""
    variants = {
        m.variant
        for m in admin.list_models()
        if m.name == model and (m.version or "default") == version
    }
    for p in admin.list_placements(model):
        if p.variant in variants and p.failed and not p.nodes:
            return dict(p.failed)
    return {}


def rollback(
    name: Annotated[str, typer.Argument(help="the model")],
    alias: Annotated[str, typer.Option(help="the alias to roll back")] = "live",
    target: Target = DEFAULT_TARGET,
) -> None:
    """Drop the alias's canary, else point it back at its previous version: instant, as that
    version's copies stay loaded."""
    with admin_client(target) as admin:
        status = admin.rollback(name, alias=alias)
    console.print(f"{name}/{alias}: {_alias_text(status)}")


def aliases(
    name: Annotated[str, typer.Argument(help="the model")],
    output: Output = OutputFormat.table,
    target: Target = DEFAULT_TARGET,
) -> None:
    """A model's aliases: the version each points at, the one serving now, canary, readiness."""
    with admin_client(target) as admin:
        statuses = admin.list_aliases(name)
    emit(output, {"aliases": [alias_record(s) for s in statuses]}, lambda: aliases_table(statuses))


def aliases_table(statuses: list[mesh_pb2.AliasStatus]) -> None:
    """The aliases of a model as a table (``models aliases``, ``models show``)."""
    t = table("alias", "version", "serving", "canary", "previous", "copies ready", "why")
    # a version's readiness sums its variants', named after it: "v2 [v2, v2-int8] 2/2"
    for s in statuses:
        a = s.alias
        canary = f"{a.canary_version} {a.canary_percent:g}%" if a.canary_version else "-"
        if a.canary_version and not s.canary_active:
            canary += " (not ready)"
        ready = ", ".join(
            f"{v.version} [{', '.join(v.variants)}] {v.ready}/{v.wanted}" for v in s.versions
        )
        t.add_row(a.alias, a.version, s.serving, canary, a.previous_version or "-", ready, s.reason)
    console.print(t)
