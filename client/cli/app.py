"""``meshctl``: operate a meshserve mesh (and run a local one with ``meshctl up``).

This module only composes the command line: which function answers which command, in the order
``--help`` lists them. Each command group lives in its own module (``models``, ``rollout``,
``quality``, ``nodes``, ``policy``, ``explain``, ``events``, ``up``) on top of ``_common`` (the
global credential options, the connections, the console, error -> exit code).
"""

from __future__ import annotations

import typer

from meshserve.client.cli import (
    _common,
    events,
    explain,
    models,
    nodes,
    policy,
    quality,
    rollout,
    up,
)

__all__ = ["build", "main"]


def build() -> typer.Typer:
    """The meshctl command tree (a new one per call)."""
    # add_completion: --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    app = typer.Typer(help="Operate a meshserve mesh.", no_args_is_help=True, add_completion=True)
    models_app = typer.Typer(
        help="Register, evaluate, roll out, list and remove models.", no_args_is_help=True
    )
    nodes_app = typer.Typer(
        help="List, drain and undrain nodes; confirm a held mass unload.", no_args_is_help=True
    )
    placements_app = typer.Typer(help="List placements; retry failed copies.", no_args_is_help=True)
    policy_app = typer.Typer(
        help="Validate, apply and show the placement policy.", no_args_is_help=True
    )
    explain_app = typer.Typer(help="Explain control-plane decisions.", no_args_is_help=True)
    certs_app = typer.Typer(
        help="Development certificates for a mutual-TLS mesh.", no_args_is_help=True
    )
    app.add_typer(models_app, name="models")
    # `meshctl model evaluate` reads naturally: `model` is the same group, shown as an alias
    app.add_typer(models_app, name="model", help="Alias of `models`.")
    app.add_typer(nodes_app, name="nodes")
    app.add_typer(placements_app, name="placements")
    app.add_typer(policy_app, name="policy")
    app.add_typer(explain_app, name="explain")
    app.add_typer(certs_app, name="certs")
    app.callback()(_common.global_options)

    models_app.command("register")(models.register)
    models_app.command("evaluate")(quality.evaluate)
    models_app.command("profile")(quality.profile)
    models_app.command("accuracy")(quality.accuracy)
    models_app.command("list")(models.list_models)
    models_app.command("show")(models.show)
    models_app.command("remove")(models.remove)
    models_app.command("rollout")(rollout.rollout)
    models_app.command("rollback")(rollout.rollback)
    models_app.command("aliases")(rollout.aliases)
    nodes_app.command("list")(nodes.list_nodes)
    nodes_app.command("drain")(nodes.drain)
    nodes_app.command("label")(nodes.label)
    nodes_app.command("confirm-unloads")(nodes.confirm_unloads)
    placements_app.command("list")(nodes.list_placements)
    placements_app.command("retry")(nodes.retry_placements)
    policy_app.command("validate")(policy.validate)
    policy_app.command("apply")(policy.apply)
    policy_app.command("get")(policy.get)
    explain_app.command("placement")(explain.placement)
    explain_app.command("switching")(explain.switching)
    app.command("events")(events.events)
    app.command("up")(up.up)
    certs_app.command("init")(up.certs_init)
    return app


def main() -> None:
    """The ``meshctl`` console script."""
    build()()


if __name__ == "__main__":
    main()
