"""What every meshctl command shares: the global credential options, the connections built from
them, the console, and how an error ends a command.

Contract of a command:

* It connects with :func:`admin_client` (the Admin API) or :func:`mesh_client` (queries); both use
  the credentials the global options (:func:`global_options`) set for this invocation.
* A :class:`~meshserve.common.errors.StatusError` from the mesh ends it with exit code 1 and one
  line ``error CODE: message`` (:func:`fail`); a bad local input (a file that cannot be read, an
  argument that does not fit) ends it with exit code 2 before anything is sent.
* Output goes through :data:`console` (rich), so tables and colours look the same everywhere.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import numpy as np
import typer
from rich.console import Console

from meshserve.client._admin import AdminClient
from meshserve.common.errors import StatusError
from meshserve.common.security import SecurityConfigError, TLSFiles, read_secret
from meshserve.protos import mesh_pb2

if TYPE_CHECKING:
    from meshserve.client import MeshClient

__all__ = [
    "DEFAULT_TARGET",
    "Security",
    "Target",
    "admin_client",
    "console",
    "copy_state",
    "fail",
    "global_options",
    "load_npz",
    "mesh_client",
    "security",
    "usage_error",
]

#: The control plane meshctl talks to unless ``--target`` / ``MESHSERVE_TARGET`` says otherwise.
DEFAULT_TARGET = "127.0.0.1:8001"

console = Console()

Target = Annotated[
    str, typer.Option("--target", "-t", envvar="MESHSERVE_TARGET", help="control-plane address")
]


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


def global_options(
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
    """End the command for an error the mesh returned: ``error CODE: message``, exit code 1."""
    console.print(f"[red]error[/red] {exc.code.name}: {exc.message}")
    raise typer.Exit(1)


def usage_error(message: str) -> NoReturn:
    """End the command for a bad local input, before anything is sent: exit code 2."""
    console.print(f"[red]error[/red] {message}")
    raise typer.Exit(2) from None


def copy_state(state: int) -> str:
    """The name of a copy's state (``READY``, ``LOADING``, ...)."""
    return mesh_pb2.CopyState.Name(state)  # type: ignore[arg-type]


def load_npz(data: Path) -> dict[str, Any]:
    """The arrays of an ``.npz`` file by name (no pickles); a file that cannot be read ends the
    command with exit code 2."""
    try:
        with np.load(data, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        usage_error(f"cannot read {data}: {exc}")
