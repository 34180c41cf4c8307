"""``meshctl nodes list | drain | confirm-unloads`` and ``meshctl placements list``: where copies
are and should be.

``nodes list`` shows each node's kind (``node``, or ``embedded``: an application running its models
in-process through the SDK, a member that is never placed onto), its state (``serving`` or
``draining``), its admin-side labels (and, marked ``claimed:``, labels its Hello claims that
placement does not match), its direct address (or ``(tunnel)`` for a node without an inbound port),
the replicas holding its streams and its copies with their states. ``placements list`` flags a
placement with fewer READY copies than desired (``2/3 under-replicated``) and names a node that
still serves a copy no placement names (a drained node, until a replacement is READY).
``placements list`` shows what the leader decided: desired copies, chosen nodes, failures (and
when each is retried). ``placements retry MODEL [--node N]`` clears failures by hand: the leader
places the copies there again on its next pass (permanent failures included).
``nodes label NODE key=value ... [--remove key]`` sets a node's admin-side labels: the labels
placement rules (``node_selector``, affinity) match; a node's own ``--labels`` are only claims.
``nodes confirm-unloads`` confirms a mass unload the safety floor holds back (docs/resilience.md):
every replica releases the episode it holds now, without waiting for ``--unload-confirm-s``.
"""

from __future__ import annotations

import time
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
    table,
)
from meshserve.client.cli._placement_view import ready_copies, replication
from meshserve.client.cli._records import node_record, placement_record
from meshserve.protos import mesh_pb2

__all__ = [
    "confirm_unloads",
    "drain",
    "label",
    "list_nodes",
    "list_placements",
    "retry_placements",
]


def list_nodes(output: Output = OutputFormat.table, target: Target = DEFAULT_TARGET) -> None:
    """Every node (and embedded member): kind, state (serving or draining), labels, direct
    address, the replicas holding its streams, memory used/total, and its copies with their
    states."""
    with admin_client(target) as admin:
        nodes = admin.list_nodes()
    records = [node_record(n) for n in nodes]

    def render() -> None:
        ids = max((len(r["node_id"]) for r in records), default=0)
        t = table(
            "node",
            "kind",
            "state",
            "labels",
            "direct",
            "replicas",
            "memory",
            "copies",
            whole={"node": ids, "kind": len("embedded"), "state": len("draining")},
        )
        for r in records:
            copies = ", ".join(f"{c['model']}/{c['variant']}:{c['state']}" for c in r["copies"])
            labels = ",".join(f"{k}={v}" for k, v in r["labels"].items())
            if r["claimed_labels"]:
                labels += " claimed:" + ",".join(f"{k}={v}" for k, v in r["claimed_labels"].items())
            state = r["state"]
            t.add_row(
                r["node_id"],
                r["kind"],
                f"[yellow]{state}[/yellow]" if r["draining"] else state,
                labels,
                r["direct_address"] or "(tunnel)",
                ",".join(r["replicas"]),
                _memory(r["memory_used_bytes"], r["memory_total_bytes"]),
                copies,
            )
        console.print(t)

    emit(output, {"nodes": records}, render)


def _memory(used: int | None, total: int | None) -> str:
    """``0.2/15.5 GiB`` (the node's RSS / what it offers placement); ``?/15.5 GiB`` with the
    total only; ``-`` when unknown."""
    if total is None:
        return "-"
    gib = 1 << 30
    return f"{'?' if used is None else f'{used / gib:.1f}'}/{total / gib:.1f} GiB"


def drain(
    node_id: Annotated[str, typer.Argument(help="the node")],
    undo: Annotated[bool, typer.Option("--undo", help="undrain instead")] = False,
    target: Target = DEFAULT_TARGET,
) -> None:
    """Drain a node: no new copies or queries; its copies move elsewhere (in-flight ones finish)."""
    with admin_client(target) as admin:
        draining = admin.drain_node(node_id, undrain=undo)
    console.print(f"node {node_id}: {'draining' if draining else 'serving'}")


