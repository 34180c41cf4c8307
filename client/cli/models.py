"""``meshctl models register | list | remove``: the registry of models, versions and variants.

A model has versions (what a rollout moves); a version has one or more variants (alternatives
SLO switching chooses among). ``register --version V --variant X`` adds variant X of version V
(``--variant`` defaults to the version's name; without ``--version`` the variant joins the
model's implicit version ``default``). The model's first version becomes its ``live`` alias; a
later one takes no traffic until ``meshctl model rollout``. ``list`` prints the tree.

``register`` computes a local artifact's sha256 (so a user names a file, not a digest) and, with
``--wait``, follows each copy's pull and load until the wanted number is READY, exiting 1 when
every placed copy failed or the wait timed out.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from meshserve.client._admin import AdminClient
from meshserve.client.cli._common import (
    DEFAULT_TARGET,
    Output,
    OutputFormat,
    Target,
    admin_client,
    console,
    copy_state,
    emit,
    err_console,
    fail,
    table,
    usage_error,
)
from meshserve.client.cli._records import alias_record, model_record
from meshserve.client.cli.rollout import aliases_table as _aliases_table
from meshserve.common.digest import sha256_file
from meshserve.common.errors import NotFound
from meshserve.protos import mesh_pb2

__all__ = ["list_models", "register", "remove", "show"]


def register(
    name: Annotated[str, typer.Argument(help="the model's name")],
    artifact: Annotated[str, typer.Option(help="path or file:// / http(s):// URI")],
    sha256: Annotated[
        str, typer.Option(help="hex sha256 (computed for local files if omitted)")
    ] = "",
    version: Annotated[
        str, typer.Option(help="the version this variant belongs to (what a rollout moves)")
    ] = "",
    variant: Annotated[
        str, typer.Option(help="the variant's name, unique in the model (default: the version's)")
    ] = "",
    copies: Annotated[int, typer.Option(help="copies to keep READY (without autoscaling)")] = 1,
    selector: Annotated[str, typer.Option(help="node labels required, e.g. tier=edge")] = "",
    batching: Annotated[
        bool, typer.Option(help="dynamic batching (models with a batch axis)")
    ] = False,
    max_batch_size: Annotated[int, typer.Option(help="with --batching: most rows in a batch")] = 32,
    max_queue_delay_us: Annotated[
        int, typer.Option(help="with --batching: longest a query waits for a batch to fill")
    ] = 0,
    cache: Annotated[bool, typer.Option(help="response cache for identical queries")] = False,
    log_predictions: Annotated[
        bool, typer.Option(help="log predictions on the nodes (for feedback and audits)")
    ] = False,
    log_sample_rate: Annotated[float, typer.Option(help="fraction of queries logged")] = 1.0,
    log_inputs: Annotated[
        bool, typer.Option(help="log the inputs themselves, not only a summary")
    ] = False,
    drift_window_rows: Annotated[int, typer.Option(help="rows per drift sketch window")] = 500,
    size_mb: Annotated[
        int,
        typer.Option(help="memory a copy takes, if known (MiB; default: a local file's size)"),
    ] = 0,
    accuracy: Annotated[float, typer.Option(help="the variant's accuracy, 0..1")] = 0.0,
    slo_ms: Annotated[
        float, typer.Option(help="default latency budget of a query (model switching)")
    ] = 0.0,
    min_copies: Annotated[
        int | None, typer.Option(help="autoscale: at least this many copies (0 = scale to zero)")
    ] = None,
    max_copies: Annotated[int, typer.Option(help="autoscale: at most this many copies")] = 0,
    target_in_flight: Annotated[
        float, typer.Option(help="autoscale: queries in flight per copy to aim at")
    ] = 4.0,
    scale_down_delay_s: Annotated[
        int, typer.Option(help="autoscale: low demand must last this long before a copy goes")
    ] = 30,
    wait: Annotated[
        bool, typer.Option(help="show pull/load progress until copies are ready")
    ] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait with --wait")] = 300.0,
    target: Target = DEFAULT_TARGET,
) -> None:
    """Register (or update) a variant of a model's version; with --wait, follow its copies
    until READY. The model's first version becomes `live`; later ones wait for a rollout."""
    uri = artifact
    size_bytes = size_mb << 20
    if "://" not in artifact:
        path = Path(artifact).resolve()
        if not path.is_file():
            usage_error(f"{artifact}: no such file")
        uri = path.as_uri()
        sha256 = sha256 or sha256_file(path)
        # The placement's memory estimate until a node has measured a copy (never 0 MB).
        size_bytes = size_bytes or path.stat().st_size
    labels = dict(item.split("=", 1) for item in selector.split(",") if "=" in item)
    serving = mesh_pb2.ServingConfig(
        batching=mesh_pb2.BatchingConfig(
            enabled=batching, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us
        ),
        cache=cache,
        monitoring=mesh_pb2.MonitoringConfig(
            log_predictions=log_predictions,
            log_sample_rate=log_sample_rate if log_predictions else 0.0,
            log_inputs=log_inputs,
            drift_window_rows=drift_window_rows,
        ),
    )
    autoscaling = None
    if min_copies is not None or max_copies:
        autoscaling = mesh_pb2.Autoscaling(
            min_copies=min_copies or 0,
            max_copies=max_copies,
            target_in_flight=target_in_flight,
            scale_down_delay_s=scale_down_delay_s,
        )
    with admin_client(target) as admin:
        out = admin.register_model(
            name,
            uri,
            sha256,
            variant=variant,
            version=version,
            copies=copies,
            node_selector=labels,
            serving=serving,
            size_bytes=size_bytes,
            autoscaling=autoscaling,
            accuracy=accuracy,
            slo_ms=slo_ms,
        )
        console.print(_registered_text(out, admin.list_aliases(out.model.name)), highlight=False)
        if wait:
            _follow_copies(admin, out.model.name, out.model.variant, out.model.copies, timeout)


