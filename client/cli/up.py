"""``meshctl up`` (a local mesh with demo traffic) and ``meshctl certs init`` (a development CA).

These are the only meshctl commands built on ``meshserve.devtools`` (the local-mesh launcher, the
demo models, the dev CA), and the only place in ``meshserve.client`` that imports it: always
inside the command function, so the SDK and every other command run without devtools (a
deployment may ship the client alone; DESIGN.md: nothing imports devtools but tests, bench and
``meshctl up``).
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from meshserve.client._admin import AdminClient
from meshserve.client.cli._common import console, err_console
from meshserve.common.digest import sha256_file
from meshserve.protos import mesh_pb2

__all__ = ["certs_init", "up"]


def up(
    duration: Annotated[float, typer.Option(help="seconds to stay up; 0 = until Ctrl-C")] = 0.0,
    queries: Annotated[int, typer.Option(help="demo queries to send once ready")] = 8,
    traffic: Annotated[
        float,
        typer.Option(
            help="queries per second kept flowing while the mesh is up (the live map shows "
            "them; 0: none)"
        ),
    ] = 5.0,
    workdir: Annotated[
        Path | None, typer.Option(help="where logs, etcd data and models go")
    ] = None,
    etcd: Annotated[
        str, typer.Option(help="use this etcd (URL, or several comma-separated) instead of one")
    ] = "",
    etcd_ca: Annotated[str, typer.Option(help="with --etcd: PEM CA of etcd's certificate")] = "",
    etcd_cert: Annotated[str, typer.Option(help="with --etcd: PEM client certificate")] = "",
    etcd_key: Annotated[str, typer.Option(help="with --etcd: its private key (0600)")] = "",
    etcd_user: Annotated[str, typer.Option(help="with --etcd: etcd user")] = "",
    etcd_password_file: Annotated[
        str, typer.Option(help="with --etcd: file holding the user's password (0600)")
    ] = "",
    insecure_etcd: Annotated[
        bool, typer.Option(help="start etcd without TLS and auth (default: both on)")
    ] = False,
    metrics_listen: Annotated[
        str,
        typer.Option(
            help="HOST:PORT of the control plane's Prometheus /metrics; the two nodes get "
            "PORT+1 and PORT+2 (PORT 0: three free ports; default: no metrics endpoint)"
        ),
    ] = "",
    http_listen: Annotated[
        str,
        typer.Option(
            help="HOST:PORT where the control plane also serves OIP over HTTP/REST (curl, "
            "tritonclient.http; :PORT is 127.0.0.1; default: gRPC only)"
        ),
    ] = "",
    ui_listen: Annotated[
        str,
        typer.Option(
            help="HOST:PORT of the live map of the mesh (a web page; PORT 0: a free port; "
            "'off': none)"
        ),
    ] = "127.0.0.1:0",
    trace: Annotated[
        TraceExport | None,
        typer.Option(
            case_sensitive=False,
            help="export every process's spans: console (printed into each process's log in "
            "the workdir) or otlp (to OTEL_EXPORTER_OTLP_ENDPOINT, default a local collector "
            "on 127.0.0.1:4317); every query is sampled unless OTEL_TRACES_SAMPLER says otherwise",
        ),
    ] = None,
) -> None:
    """Run a local mesh: etcd, a control plane, two nodes (one edge, tunnel-only), a demo model,
    and demo traffic; print the `export MESHSERVE_TARGET=...` line for other shells. Everything
    is stopped on Ctrl-C (or after --duration)."""
    # Lazy on purpose: devtools is a development dependency of this one command (module docstring).
    from meshserve.client import MeshClient
    from meshserve.devtools.demo_models import make_mlp, reference_outputs
    from meshserve.devtools.etcd import client_flags as etcd_client_flags
    from meshserve.devtools.local import LocalMesh, wait_until

    metrics = _metrics_flags(metrics_listen)
    ui_address = _ui_address(ui_listen)
    env = _trace_env(trace)
    work = workdir or Path(tempfile.mkdtemp(prefix="meshserve-up-"))
    work.mkdir(parents=True, exist_ok=True)
    stop_requested = False

    def _on_signal(signum: int, frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, _on_signal)
    with LocalMesh(work, env=env) as mesh:
        try:
            with console.status("starting etcd"):
                if etcd:
                    try:  # a bad file or combination is reported before anything starts
                        flags = etcd_client_flags(
                            etcd,
                            ca=etcd_ca,
                            cert=etcd_cert,
                            key=etcd_key,
                            user=etcd_user,
                            password_file=etcd_password_file,
                        )
                    except ValueError as exc:  # names the option or file, never a secret
                        err_console.print(f"[red]error[/red] --etcd: {exc}")
                        raise typer.Exit(2) from None
                    mesh.use_etcd(etcd, flags)
                    url = etcd
                else:
                    url = mesh.start_etcd(secure=not insecure_etcd)
            secured = "" if url.startswith("http://") else " (TLS"
            if secured:
                secured += ", auth)" if "--etcd-user" in mesh.etcd_args else ")"
            console.print(f"[green]✓[/green] etcd          {url}{secured}")
            with console.status("starting the control plane"):
                rest = ["--http-listen", http_listen] if http_listen else []
                ui = ["--ui-listen", ui_address] if ui_address else []
                cp = mesh.start_controlplane("cp-1", extra=[*metrics[0], *rest, *ui])
            console.print(f"[green]✓[/green] control plane {cp.address}")
            if ui_address:
                console.print(
                    f"[green]✓[/green] live map      http://{ui_address}/", highlight=False
                )
            if http_listen:
                console.print(f"[green]✓[/green] OIP REST      {http_listen} (/v2/...)")
            mesh.start_node(
                "core-1",
                [cp.address],
                labels={"tier": "core", "zone": "a"},
                direct=True,
                extra=metrics[1],
            )
            mesh.start_node(
                "edge-1", [cp.address], labels={"tier": "edge", "zone": "b"}, extra=metrics[2]
            )
            with AdminClient(cp.address) as admin:
                wait_until(lambda: len(admin.list_nodes()) >= 2, 60, what="two nodes to join")
                for n in admin.list_nodes():
                    path = n.direct_address or "tunnel only (no inbound port)"
                    console.print(
                        f"[green]✓[/green] node          {n.node_id:8} "
                        f"tier={n.labels.get('tier')} {path}"
                    )
                model = make_mlp(work / "models" / "demo-mlp.onnx")
                admin.register_model("demo-mlp", model.as_uri(), sha256_file(model), copies=2)
                console.print("[green]✓[/green] registered    demo-mlp (64→256→256→10, 2 copies)")
                with console.status("placing and loading demo-mlp"):
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
            console.print("[green]✓[/green] ready         demo-mlp on both nodes")
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
            console.print(table)
            console.print(f"mesh is up: gateway {cp.address} (OIP v2 gRPC), logs in {work}")
            for name, flags in zip(("cp-1", "core-1", "edge-1"), metrics, strict=True):
                if flags:
                    console.print(f"metrics: {name} http://{flags[1]}/metrics", highlight=False)
            if trace is not None:
                where = (
                    f"printed into {work}/*.log"
                    if trace is TraceExport.console
                    else f"sent to {(env or {}).get('OTEL_EXPORTER_OTLP_ENDPOINT')}"
                )
                console.print(f"traces: every query's spans are {where}", highlight=False)
            if ui_address:
                console.print(f"the live map: open http://{ui_address}/", highlight=False)
            console.print("in another shell, point meshctl and the SDK at it with:")
            console.print(f"export MESHSERVE_TARGET={cp.address}", highlight=False, soft_wrap=True)
            console.print("Ctrl-C to stop" if not duration else f"stopping in {duration:.0f}s")
            end = time.monotonic() + duration if duration else None
            with _DemoTraffic(MeshClient(cp.address, timeout=5.0), traffic) as demo:
                while not stop_requested and (end is None or time.monotonic() < end):
                    if not all(p.alive() for p in mesh.processes):
                        dead = [p.name for p in mesh.processes if not p.alive()]
                        err_console.print(f"[red]process exited:[/red] {', '.join(dead)}")
                        raise typer.Exit(1)
                    time.sleep(0.2)
            if demo.failed:
                err_console.print(f"demo traffic: {demo.failed} of {demo.sent} queries failed")
        except KeyboardInterrupt:
            pass
        finally:
            with console.status("stopping the mesh"):
                mesh.close()
    console.print("[green]✓[/green] stopped; nothing left running")


class _DemoTraffic:
    """A light stream of demo queries in a thread while the mesh is up (``qps`` a second; 0:
    none), so the live map shows queries flowing; stopped and joined on exit. A failed query
    is counted, never raised (the mesh may be stopping)."""

    def __init__(self, client: Any, qps: float) -> None:
        self._client = client
        self._pause = 1.0 / qps if qps > 0 else 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo traffic", daemon=True)
        self.sent = self.failed = 0

    def _run(self) -> None:
        rng = np.random.default_rng(1)
        while not self._stop.wait(self._pause):
            x = rng.standard_normal((1, 64)).astype(np.float32)
            try:
                self._client.infer("demo-mlp", {"x": x})
            except Exception:
                self.failed += 1
            self.sent += 1

    def __enter__(self) -> _DemoTraffic:
        if self._pause:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10.0)
        self._client.close()


class TraceExport(enum.StrEnum):
    """Where ``meshctl up --trace`` sends the spans."""

    console = "console"
    otlp = "otlp"


def _metrics_flags(listen: str) -> list[list[str]]:
    """The ``--metrics-listen`` flags of cp-1, core-1 and edge-1 (none without ``listen``):
    ``HOST:PORT``, ``HOST:PORT+1``, ``HOST:PORT+2``; port 0: three free ports, chosen here so
    that the addresses printed are the real ones."""
    from meshserve.common.process import metrics_address

    if not listen:
        return [[], [], []]
    try:
        host, port = metrics_address(listen)
    except ValueError as exc:
        err_console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(2) from None
    if port + 2 > 65535:
        err_console.print(f"[red]error[/red] --metrics-listen {listen!r}: PORT+2 must be < 65536")
        raise typer.Exit(2)
    ports = [port + i for i in range(3)] if port else _free_ports(host, 3)
    shown = f"[{host}]" if ":" in host else host
    return [["--metrics-listen", f"{shown}:{p}"] for p in ports]


def _ui_address(listen: str) -> str:
    """The control plane's ``--ui-listen`` for ``meshctl up --ui-listen`` ("" for 'off'): port 0
    becomes a free port chosen here, so that the URL printed is the real one."""
    from meshserve.common.process import listen_address

    if listen.strip().lower() in ("off", "none", ""):
        return ""
    try:
        host, port = listen_address(listen, "--ui-listen")
    except ValueError as exc:
        err_console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(2) from None
    port = port or _free_ports(host, 1)[0]
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}"


def _free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports free on ``host`` now (held together while chosen)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        socks = [socket.socket(family, socket.SOCK_STREAM) for _ in range(count)]
        for sock in socks:
            stack.enter_context(sock)
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _trace_env(trace: TraceExport | None) -> dict[str, str] | None:
    """The environment of the mesh's processes for ``--trace`` (None: this one's, unchanged).
    Sampling is left to the processes' default: with an exporter and no ``OTEL_TRACES_SAMPLER``
    every query is traced (common/process.py, ``default_sampler``)."""
    if trace is None:
        return None
    env = dict(os.environ)
    if trace is TraceExport.console:
        env["MESHSERVE_TRACE_CONSOLE"] = "1"
    else:
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", ""
        )
        module = "http" if protocol.strip().startswith("http") else "grpc"
        if importlib.util.find_spec("opentelemetry.exporter.otlp") is None or (
            importlib.util.find_spec(f"opentelemetry.exporter.otlp.proto.{module}") is None
        ):  # the processes would only log a warning and export nothing
            err_console.print(
                "[red]error[/red] --trace otlp needs opentelemetry-exporter-otlp "
                "(pip install 'meshserve\\[otlp]'); --trace console needs nothing"
            )
            raise typer.Exit(2)
        env.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
        env.setdefault("OTEL_TRACES_EXPORTER", "otlp")
    return env


def certs_init(
    directory: Annotated[Path, typer.Argument(help="where the CAs and certificates go")],
    host: Annotated[
        list[str] | None,
        typer.Option(
            help="extra DNS name / IP of the control plane, on its certificate only (repeatable)"
        ),
    ] = None,
    node_host: Annotated[
        list[str] | None,
        typer.Option(
            help="extra DNS name / IP of the nodes' direct ports, on node certificates only "
            "(repeatable; never a control-plane name)"
        ),
    ] = None,
    node: Annotated[
        list[str] | None,
        typer.Option(help="issue a certificate for this node id (repeatable; default node-1)"),
    ] = None,
    days: Annotated[int, typer.Option(help="validity of every certificate")] = 365,
    force: Annotated[bool, typer.Option(help="overwrite existing files")] = False,
) -> None:
    """Create one development CA per role (control plane, nodes, clients) in DIRECTORY and
    issue the control plane's, the nodes' and a client certificate (keys 0600). For development
    and tests; see docs/security.md."""
    # Lazy on purpose: the dev CA lives in devtools (module docstring).
    from meshserve.devtools.certs import init_certs

    try:
        issued = init_certs(
            directory,
            hosts=host or (),
            node_hosts=node_host or (),
            nodes=node or ("node-1",),
            days=days,
            force=force,
        )
    except (FileExistsError, ValueError) as exc:
        err_console.print(f"[red]error[/red] {exc}")
        raise typer.Exit(1) from None
    table = Table("file", "what")
    uses = {
        "controlplane": "--tls-ca of nodes, meshctl and SDKs (what dials the control plane)",
        "node": "what dials nodes' direct ports (SDK: TLSFiles(node_ca=...))",
        "client": "nodes' --tls-client-ca (SDKs querying their direct ports)",
    }
    for role, (ca_cert, ca_key) in issued.cas.items():
        table.add_row(str(ca_cert), f"{role} CA: {uses[role]}")
        table.add_row(str(ca_key), f"{role} CA key (0600): keep it off the mesh's machines")
    table.add_row(str(issued.controlplane_trust), "the control plane's --tls-ca (its callers' CAs)")
    cp_cert, cp_key = issued.controlplane
    table.add_row(f"{cp_cert}, {cp_key}", "control plane: --tls-cert / --tls-key")
    for node_id, (cert, key) in issued.nodes.items():
        table.add_row(f"{cert}, {key}", f"node {node_id}: --tls-cert / --tls-key")
    cert, key = issued.client
    table.add_row(f"{cert}, {key}", "client (SDK, meshctl): --tls-cert / --tls-key")
    console.print(table)
    console.print(f"wrote {len(issued.all())} files in {directory}")