def label(
    node_id: Annotated[str, typer.Argument(help="the node")],
    labels: Annotated[list[str] | None, typer.Argument(help="KEY=VALUE labels to set")] = None,
    remove: Annotated[
        list[str] | None, typer.Option("--remove", help="a label key to remove (repeatable)")
    ] = None,
    target: Target = DEFAULT_TARGET,
) -> None:
    """Set or remove a node's admin-side labels: what placement rules match (a node that has not
    joined yet may be labelled too)."""
    pairs: dict[str, str] = {}
    for item in labels or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r}: expected KEY=VALUE (remove with --remove KEY)")
        pairs[key] = value
    with admin_client(target) as admin:
        now = admin.label_node(node_id, pairs, remove=remove or [])
    text = ",".join(f"{k}={v}" for k, v in sorted(now.items())) or "(none)"
    console.print(f"node {node_id}: admin labels {text}")


def confirm_unloads(target: Target = DEFAULT_TARGET) -> None:
    """Confirm the mass unload the safety floor holds back (after checking the view is right:
    `meshctl events --kind unload_floor`): every replica sends the held Unloads now."""
    with admin_client(target) as admin:
        out = admin.confirm_unloads()
    if out.held:
        console.print(
            f"confirmation #{out.confirmation}: {out.released} held unloads released on "
            f"{out.replica_id} (every replica releases its own)"
        )
    else:
        console.print(
            f"confirmation #{out.confirmation}: nothing held on {out.replica_id} (every replica "
            "releases the mass unload it holds now; a later one needs a new confirmation)"
        )


def list_placements(
    model: Annotated[str, typer.Option(help="only this model (default: every model)")] = "",
    output: Output = OutputFormat.table,
    target: Target = DEFAULT_TARGET,
) -> None:
    """What the leader decided per variant: READY copies of desired (marked under-replicated
    when fewer), chosen nodes, failures and when each is retried."""
    with admin_client(target) as admin:
        placements = admin.list_placements(model)
        ready = ready_copies(admin.list_nodes())
    records = [placement_record(p, ready) for p in placements]

    def render() -> None:
        t = table(
            "model", "variant", "ready/desired", "nodes", "failed", whole={"ready/desired": 20}
        )
        for p in placements:
            failed = "; ".join(_failure(p, k, v) for k, v in p.failed.items())
            r = replication(p, ready)
            nodes = "; ".join(filter(None, (", ".join(p.nodes), r.note())))
            cell = f"[red]{r.cell()}[/red]" if r.under else r.cell()
            t.add_row(p.model, p.variant, cell, nodes, failed)
        console.print(t)

    emit(output, {"placements": records}, render)


def _failure(p: mesh_pb2.Placement, node_id: str, reason: str) -> str:
    record = p.failures.get(node_id)
    if record is None:
        return f"{node_id}: {reason}"
    if record.permanent:
        retry = f"meshctl placements retry {p.model} --node {node_id}"
        return f"{node_id}: {reason} (permanent; {retry})"
    at = time.strftime("%H:%M:%S UTC", time.gmtime(record.retry_unix_ms / 1000))
    return f"{node_id}: {reason} (attempt {record.attempts}; retry at {at})"


def retry_placements(
    model: Annotated[str, typer.Argument(help="the model whose failed copies to retry")],
    node: Annotated[str, typer.Option("--node", help="only this node (default: every node)")] = "",
    variant: Annotated[str, typer.Option("--variant", help="only this variant")] = "",
    target: Target = DEFAULT_TARGET,
) -> None:
    """Retry a model's failed copies now: clears their failure records (transient or
    permanent) so the leader places them on those nodes again on its next pass."""
    with admin_client(target) as admin:
        retried = admin.retry_placements(model, variant=variant, node_id=node)
    if not retried:
        console.print(f"{model}: no failed copy to retry; retries asked for all the same")
        return
    for r in retried:
        kind = "permanent" if r.permanent else "transient"
        console.print(f"{model}/{r.variant} on {r.node_id}: retrying ({kind}: {r.reason})")