def _version(spec: mesh_pb2.ModelSpec) -> str:
    return spec.version or "default"


def _copies(n: int) -> str:
    return f"{n} cop{'y' if n == 1 else 'ies'}"


def _registered_text(
    out: mesh_pb2.RegisterModelResponse, aliases: list[mesh_pb2.AliasStatus]
) -> str:
    """One line: what was stored and whether it serves the queries that name no version."""
    m = out.model
    verb = "registered" if out.created else "updated"
    text = f"{verb} {m.name} version {_version(m)} variant {m.variant} ({_copies(m.copies)})"
    live = next((s.alias for s in aliases if s.alias.alias == "live"), None)
    if live is not None and live.version == _version(m):
        return text + "; live"
    if live is not None:
        return (
            f"{text}; live stays on {live.version} until "
            f"`meshctl model rollout {m.name} {_version(m)} [--canary PCT]`"
        )
    return text


def _follow_copies(
    admin: AdminClient, model: str, variant: str, copies: int, timeout: float
) -> None:
    """A progress bar per copy (download bytes, then load), until ``copies`` are READY."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    deadline = time.monotonic() + timeout
    bars: dict[str, Any] = {}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=console
    ) as progress:
        while time.monotonic() < deadline:
            ready = 0
            for node in admin.list_nodes():
                for c in node.copies:
                    if (c.model, c.variant) != (model, variant):
                        continue
                    if node.node_id not in bars:
                        bars[node.node_id] = progress.add_task(node.node_id, total=None)
                    state = copy_state(c.state)
                    total = c.bytes_total or None
                    done = c.bytes_total if c.state == mesh_pb2.READY else c.bytes_fetched
                    progress.update(
                        bars[node.node_id],
                        completed=done,
                        total=total,
                        description=f"{node.node_id:12} {state:8}",
                    )
                    ready += c.state == mesh_pb2.READY
            failed = {}
            for p in admin.list_placements(model):
                if p.variant == variant:
                    failed = dict(p.failed)
            if ready >= copies:
                break
            if failed and not ready and len(failed) >= copies:
                progress.stop()
                for node_id, why in failed.items():
                    err_console.print(f"[red]failed[/red] on {node_id}: {why}")
                raise typer.Exit(1)
            time.sleep(0.25)
        else:
            err_console.print(
                f"[yellow]timed out[/yellow] after {timeout:.0f}s; see `meshctl nodes list`"
            )
            raise typer.Exit(1)
    console.print(f"[green]✓[/green] {model}/{variant}: {_copies(copies)} ready")


def list_models(output: Output = OutputFormat.table, target: Target = DEFAULT_TARGET) -> None:
    """The tree: model -> versions (with the aliases pointing at each) -> variants."""
    with admin_client(target) as admin:
        models = admin.list_models()
        names = sorted({m.name for m in models})
        aliases = {n: [s.alias for s in admin.list_aliases(n)] for n in names}
    ordered = sorted(models, key=lambda m: (m.name, _version(m), m.variant))
    records = [model_record(m, aliases.get(m.name, ())) for m in ordered]
    emit(output, {"models": records}, lambda: _models_table(records))


def _models_table(records: list[dict[str, Any]]) -> None:
    t = table("model", "version", "aliases", "variant", "accuracy", "copies", "artifact")
    for r in records:
        t.add_row(
            r["name"],
            r["version"],
            ", ".join(r["aliases"]) or "-",
            r["variant"],
            f"{r['accuracy']:.4f}" if r["accuracy"] else "-",
            str(r["copies"]),
            r["artifact_uri"],
        )
    console.print(t)


def show(
    name: Annotated[str, typer.Argument(help="the model")],
    output: Output = OutputFormat.table,
    target: Target = DEFAULT_TARGET,
) -> None:
    """One model: its variants (by version) and its aliases with each version's readiness."""
    with admin_client(target) as admin:
        specs = [m for m in admin.list_models() if m.name == name]
        if not specs:
            fail(NotFound(f"model {name!r} is not registered"))
        statuses = admin.list_aliases(name)
    ordered = sorted(specs, key=lambda m: (_version(m), m.variant))
    variants = [model_record(m, [s.alias for s in statuses]) for m in ordered]
    record = {"name": name, "variants": variants, "aliases": [alias_record(s) for s in statuses]}

    def render() -> None:
        _models_table(variants)
        _aliases_table(statuses)

    emit(output, record, render)


def remove(
    name: Annotated[str, typer.Argument(help="the model")],
    variant: Annotated[str, typer.Option(help="only this variant (default: all of them)")] = "",
    target: Target = DEFAULT_TARGET,
) -> None:
    """Remove a model (or one variant): its copies are unloaded everywhere."""
    with admin_client(target) as admin:
        removed = admin.remove_model(name, variant)
    console.print(f"removed {removed} variant(s)")
