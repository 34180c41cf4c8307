"""What every meshctl command shares: the global credential options, the connections built from
them, the console, and how an error ends a command.

Contract of a command:

* It connects with :func:`admin_client` (the Admin API) or :func:`mesh_client` (queries); both use
  the credentials the global options (:func:`global_options`) set for this invocation.
* A :class:`~meshserve.common.errors.StatusError` from the mesh ends it with exit code 1 and one
  line ``error CODE: message`` (:func:`fail`); a bad local input (a file that cannot be read, an
  argument that does not fit) ends it with exit code 2 before anything is sent.
* Output goes through :data:`console` (rich, stdout), so tables and colours look the same
  everywhere; errors and progress notes go to :data:`err_console` (stderr). A read command takes
  ``-o json|yaml|table`` (:data:`Output`) and hands its records to :func:`emit`: json and yaml
  are the records alone on stdout (field names documented per command in docs/meshctl.md).
* Piped (stdout not a terminal), the console has a fixed width (``COLUMNS``, else 160) and
  :func:`table` folds a long cell onto the next line instead of cutting it off.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import numpy as np
import typer
from rich.console import Console
from rich.table import Column, Table

from meshserve.client._admin import AdminClient
from meshserve.client.cli._placement_view import copy_state
from meshserve.common.errors import StatusError
from meshserve.common.security import SecurityConfigError, TLSFiles, read_secret

if TYPE_CHECKING:
    from meshserve.client import MeshClient

__all__ = [
    "DEFAULT_TARGET",
    "Output",
    "OutputFormat",
    "Security",
    "Target",
    "admin_client",
    "console",
    "copy_state",
    "emit",
    "emit_line",
    "err_console",
    "fail",
    "global_options",
    "load_npz",
    "mesh_client",
    "security",
    "table",
    "usage_error",
]

#: The control plane meshctl talks to unless ``--target`` / ``MESHSERVE_TARGET`` says otherwise.
DEFAULT_TARGET = "127.0.0.1:8001"

#: Width of tables when stdout is not a terminal (piped, redirected): ``COLUMNS`` or this.
PIPED_WIDTH = 160


def _width() -> int | None:
    if sys.stdout.isatty():
        return None  # the terminal's
    try:
        return max(40, int(os.environ.get("COLUMNS", "")))
    except ValueError:
        return PIPED_WIDTH


console = Console(width=_width())
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line

Target = Annotated[
    str, typer.Option("--target", "-t", envvar="MESHSERVE_TARGET", help="control-plane address")
]


class OutputFormat(enum.StrEnum):
    """What a read command prints: a table for people, json or yaml for scripts."""

    table = "table"
    json = "json"
    yaml = "yaml"


Output = Annotated[
    OutputFormat,
    typer.Option(
        "--output",
        "-o",
        case_sensitive=False,
        help="table (default), or json / yaml: the records alone on stdout (docs/meshctl.md)",
    ),
]


def table(*headers: str, whole: Mapping[str, int] | None = None) -> Table:
    """A table whose cells wrap, and fold a word too long for its column, instead of cutting
    anything off (a state must stay readable when piped). A header never breaks; ``whole``:
    header -> the width its column keeps at least (a state or an id that must stay on one
    line)."""
    keep = whole or {}
    return Table(
        *(
            Column(h, overflow="fold", no_wrap=False, min_width=max(len(h), keep.get(h, 0)))
            for h in headers
        )
    )


def emit(fmt: OutputFormat, records: Any, render: Callable[[], None]) -> None:
    """Print ``records`` as json or yaml (stdout, nothing else), or call ``render`` (table)."""
    if fmt is OutputFormat.table:
        render()
    elif fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump(records, sort_keys=False, allow_unicode=True))
    sys.stdout.flush()


def emit_line(fmt: OutputFormat, record: Any, text: str) -> None:
    """One streamed record (``events --follow``): a compact JSON line, a YAML document, or
    ``text``."""
    if fmt is OutputFormat.table:
        console.print(text, highlight=False)
        return
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        import yaml

        sys.stdout.write("---\n" + yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
    sys.stdout.flush()


@dataclass(frozen=True)
class Security:
    """The global credential options (``meshctl --tls-ca ... COMMAND``), secrets hidden."""

    tls: TLSFiles | None = None
    admin_token: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)


#: Set by the global options callback for the command that follows it.
_SECURITY: ContextVar[Security] = ContextVar("meshctl_security")


def security() -> Security:
    """The credentials of this invocation (none when the global options were not parsed)."""
    return _SECURITY.get(Security())


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("meshserve")
        except PackageNotFoundError:  # run from a source tree that was never installed
            text = "unknown (not installed)"
        sys.stdout.write(f"meshctl {text}\n")
        raise typer.Exit(0)


def global_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="print meshctl's version (the installed meshserve package's) and exit",
        ),
    ] = False,
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
        parsed = Security(
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
        usage_error(str(exc))
    _SECURITY.set(parsed)


def mesh_client(target: str, timeout: float) -> MeshClient:
    """A MeshClient with the global credentials."""
    from meshserve.client import MeshClient

    sec = security()
    return MeshClient(target, timeout=timeout, tls=sec.tls, api_key=sec.api_key)


@contextlib.contextmanager
def admin_client(target: str) -> Iterator[AdminClient]:
    """An AdminClient (with the global credentials) whose errors end the command with their
    status (exit code 1)."""
    sec = security()
    with AdminClient(target, tls=sec.tls, token=sec.admin_token) as admin:
        try:
            yield admin
        except StatusError as exc:
            fail(exc)


def fail(exc: StatusError) -> NoReturn:
    """End the command for an error the mesh returned: ``error CODE: message`` on stderr, exit
    code 1."""
    err_console.print(f"[red]error[/red] {exc.code.name}: {exc.message}")
    raise typer.Exit(1)


def usage_error(message: str) -> NoReturn:
    """End the command for a bad local input, before anything is sent: stderr, exit code 2."""
    err_console.print(f"[red]error[/red] {message}")
    raise typer.Exit(2) from None


def load_npz(data: Path) -> dict[str, Any]:
    """The arrays of an ``.npz`` file by name (no pickles); a file that cannot be read ends the
    command with exit code 2."""
    try:
        with np.load(data, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        usage_error(f"cannot read {data}: {exc}")
