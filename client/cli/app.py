"""``meshctl``: operate a meshserve mesh (and run a local one with ``meshctl up``)."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from meshserve.client._admin import AdminClient
from meshserve.common.errors import StatusError
from meshserve.common.security import SecurityConfigError, TLSFiles, read_secret
from meshserve.protos import mesh_pb2

if TYPE_CHECKING:
    from meshserve.client import MeshClient

app = typer.Typer(help="Operate a meshserve mesh.", no_args_is_help=True, add_completion=False)
models_app = typer.Typer(
    help="Register, evaluate, roll out, list and remove models.", no_args_is_help=True
)
nodes_app = typer.Typer(help="List, drain and undrain nodes.", no_args_is_help=True)
placements_app = typer.Typer(help="List placements.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(models_app, name="model", hidden=True)  # `meshctl model evaluate` reads naturally
app.add_typer(nodes_app, name="nodes")
app.add_typer(placements_app, name="placements")
policy_app = typer.Typer(
    help="Validate, apply and show the placement policy.", no_args_is_help=True
)
explain_app = typer.Typer(help="Explain control-plane decisions.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
app.add_typer(explain_app, name="explain")

_console = Console()
Target = Annotated[
    str, typer.Option("--target", "-t", envvar="MESHSERVE_TARGET", help="control-plane address")
]


@dataclass(frozen=True)
class _Security:
    """The global credential options (``meshctl --tls-ca ... COMMAND``), secrets hidden."""

    tls: TLSFiles | None = None
    admin_token: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)


#: Set by the global options callback for the command that follows it.
_SECURITY: ContextVar[_Security] = ContextVar("meshctl_security")


def _security() -> _Security:
    return _SECURITY.get(_Security())


@app.callback()
def _global_options(
    admin_token_file: Annotated[
        Path | None,
        typer.Option(
            envvar="MESHSERVE_ADMIN_TOKEN_FILE",
            help="file holding the admin token (or set MESHSERVE_ADMIN_TOKEN)",
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            envvar="MESHSERVE_API_KEY_FILE",
            help="file holding a tenant API key for queries (or set MESHSERVE_API_KEY)",
        ),
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            envvar="MESHSERVE_TLS_CA", help="CA the control plane's certificate chains to"
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(envvar="MESHSERVE_TLS_CERT", help="client certificate (mutual TLS)"),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(envvar="MESHSERVE_TLS_KEY", help="key of --tls-cert")
    ] = None,
) -> None:
    """Operate a meshserve mesh. Credentials (docs/security.md) apply to every command."""
    try:
        security = _Security(
            tls=TLSFiles.from_options(tls_ca, tls_cert, tls_key),
            admin_token=(
                read_secret(admin_token_file, "admin token file")
                if admin_token_file
                else os.environ.get("MESHSERVE_ADMIN_TOKEN") or None
            ),
            api_key=(
                read_secret(api_key_file, "API key file")
                if api_key_file
                else os.environ.get("MESHSERVE_API_KEY") or None
            ),
        )
    except SecurityConfigError as exc:
        _console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(2) from None
    _SECURITY.set(security)


def _client(target: str, timeout: float) -> MeshClient:
    """A MeshClient with the global credentials."""
    from meshserve.client import MeshClient

    sec = _security()
    return MeshClient(target, timeout=timeout, tls=sec.tls, api_key=sec.api_key)


@contextlib.contextmanager
def _admin(target: str) -> Iterator[AdminClient]:
    """An AdminClient (with the global credentials) whose errors end the command with their
    status (exit code 1)."""
    sec = _security()
    with AdminClient(target, tls=sec.tls, token=sec.admin_token) as admin:
        try:
            yield admin
        except StatusError as exc:
            _fail(exc)


def _fail(exc: StatusError) -> None:
    _console.print(f"[red]error[/red] {exc.code.name}: {exc.message}")
    raise typer.Exit(1)


def _state(state: int) -> str:
    return mesh_pb2.CopyState.Name(state)  # type: ignore[arg-type]


@models_app.command("register")
def models_register(
    name: str,
    artifact: Annotated[str, typer.Option(help="path or file:// / http(s):// URI")],
    sha256: Annotated[
        str, typer.Option(help="hex sha256 (computed for local files if omitted)")
    ] = "",
    variant: str = "default",
    copies: int = 1,
    selector: Annotated[str, typer.Option(help="node labels required, e.g. tier=edge")] = "",
    batching: Annotated[
        bool, typer.Option(help="dynamic batching (models with a batch axis)")
    ] = False,
    max_batch_size: int = 32,
    max_queue_delay_us: int = 0,
    cache: Annotated[bool, typer.Option(help="response cache for identical queries")] = False,
    log_predictions: Annotated[
        bool, typer.Option(help="log predictions on the nodes (for feedback and audits)")
    ] = False,
    log_sample_rate: Annotated[float, typer.Option(help="fraction of queries logged")] = 1.0,
    log_inputs: Annotated[
        bool, typer.Option(help="log the inputs themselves, not only a summary")
    ] = False,
    drift_window_rows: Annotated[int, typer.Option(help="rows per drift sketch window")] = 500,
    size_mb: Annotated[int, typer.Option(help="memory a copy takes, if known (MiB)")] = 0,
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
    target: Target = "127.0.0.1:8001",
) -> None:
    """Register (or update) a model variant; with --wait, follow its copies until READY."""
    from meshserve.devtools.demo_models import sha256_file

    uri = artifact
    if "://" not in artifact:
        path = Path(artifact).resolve()
        if not path.is_file():
            _console.print(f"[red]error[/red] {artifact}: no such file")
            raise typer.Exit(2)
        uri = path.as_uri()
        sha256 = sha256 or sha256_file(path)
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
    with _admin(target) as admin:
        out = admin.register_model(
            name,
            uri,
            sha256,
            variant=variant,
            copies=copies,
            node_selector=labels,
            serving=serving,
            size_bytes=size_mb << 20,
            autoscaling=autoscaling,
            accuracy=accuracy,
            slo_ms=slo_ms,
        )
        verb = "registered" if out.created else "updated"
        _console.print(f"{verb} {out.model.name}/{out.model.variant} ({out.model.copies} copies)")
        if wait:
            _follow_copies(admin, out.model.name, out.model.variant, out.model.copies, timeout)


def _follow_copies(
    admin: AdminClient, model: str, variant: str, copies: int, timeout: float
) -> None:
    """A progress bar per copy (download bytes, then load), until ``copies`` are READY."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    deadline = time.monotonic() + timeout
    bars: dict[str, Any] = {}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=_console
    ) as progress:
        while time.monotonic() < deadline:
            ready = 0
            for node in admin.list_nodes():
                for c in node.copies:
                    if (c.model, c.variant) != (model, variant):
                        continue
                    if node.node_id not in bars:
                        bars[node.node_id] = progress.add_task(node.node_id, total=None)
                    state = _state(c.state)
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
                    _console.print(f"[red]failed[/red] on {node_id}: {why}")
                raise typer.Exit(1)
            time.sleep(0.25)
        else:
            _console.print(
                f"[yellow]timed out[/yellow] after {timeout:.0f}s; see `meshctl nodes list`"
            )
            raise typer.Exit(1)
    _console.print(
        f"[green]✓[/green] {model}/{variant}: {copies} cop{'y' if copies == 1 else 'ies'} ready"
    )


