"""``meshctl policy validate | apply | get``: the placement policy (YAML, docs/policy-reference.md).

``validate`` checks a file twice, here (the shared schema in ``meshserve.common.policy``) and on
the control plane as a dry run, and stores nothing; ``apply`` stores it in etcd, where every
replica picks it up for its next decisions; ``get`` prints the policy in force as applied.
"""

from __future__ import annotations

from pathlib import Path
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
    err_console,
    usage_error,
)

PolicyFile = Annotated[Path, typer.Argument(help="the policy YAML file")]

__all__ = ["apply", "get", "validate"]


def _read_policy(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        usage_error(f"cannot read {path}: {exc}")


def validate(file: PolicyFile, target: Target = DEFAULT_TARGET) -> None:
    """Check a policy file here and with the control plane (dry run); nothing is stored."""
    from meshserve.common.policy.config import PolicyError, parse_policy

    text = _read_policy(file)
    try:
        policy = parse_policy(text)
    except PolicyError as exc:
        err_console.print(f"[red]invalid[/red] {file}: {exc}")
        raise typer.Exit(1) from None
    with admin_client(target) as admin:
        admin.apply_policy(text, dry_run=True)
    console.print(f"{file}: policy {policy.name!r} is valid")


def apply(file: PolicyFile, target: Target = DEFAULT_TARGET) -> None:
    """Store a policy in etcd; every control-plane replica applies it to its next decisions."""
    text = _read_policy(file)
    with admin_client(target) as admin:
        out = admin.apply_policy(text)
    console.print(f"policy {out.name!r} applied (etcd revision {out.revision})")


def get(output: Output = OutputFormat.table, target: Target = DEFAULT_TARGET) -> None:
    """Print the policy in force (as applied); -o json|yaml: the record with it parsed."""
    import yaml

    with admin_client(target) as admin:
        out = admin.get_policy()
    parsed = yaml.safe_load(out.yaml) if out.yaml else None
    record = {
        "applied": bool(out.yaml),
        "name": parsed.get("name") if isinstance(parsed, dict) else None,
        "revision": int(out.revision) or None,
        "policy": parsed,
        "yaml": out.yaml or None,
    }

    def render() -> None:
        if not out.yaml:
            console.print("# no policy applied: the built-in default is in force")
            return
        print(out.yaml, end="" if out.yaml.endswith("\n") else "\n")

    emit(output, record, render)
