"""``meshctl explain placement | switching``: why the control plane decided what it did.

``placement`` prints, per variant, each node's verdict: the filter that removed it and why, or
its score and the score of every plugin. ``switching`` prints the version a query resolves to
(through ``live`` or the version/alias named) and which of that version's variants it would get
now under an SLO and minimum accuracy, with each variant's predicted latency.
"""

from __future__ import annotations

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
from meshserve.client.cli._records import explain_placement_record, explain_switching_record
from meshserve.protos import mesh_pb2

__all__ = ["placement", "switching"]


def placement(
    model: Annotated[str, typer.Argument(help="the model")],
    variant: Annotated[str, typer.Option(help="only this variant (default: every one)")] = "",
    output: Output = OutputFormat.table,
    target: Target = DEFAULT_TARGET,
) -> None:
    """Why each node was filtered out, or how it scored, for a model's placement."""
    with admin_client(target) as admin:
        variants = admin.explain_placement(model, variant)
    emit(
        output,
        {"variants": [explain_placement_record(v) for v in variants]},
        lambda: _placement_tables(variants),
    )


def _placement_tables(variants: list[mesh_pb2.VariantExplanation]) -> None:
    for v in variants:
        console.print(
            f"[bold]{v.model}/{v.variant}[/bold]: {v.desired_copies} copies wanted, placed on "
            f"{', '.join(v.placed) or 'no node'}; rule: {v.policy}"
        )
        t = table("node", "verdict", "score", "detail")
        for n in v.nodes:
            if n.feasible:
                verdict = "[green]selected[/green]" if n.selected else "feasible"
                detail = ", ".join(f"{k}={val:.3f}" for k, val in sorted(n.scores.items()))
                if n.reason:  # a holder: "holds a copy" (not scored: it is not a candidate)
                    t.add_row(n.node_id, verdict, "", n.reason)
                    continue
                t.add_row(n.node_id, verdict, f"{n.score:.3f}", detail)
            else:
                t.add_row(n.node_id, f"[red]{n.filtered_by}[/red]", "", n.reason)
        console.print(t)


def switching(
    model: Annotated[str, typer.Argument(help="the model a query names")],
    slo_ms: Annotated[
        float, typer.Option(help="the query's latency budget (0: the model's default)")
    ] = 0.0,
    min_accuracy: Annotated[float, typer.Option(help="the query's accuracy floor, 0..1")] = 0.0,
    version: Annotated[
        str, typer.Option(help="a version, alias or variant the query names (default: none)")
    ] = "",
    output: Output = OutputFormat.table,
    target: Target = DEFAULT_TARGET,
) -> None:
    """Which variant a query to MODEL would get now: the version it resolves to (live, or the
    one named), then SLO-aware switching among that version's variants, with each prediction."""
    with admin_client(target) as admin:
        out = admin.explain_switching(
            model, slo_ms=slo_ms, min_accuracy=min_accuracy, version=version
        )
    emit(output, explain_switching_record(model, out), lambda: _switching_table(model, out))


def _switching_table(model: str, out: mesh_pb2.ExplainSwitchingResponse) -> None:
    budget = f"SLO {out.slo_ms:.1f} ms" if out.slo_ms else "no SLO"
    route = f" ({out.route})" if out.route else ""
    console.print(
        f"[bold]{model}[/bold] version [bold]{out.version}[/bold]{route}, {budget}: "
        f"[green]{out.chosen}[/green] — {out.reason}"
    )
    t = table("variant", "accuracy", "predicted ms", "ready copies", "queued", "slowdown")
    for v in out.variants:
        predicted = f"{v.predicted_ms:.2f}" if v.predicted_ms >= 0 else "-"
        t.add_row(
            v.variant,
            f"{v.accuracy:.4f}",
            predicted,
            str(v.ready_copies),
            str(v.queued),
            f"{v.slowdown:.2f}",
        )
    console.print(t)