@models_app.command("evaluate")
def models_evaluate(
    name: str,
    data: Annotated[Path, typer.Option(help=".npz with the inputs (by input name) and labels")],
    variant: str = "default",
    labels: Annotated[str, typer.Option(help="array in --data holding the true labels")] = "y",
    output: Annotated[
        str, typer.Option(help="output to compare (default: an integer output, else argmax)")
    ] = "",
    batch: int = 64,
    update: Annotated[bool, typer.Option(help="store the measured accuracy on the variant")] = True,
    target: Target = "127.0.0.1:8001",
) -> None:
    """Measure a variant's accuracy on a labelled file, through the mesh; store it (--update)."""
    from rich.progress import Progress

    arrays = _load_npz(data)
    if labels not in arrays:
        _console.print(f"[red]error[/red] {data} has no {labels!r} array (has {sorted(arrays)})")
        raise typer.Exit(2)
    truth = arrays.pop(labels).reshape(-1)
    rows = len(truth)
    if rows == 0 or any(len(a) != rows for a in arrays.values()):
        _console.print("[red]error[/red] inputs and labels must have the same number of rows (> 0)")
        raise typer.Exit(2)
    correct = 0
    try:
        with _client(target, 60) as client, Progress(console=_console) as bar:
            task = bar.add_task(f"evaluating {name}/{variant}", total=rows)
            for start in range(0, rows, max(1, batch)):
                part = {k: v[start : start + batch] for k, v in arrays.items()}
                result = client.infer(name, part, version=variant)
                predicted = _predicted_labels(result, output)
                correct += int((predicted == truth[start : start + batch]).sum())
                bar.advance(task, len(predicted))
    except StatusError as exc:
        _fail(exc)
        return
    accuracy = correct / rows
    _console.print(f"{name}/{variant}: accuracy {accuracy:.4f} on {rows} labelled rows")
    if not update:
        return
    with _admin(target) as admin:
        spec = next(
            (m for m in admin.list_models() if m.name == name and m.variant == variant), None
        )
        if spec is None:
            _console.print(f"[red]error[/red] {name}/{variant} is not registered")
            raise typer.Exit(1)
        spec.accuracy = accuracy
        admin.register_spec(spec)
    _console.print(f"stored accuracy {accuracy:.4f} on {name}/{variant}")


