"""Every meshctl command, option and argument says what it is for in ``--help`` (walks the real
command tree that the ``meshctl`` console script runs)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer

from meshserve.client.cli.app import build


def _walk(command: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(``meshctl nodes list``, its command) for the root, every group and every command
    (typer's click classes: groups are the ones with ``commands``)."""
    yield path, command
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _walk(sub, f"{path} {name}")


def test_every_command_option_and_argument_has_help() -> None:
    root = typer.main.get_command(build())
    missing: list[str] = []
    seen = 0
    for path, command in _walk(root, "meshctl"):
        seen += 1
        if not (command.help or "").strip():
            missing.append(f"{path}: command")
        for param in command.params:
            if not (getattr(param, "help", None) or "").strip():
                missing.append(f"{path}: {param.name}")
    assert seen > 25, seen  # the walk reached the leaves
    assert missing == []


def test_models_has_a_visible_alias_model() -> None:
    root: Any = typer.main.get_command(build())
    models, model = root.commands["models"], root.commands["model"]
    assert not model.hidden and "models" in (model.help or "")
    assert sorted(models.commands) == sorted(model.commands)
    assert "show" in models.commands and "list" in models.commands


def test_read_commands_take_output_json_yaml_table() -> None:
    root = typer.main.get_command(build())
    reads = [
        "nodes list",
        "placements list",
        "models list",
        "models show",
        "models aliases",
        "models accuracy",
        "events",
        "explain placement",
        "explain switching",
        "policy get",
    ]
    commands = dict(_walk(root, "meshctl"))
    for path in reads:
        [output] = [p for p in commands[f"meshctl {path}"].params if p.name == "output"]
        assert "-o" in output.opts and "--output" in output.opts, path
        choices = output.type_descriptor.annotation
        assert sorted(c.value for c in choices) == ["json", "table", "yaml"], path
