"""``meshctl models evaluate | profile | accuracy``: how good a variant's answers are.

* ``evaluate`` queries the mesh with a labelled ``.npz`` and stores the measured accuracy on the
  variant (``--no-update`` only prints it).
* ``profile`` stores a drift reference: quantile-bin sketches of one input's features (and of the
  predictions, queried through the mesh). Only the sketches leave this machine.
* ``accuracy`` prints the live accuracy (feedback joined to logged predictions) and drift scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from meshserve.client.cli._common import (
    DEFAULT_TARGET,
    Output,
    OutputFormat,
    Target,
    admin_client,
    console,
    emit,
    err_console,
    fail,
    load_npz,
    mesh_client,
    table,
    usage_error,
)
from meshserve.client.cli._records import variant_health_record
from meshserve.common.errors import StatusError
from meshserve.protos import mesh_pb2

__all__ = ["accuracy", "evaluate", "profile"]


def evaluate(
    name: Annotated[str, typer.Argument(help="the model")],
    data: Annotated[Path, typer.Option(help=".npz with the inputs (by input name) and labels")],
    variant: Annotated[str, typer.Option(help="the variant queried (and updated)")] = "default",
    labels: Annotated[str, typer.Option(help="array in --data holding the true labels")] = "y",
    output: Annotated[
        str, typer.Option(help="output to compare (default: an integer output, else argmax)")
    ] = "",
    batch: Annotated[int, typer.Option(help="rows per query")] = 64,
    update: Annotated[bool, typer.Option(help="store the measured accuracy on the variant")] = True,
    target: Target = DEFAULT_TARGET,
) -> None:
    """Measure a variant's accuracy on a labelled file, through the mesh; store it (--update)."""
    from rich.progress import Progress

    arrays = load_npz(data)
    if labels not in arrays:
        usage_error(f"{data} has no {labels!r} array (has {sorted(arrays)})")
    truth = arrays.pop(labels).reshape(-1)
    rows = len(truth)
    if rows == 0 or any(len(a) != rows for a in arrays.values()):
        usage_error("inputs and labels must have the same number of rows (> 0)")
    correct = 0
    try:
        with mesh_client(target, 60) as client, Progress(console=console) as bar:
            task = bar.add_task(f"evaluating {name}/{variant}", total=rows)
            for start in range(0, rows, max(1, batch)):
                part = {k: v[start : start + batch] for k, v in arrays.items()}
                result = client.infer(name, part, version=variant)
                predicted = _predicted_labels(result, output)
                correct += int((predicted == truth[start : start + batch]).sum())
                bar.advance(task, len(predicted))
    except StatusError as exc:
        fail(exc)
    measured = correct / rows
    console.print(f"{name}/{variant}: accuracy {measured:.4f} on {rows} labelled rows")
    if not update:
        return
    with admin_client(target) as admin:
        spec = next(
            (m for m in admin.list_models() if m.name == name and m.variant == variant), None
        )
        if spec is None:
            err_console.print(f"[red]error[/red] {name}/{variant} is not registered")
            raise typer.Exit(1)
        spec.accuracy = measured
        admin.register_spec(spec)
    console.print(f"stored accuracy {measured:.4f} on {name}/{variant}")


def _predicted_labels(result: dict[str, Any], output: str) -> Any:
    """The predicted label per row: ``output`` (else the first integer output, else the first
    output), argmax'd when it holds float scores per class."""
    if output:
        values = np.asarray(result[output])
    else:
        integral = [k for k, v in result.items() if np.asarray(v).dtype.kind in "iu"]
        values = np.asarray(result[integral[0] if integral else next(iter(result))])
    if values.dtype.kind == "f" and values.ndim == 2:
        return values.argmax(axis=1)
    return values.reshape(-1)


def profile(
    name: Annotated[str, typer.Argument(help="the model")],
    data: Annotated[Path, typer.Option(help=".npz sample of production-like inputs, by name")],
    variant: Annotated[str, typer.Option(help="the variant queried (and updated)")] = "default",
    input_name: Annotated[
        str, typer.Option("--input", help="input to profile (default: the only/first one)")
    ] = "",
    bins: Annotated[int, typer.Option(help="quantile bins per feature")] = 10,
    outputs: Annotated[
        bool, typer.Option(help="also profile the predictions (queries the mesh with the sample)")
    ] = True,
    batch: Annotated[int, typer.Option(help="rows per query")] = 64,
    target: Target = DEFAULT_TARGET,
) -> None:
    """Store a drift reference for a variant: quantile-bin sketches of each input feature (and of
    the predictions) of a sample you give. Only these sketches are stored and sent to nodes."""
    from meshserve.common.sketches import build_profile, prediction_of

    arrays = load_npz(data)
    if not arrays:
        usage_error(f"{data} holds no arrays")
    chosen = input_name or next(iter(arrays))
    if chosen not in arrays:
        usage_error(f"{data} has no {chosen!r} array (has {sorted(arrays)})")
    rows = len(arrays[chosen])
    predictions, classes = None, True
    if outputs:
        parts = []
        try:
            with mesh_client(target, 60) as client:
                for start in range(0, rows, max(1, batch)):
                    part = {k: v[start : start + batch] for k, v in arrays.items()}
                    result = client.infer(name, part, version=variant)
                    values, classes = prediction_of(np.asarray(next(iter(result.values()))))
                    parts.append(values)
        except StatusError as exc:
            fail(exc)
        predictions = np.concatenate(parts)
    try:
        reference = build_profile(
            arrays[chosen],
            predictions,
            input_name=chosen,
            classes=classes,
            bins=bins,
            source=f"sample:{data.name}",
        )
    except ValueError as exc:
        usage_error(str(exc))
    with admin_client(target) as admin:
        admin.set_drift_profile(name, variant, reference)
    console.print(
        f"stored a drift reference on {name}/{variant}: {len(reference.features)} features of "
        f"{chosen!r}, {rows} rows, {'output classes' if classes else 'output values'}"
        if outputs
        else f"stored a drift reference on {name}/{variant}: {len(reference.features)} features"
    )


def accuracy(
    name: Annotated[str, typer.Argument(help="the model")],
    output: Output = OutputFormat.table,
    target: Target = DEFAULT_TARGET,
) -> None:
    """Live accuracy per variant (feedback joined to logged predictions) and drift scores."""
    with admin_client(target) as admin:
        variants = admin.model_health(name)
    records = [variant_health_record(v) for v in variants]
    emit(output, {"model": name, "variants": records}, lambda: _accuracy_table(variants))


def _accuracy_table(variants: list[mesh_pb2.VariantHealth]) -> None:
    t = table(
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
        t.add_row(
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
    console.print(t)
    for v in variants:
        if v.features:
            top = ", ".join(f"{f.name} {f.psi:.3f}" for f in v.features[:5])
            console.print(f"{v.variant}: highest feature PSI: {top}")