def _load_npz(data: Path) -> dict[str, Any]:
    try:
        with np.load(data, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        _console.print(f"[red]error[/red] cannot read {data}: {exc}")
        raise typer.Exit(2) from None


@models_app.command("profile")
def models_profile(
    name: str,
    data: Annotated[Path, typer.Option(help=".npz sample of production-like inputs, by name")],
    variant: str = "default",
    input_name: Annotated[
        str, typer.Option("--input", help="input to profile (default: the only/first one)")
    ] = "",
    bins: Annotated[int, typer.Option(help="quantile bins per feature")] = 10,
    outputs: Annotated[
        bool, typer.Option(help="also profile the predictions (queries the mesh with the sample)")
    ] = True,
    batch: int = 64,
    target: Target = "127.0.0.1:8001",
) -> None:
    """Store a drift reference for a variant: quantile-bin sketches of each input feature (and of
    the predictions) of a sample you give. Only these sketches are stored and sent to nodes."""
    from meshserve.common.sketches import build_profile, prediction_of

    arrays = _load_npz(data)
    if not arrays:
        _console.print(f"[red]error[/red] {data} holds no arrays")
        raise typer.Exit(2)
    chosen = input_name or next(iter(arrays))
    if chosen not in arrays:
        _console.print(f"[red]error[/red] {data} has no {chosen!r} array (has {sorted(arrays)})")
        raise typer.Exit(2)
    rows = len(arrays[chosen])
    predictions, classes = None, True
    if outputs:
        parts = []
        try:
            with _client(target, 60) as client:
                for start in range(0, rows, max(1, batch)):
                    part = {k: v[start : start + batch] for k, v in arrays.items()}
                    result = client.infer(name, part, version=variant)
                    values, classes = prediction_of(np.asarray(next(iter(result.values()))))
                    parts.append(values)
        except StatusError as exc:
            _fail(exc)
            return
        predictions = np.concatenate(parts)
    try:
        profile = build_profile(
            arrays[chosen],
            predictions,
            input_name=chosen,
            classes=classes,
            bins=bins,
            source=f"sample:{data.name}",
        )
    except ValueError as exc:
        _console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(2) from None
    with _admin(target) as admin:
        admin.set_drift_profile(name, variant, profile)
    _console.print(
        f"stored a drift reference on {name}/{variant}: {len(profile.features)} features of "
        f"{chosen!r}, {rows} rows, {'output classes' if classes else 'output values'}"
        if outputs
        else f"stored a drift reference on {name}/{variant}: {len(profile.features)} features"
    )


@models_app.command("accuracy")
def models_accuracy(name: str, target: Target = "127.0.0.1:8001") -> None:
    """Live accuracy per variant (feedback joined to logged predictions) and drift scores."""
    with _admin(target) as admin:
        variants = admin.model_health(name)
    table = Table(
        "variant",
        "accuracy",
        "labelled",
        "logged",
        "registered",
        "MAE",
        "windows",
        "output PSI",
        "max feature PSI",
        "drifting",
    )

    def num(value: float, fmt: str = ".4f") -> str:
        return "-" if value < 0 else format(value, fmt)

    for v in variants:
        table.add_row(
            v.variant,
            num(v.accuracy),
            str(v.feedback_joined),
            str(v.predictions_logged),
            num(v.registered_accuracy) if v.registered_accuracy else "-",
            num(v.mean_abs_error),
            str(v.windows),
            num(v.output_psi, ".3f"),
            num(v.max_feature_psi, ".3f"),
            "[red]yes[/red]" if v.drifting else "no",
        )
    _console.print(table)
    for v in variants:
        if v.features:
            top = ", ".join(f"{f.name} {f.psi:.3f}" for f in v.features[:5])
            _console.print(f"{v.variant}: highest feature PSI: {top}")


def _predicted_labels(result: dict[str, Any], output: str) -> Any:
    if output:
        values = np.asarray(result[output])
    else:
        integral = [k for k, v in result.items() if np.asarray(v).dtype.kind in "iu"]
        values = np.asarray(result[integral[0] if integral else next(iter(result))])
    if values.dtype.kind == "f" and values.ndim == 2:
        return values.argmax(axis=1)
    return values.reshape(-1)


@models_app.command("list")
def models_list(target: Target = "127.0.0.1:8001") -> None:
    with _admin(target) as admin:
        models = admin.list_models()
    table = Table("model", "variant", "copies", "artifact", "sha256")
    for m in models:
        table.add_row(m.name, m.variant, str(m.copies), m.artifact_uri, m.sha256[:12])
    _console.print(table)


@models_app.command("remove")
def models_remove(name: str, variant: str = "", target: Target = "127.0.0.1:8001") -> None:
    with _admin(target) as admin:
        removed = admin.remove_model(name, variant)
    _console.print(f"removed {removed} variant(s)")


@models_app.command("rollout")
def models_rollout(
    name: str,
    version: str,
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
    target: Target = "127.0.0.1:8001",
) -> None:
    """Point an alias (default: live, what queries naming no version follow) at VERSION, a
    registered variant. Its copies load and warm first; traffic shifts once they are READY.
    With --canary PCT only that share of the alias's queries goes to VERSION."""
    with _admin(target) as admin:
        status = admin.rollout(name, version, alias=alias, canary_percent=canary)
        _console.print(f"{name}/{alias}: {_alias_text(status)}")
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
    with _console.status(f"rolling {model}/{alias} to {version}") as spinner:
        while True:
            status = next((s for s in admin.list_aliases(model) if s.alias.alias == alias), None)
            a = status.alias if status is not None else mesh_pb2.Alias()
            canary, percent = a.canary_version == version, a.canary_percent
            if status is None or (a.version != version and not canary):
                spinner.stop()  # the Admin API reads etcd: this is a change, not a lagging view
                now = _alias_text(status) if status is not None else "removed"
                _console.print(f"[red]error[/red] {model}/{alias} was changed meanwhile: {now}")
                raise typer.Exit(1)
            ready = {v.version: v for v in status.versions}.get(version)
            line = f"{version}: not placed yet; serving {status.serving or '-'}"
            if ready is not None:
                line = (
                    f"{version}: {ready.ready}/{ready.wanted} copies ready; "
                    f"serving {status.serving or '-'}"
                )
            if line != last:
                _console.print(line, highlight=False)
                spinner.update(line)
                last = line
            if status.canary_active if canary else status.serving == version:
                break
            failed = _failed_everywhere(admin, model, version)
            if failed:
                spinner.stop()
                for node_id, why in failed.items():
                    _console.print(f"[red]failed[/red] {version} on {node_id}: {why}")
                raise typer.Exit(1)
            if time.monotonic() >= deadline:
                spinner.stop()
                _console.print(
                    f"[yellow]timed out[/yellow] after {timeout:.0f}s; the rollout goes on "
                    f"(meshctl model aliases {model})"
                )
                raise typer.Exit(1)
            time.sleep(0.25)
    share = f"{percent:g}% of " if canary else ""
    _console.print(f"[green]✓[/green] {model}/{alias}: {share}traffic on {version}")


def _failed_everywhere(admin: AdminClient, model: str, version: str) -> dict[str, str]:
    """Why ``version``'s copies failed, when it failed on every node it was placed on."""
    for p in admin.list_placements(model):
        if p.variant == version and p.failed and not p.nodes:
            return dict(p.failed)
    return {}


@models_app.command("rollback")
def models_rollback(
    name: str,
    alias: Annotated[str, typer.Option(help="the alias to roll back")] = "live",
    target: Target = "127.0.0.1:8001",
) -> None:
    """Drop the alias's canary, else point it back at its previous version: instant, as that
    version's copies stay loaded."""
    with _admin(target) as admin:
        status = admin.rollback(name, alias=alias)
    _console.print(f"{name}/{alias}: {_alias_text(status)}")


@models_app.command("aliases")
def models_aliases(name: str, target: Target = "127.0.0.1:8001") -> None:
    """A model's aliases: the version each points at, the one serving now, canary, readiness."""
    with _admin(target) as admin:
        aliases = admin.list_aliases(name)
    table = Table("alias", "version", "serving", "canary", "previous", "copies ready", "why")
    for s in aliases:
        a = s.alias
        canary = f"{a.canary_version} {a.canary_percent:g}%" if a.canary_version else "-"
        if a.canary_version and not s.canary_active:
            canary += " (not ready)"
        ready = ", ".join(f"{v.version} {v.ready}/{v.wanted}" for v in s.versions)
        table.add_row(
            a.alias, a.version, s.serving, canary, a.previous_version or "-", ready, s.reason
        )
    _console.print(table)


@nodes_app.command("list")
def nodes_list(target: Target = "127.0.0.1:8001") -> None:
    with _admin(target) as admin:
        nodes = admin.list_nodes()
    table = Table("node", "labels", "direct", "replicas", "copies")
    for n in nodes:
        copies = ", ".join(f"{c.model}/{c.variant}:{_state(c.state)}" for c in n.copies)
        labels = ",".join(f"{k}={v}" for k, v in sorted(n.labels.items()))
        table.add_row(
            n.node_id, labels, n.direct_address or "(tunnel)", ",".join(n.replicas), copies
        )
    _console.print(table)


@placements_app.command("list")
def placements_list(model: str = "", target: Target = "127.0.0.1:8001") -> None:
    with _admin(target) as admin:
        placements = admin.list_placements(model)
    table = Table("model", "variant", "desired", "nodes", "failed")
    for p in placements:
        failed = "; ".join(f"{k}: {v}" for k, v in p.failed.items())
        table.add_row(p.model, p.variant, str(p.desired_copies), ", ".join(p.nodes), failed)
    _console.print(table)


@nodes_app.command("drain")
def nodes_drain(
    node_id: str,
    undo: Annotated[bool, typer.Option("--undo", help="undrain instead")] = False,
    target: Target = "127.0.0.1:8001",
) -> None:
    """Drain a node: no new copies or queries; its copies move elsewhere (in-flight ones finish)."""
    with _admin(target) as admin:
        draining = admin.drain_node(node_id, undrain=undo)
    _console.print(f"node {node_id}: {'draining' if draining else 'serving'}")


def _read_policy(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        _console.print(f"[red]error[/red] cannot read {path}: {exc}")
        raise typer.Exit(2) from None


@policy_app.command("validate")
def policy_validate(file: Path, target: Target = "127.0.0.1:8001") -> None:
    """Check a policy file here and with the control plane (dry run); nothing is stored."""
    from meshserve.common.policy.config import PolicyError, parse_policy

    text = _read_policy(file)
    try:
        policy = parse_policy(text)
    except PolicyError as exc:
        _console.print(f"[red]invalid[/red] {file}: {exc}")
        raise typer.Exit(1) from None
    with _admin(target) as admin:
        admin.apply_policy(text, dry_run=True)
    _console.print(f"{file}: policy {policy.name!r} is valid")


@policy_app.command("apply")
def policy_apply(file: Path, target: Target = "127.0.0.1:8001") -> None:
    """Store a policy in etcd; every control-plane replica applies it to its next decisions."""
    text = _read_policy(file)
    with _admin(target) as admin:
        out = admin.apply_policy(text)
    _console.print(f"policy {out.name!r} applied (etcd revision {out.revision})")


@policy_app.command("get")
def policy_get(target: Target = "127.0.0.1:8001") -> None:
    """Print the policy in force (as applied)."""
    with _admin(target) as admin:
        out = admin.get_policy()
    if not out.yaml:
        _console.print("# no policy applied: the built-in default is in force")
        return
    print(out.yaml, end="" if out.yaml.endswith("\n") else "\n")


@explain_app.command("placement")
def explain_placement(model: str, variant: str = "", target: Target = "127.0.0.1:8001") -> None:
    """Why each node was filtered out, or how it scored, for a model's placement."""
    with _admin(target) as admin:
        variants = admin.explain_placement(model, variant)
    for v in variants:
        _console.print(
            f"[bold]{v.model}/{v.variant}[/bold]: {v.desired_copies} copies wanted, placed on "
            f"{', '.join(v.placed) or 'no node'}; rule: {v.policy}"
        )
        table = Table("node", "verdict", "score", "detail")
        for n in v.nodes:
            if n.feasible:
                verdict = "[green]selected[/green]" if n.selected else "feasible"
                detail = ", ".join(f"{k}={val:.3f}" for k, val in sorted(n.scores.items()))
                table.add_row(n.node_id, verdict, f"{n.score:.3f}", detail)
            else:
                table.add_row(n.node_id, f"[red]{n.filtered_by}[/red]", "", n.reason)
        _console.print(table)


@explain_app.command("switching")
def explain_switching(
    model: str,
    slo_ms: float = 0.0,
    min_accuracy: float = 0.0,
    target: Target = "127.0.0.1:8001",
) -> None:
    """Which variant a query to MODEL would get now (SLO-aware switching), and each prediction."""
    with _admin(target) as admin:
        out = admin.explain_switching(model, slo_ms=slo_ms, min_accuracy=min_accuracy)
    budget = f"SLO {out.slo_ms:.1f} ms" if out.slo_ms else "no SLO"
    _console.print(f"[bold]{model}[/bold] ({budget}): [green]{out.chosen}[/green] — {out.reason}")
    table = Table("variant", "accuracy", "predicted ms", "ready copies", "queued", "slowdown")
    for v in out.variants:
        predicted = f"{v.predicted_ms:.2f}" if v.predicted_ms >= 0 else "-"
        table.add_row(
            v.variant,
            f"{v.accuracy:.4f}",
            predicted,
            str(v.ready_copies),
            str(v.queued),
            f"{v.slowdown:.2f}",
        )
    _console.print(table)


@app.command()
def events(
    limit: int = 50,
    kind: str = "",
    model: str = "",
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new events (Ctrl-C stops)")
    ] = False,
    interval_s: Annotated[float, typer.Option(help="poll interval with --follow")] = 1.0,
    target: Target = "127.0.0.1:8001",
) -> None:
    """The decision log: placements, scaling, evictions, drains, policy changes, drift and
    accuracy alarms (newest last)."""
    import datetime
    import time

    def row(e: mesh_pb2.Event) -> list[str]:
        when = datetime.datetime.fromtimestamp(e.unix_ms / 1000).strftime("%H:%M:%S.%f")[:-3]
        model_name = f"{e.model}/{e.variant}" if e.model else ""
        return [str(e.seq), when, e.kind, model_name, e.node_id, e.message, e.replica_id]

    with _admin(target) as admin:
        items = admin.list_events(limit, kind, model)
        table = Table("seq", "time", "kind", "model", "node", "message", "replica")
        for e in items:
            table.add_row(*row(e))
        _console.print(table)
        last = max((e.seq for e in items), default=0)
        try:
            while follow:
                time.sleep(max(0.1, interval_s))
                for e in admin.list_events(limit, kind, model):
                    if e.seq > last:
                        _console.print("  ".join(row(e)), highlight=False)
                        last = e.seq
        except KeyboardInterrupt:
            return


@app.command()
def up(
    duration: Annotated[float, typer.Option(help="seconds to stay up; 0 = until Ctrl-C")] = 0.0,
    queries: Annotated[int, typer.Option(help="demo queries to send once ready")] = 8,
    workdir: Annotated[
        Path | None, typer.Option(help="where logs, etcd data and models go")
    ] = None,
    etcd: Annotated[str, typer.Option(help="use this etcd instead of starting one")] = "",
) -> None:
    """Run a local mesh: etcd, a control plane, two nodes (one edge, tunnel-only), a demo model,
    and demo traffic. Everything is stopped on Ctrl-C (or after --duration)."""
    from meshserve.client import MeshClient
    from meshserve.devtools.demo_models import make_mlp, reference_outputs, sha256_file
    from meshserve.devtools.local import LocalMesh, wait_until

    work = workdir or Path(tempfile.mkdtemp(prefix="meshserve-up-"))
    work.mkdir(parents=True, exist_ok=True)
    stop_requested = False

    def _on_signal(signum: int, frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, _on_signal)
    with LocalMesh(work) as mesh:
        try:
            with _console.status("starting etcd"):
                url = etcd or mesh.start_etcd()
                mesh.use_etcd(url)
            _console.print(f"[green]✓[/green] etcd          {url}")
            with _console.status("starting the control plane"):
                cp = mesh.start_controlplane("cp-1")
            _console.print(f"[green]✓[/green] control plane {cp.address}")
            mesh.start_node(
                "core-1", [cp.address], labels={"tier": "core", "zone": "a"}, direct=True
            )
            mesh.start_node("edge-1", [cp.address], labels={"tier": "edge", "zone": "b"})
            with AdminClient(cp.address) as admin:
                wait_until(lambda: len(admin.list_nodes()) >= 2, 60, what="two nodes to join")
                for n in admin.list_nodes():
                    path = n.direct_address or "tunnel only (no inbound port)"
                    _console.print(
                        f"[green]✓[/green] node          {n.node_id:8} "
                        f"tier={n.labels.get('tier')} {path}"
                    )
                model = make_mlp(work / "models" / "demo-mlp.onnx")
                admin.register_model("demo-mlp", model.as_uri(), sha256_file(model), copies=2)
                _console.print("[green]✓[/green] registered    demo-mlp (64→256→256→10, 2 copies)")
                with _console.status("placing and loading demo-mlp"):
                    wait_until(
                        lambda: (
                            sum(
                                c.state == mesh_pb2.READY
                                for n in admin.list_nodes()
                                for c in n.copies
                            )
                            >= 2
                        ),
                        120,
                        what="two ready copies of demo-mlp",
                    )
            _console.print("[green]✓[/green] ready         demo-mlp on both nodes")
            rng = np.random.default_rng(0)
            table = Table(
                "query", "served by", "argmax", "matches in-process onnxruntime", "latency ms"
            )
            with MeshClient(cp.address) as client:
                for i in range(queries):
                    x = rng.standard_normal((1, 64)).astype(np.float32)
                    t0 = time.perf_counter()
                    result = client.infer("demo-mlp", {"x": x})
                    ms = (time.perf_counter() - t0) * 1e3
                    expected = reference_outputs(model, {"x": x})["y"]
                    ok = bool(np.allclose(result["y"], expected, rtol=1e-5, atol=1e-5))
                    table.add_row(
                        str(i + 1),
                        result.node,
                        str(int(result["y"].argmax())),
                        "[green]yes[/green]" if ok else "[red]NO[/red]",
                        f"{ms:.2f}",
                    )
            _console.print(table)
            _console.print(f"mesh is up: gateway {cp.address} (OIP v2 gRPC), logs in {work}")
            _console.print("Ctrl-C to stop" if not duration else f"stopping in {duration:.0f}s")
            end = time.monotonic() + duration if duration else None
            while not stop_requested and (end is None or time.monotonic() < end):
                if not all(p.alive() for p in mesh.processes):
                    dead = [p.name for p in mesh.processes if not p.alive()]
                    _console.print(f"[red]process exited:[/red] {', '.join(dead)}")
                    raise typer.Exit(1)
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            with _console.status("stopping the mesh"):
                mesh.close()
    _console.print("[green]✓[/green] stopped; nothing left running")


certs_app = typer.Typer(
    help="Development certificates for a mutual-TLS mesh.", no_args_is_help=True
)
app.add_typer(certs_app, name="certs")


@certs_app.command("init")
def certs_init(
    directory: Annotated[Path, typer.Argument(help="where the CA and certificates go")],
    host: Annotated[
        list[str] | None,
        typer.Option(help="extra DNS name / IP in the server certificates (repeatable)"),
    ] = None,
    node: Annotated[
        list[str] | None,
        typer.Option(help="issue a certificate for this node id (repeatable; default node-1)"),
    ] = None,
    days: Annotated[int, typer.Option(help="validity of every certificate")] = 365,
    force: Annotated[bool, typer.Option(help="overwrite existing files")] = False,
) -> None:
    """Create a development CA in DIRECTORY and issue the control plane's, the nodes' and a
    client certificate (keys 0600). For development and tests; see docs/security.md."""
    from meshserve.devtools.certs import init_certs

    try:
        issued = init_certs(
            directory, hosts=host or (), nodes=node or ("node-1",), days=days, force=force
        )
    except (FileExistsError, ValueError) as exc:
        _console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(1) from None
    table = Table("file", "what")
    table.add_row(str(issued.ca_cert), "CA certificate: --tls-ca of every process")
    table.add_row(str(issued.ca_key), "CA key (0600): keep it off the mesh's machines")
    cp_cert, cp_key = issued.controlplane
    table.add_row(f"{cp_cert}, {cp_key}", "control plane: --tls-cert / --tls-key")
    for node_id, (cert, key) in issued.nodes.items():
        table.add_row(f"{cert}, {key}", f"node {node_id}: --tls-cert / --tls-key")
    cert, key = issued.client
    table.add_row(f"{cert}, {key}", "client (SDK, meshctl): --tls-cert / --tls-key")
    _console.print(table)
    _console.print(f"wrote {len(issued.all())} files in {directory}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
