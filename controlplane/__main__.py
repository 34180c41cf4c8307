"""``meshserve-controlplane``: run one control-plane replica (any number may share one etcd)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import signal
from pathlib import Path

from meshserve.common.process import (
    add_listen_options,
    configure_logging,
    configure_metrics,
    configure_tracing,
    exit_deadline,
    install_task_dump,
    listen_address,
    run,
)
from meshserve.common.security import SecurityConfigError, TLSFiles, read_secret, read_secrets
from meshserve.controlplane.app import ControlPlane, ControlPlaneConfig, default_replica_id
from meshserve.controlplane.auth import AuthConfig, load_api_keys
from meshserve.controlplane.dataplane.options import add_gateway_options
from meshserve.controlplane.etcd.link import EtcdAuth, add_etcd_options, auth_from_args
from meshserve.controlplane.placement.failures import parse_backoff


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshserve-controlplane", description=__doc__)
    add_etcd_options(p)  # --etcd (a URL list) and its TLS / user options
    p.add_argument(
        "--listen",
        default="127.0.0.1:8001",
        help="host:port for NodeLink, Admin and the inference gateway",
    )
    p.add_argument("--advertise", default=None, help="address nodes dial (default: --listen)")
    p.add_argument("--replica-id", default=None)
    p.add_argument(
        "--lease-ttl", type=int, default=5, help="seconds a node record outlives its stream"
    )
    p.add_argument("--max-message-mb", type=int, default=64)
    p.add_argument(
        "--admissions-per-s",
        type=float,
        default=200.0,
        help="new node streams admitted per second (reconnect storms); the rest retry",
    )
    p.add_argument(
        "--keepalive-ms",
        type=int,
        default=10_000,
        help="ping idle node streams this often; a dead path is noticed in ~1.5x (min 500)",
    )
    p.add_argument(
        "--telemetry-interval-ms",
        type=int,
        default=2000,
        help="how often nodes report load (drives autoscaling and routing); min 100",
    )
    p.add_argument(
        "--retry-backoff-s",
        default="30,120,600",
        help="seconds before a node where a copy failed transiently (network, source) is tried "
        "again, per consecutive failure; the last value repeats (the cap)",
    )
    add_gateway_options(p)
    p.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=10.0,
        help="SIGTERM/SIGINT -> exit within this long, whatever etcd does: calls in flight get "
        "up to 3 s, then streams, lease and etcd client are closed, each step bounded (min 1)",
    )
    p.add_argument(
        "--etcd-keep-revisions",
        type=int,
        default=10_000,
        help="the leader compacts etcd's history, keeping this many revisions (min 100)",
    )
    p.add_argument(
        "--unload-confirm-s",
        type=float,
        default=600.0,
        help="safety floor: one view change that would unload more than half of the copies "
        "the nodes hold (e.g. etcd lost its data) is held back this long, with an alarm, "
        "unless the operator confirms it first (meshctl nodes confirm-unloads)",
    )
    _security_options(p)
    p.add_argument(
        "--trust-node-labels",
        action="store_true",
        help="placement also matches the labels a node claims in its Hello (default: only the "
        "admin-side labels set by `meshctl nodes label`); for a mesh whose nodes are all yours",
    )
    p.add_argument("--log-level", default="INFO")
    add_listen_options(p)
    p.add_argument(
        "--ui-listen",
        default="",
        help="HOST:PORT serving the live map of the mesh (a web page); :PORT is 127.0.0.1 only "
        "(default: off; docs/ui.md). With an admin token set, the page asks for it or for "
        "--ui-viewer-token-file's token",
    )
    return p


def _http_listen(value: str, prog: str, flag: str = "--http-listen") -> str:
    """``--http-listen`` (or ``flag``) checked now (a bad value ends the process naming it)."""
    if value:
        try:
            listen_address(value, flag)
        except ValueError as exc:
            raise SystemExit(f"{prog}: {exc}") from None
    return value


def _security_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (docs/security.md)")
    g.add_argument("--tls-cert", default="", help="PEM certificate of the listener (enables TLS)")
    g.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    g.add_argument(
        "--tls-ca",
        default="",
        help="PEM CA certificates clients must chain to (mutual TLS; node ids are checked "
        "against their certificates) and that nodes' direct ports are verified with",
    )
    g.add_argument(
        "--tls-node-ca",
        default="",
        help="PEM CA that issues node certificates (with one CA per role: node-ca.crt): a "
        "node's certificate must be one it issued, and nodes' direct ports are verified with it "
        "alone (default: --tls-ca for both)",
    )
    g.add_argument(
        "--tls-client-auth",
        choices=("required", "none"),
        default="required",
        help="with --tls-ca: 'required' (every caller presents a certificate) or 'none' "
        "(server TLS only: nodes prove themselves by join token, clients by API key)",
    )
    g.add_argument(
        "--join-token-file", default="", help="bootstrap tokens nodes must present, one a line"
    )
    g.add_argument(
        "--admin-token-file",
        default="",
        help="token every Admin API call must present as 'authorization: Bearer <token>'",
    )
    g.add_argument(
        "--ui-viewer-token-file",
        default="",
        help="a read-only token that opens the live map (--ui-listen) and nothing else",
    )
    g.add_argument(
        "--api-keys-file",
        default="",
        help="YAML of tenants, their API keys and the models each may query; inference then "
        "needs a key (x-api-key or authorization: Bearer)",
    )


def _security(ns: argparse.Namespace) -> tuple[TLSFiles | None, bool, AuthConfig]:
    """TLS files, whether client certificates are required, and the auth configuration, from
    the command line; a bad file ends the process with a message naming it (never a secret)."""
    try:
        tls = TLSFiles.from_options(ns.tls_ca, ns.tls_cert, ns.tls_key)
        if tls is not None and tls.cert is None:
            raise SecurityConfigError("--tls-ca needs the listener's --tls-cert and --tls-key")
        if ns.tls_node_ca:
            if tls is None or tls.ca is None:
                raise SecurityConfigError("--tls-node-ca needs --tls-ca")
            tls = dataclasses.replace(tls, node_ca=Path(ns.tls_node_ca))
        if tls is not None:
            tls.pair()  # unreadable files fail now, not at the first handshake
            tls.ca_bytes()
            tls.for_nodes().ca_bytes()
        auth = AuthConfig(
            join_tokens=tuple(
                read_secrets(Path(ns.join_token_file), "join token file")
                if ns.join_token_file
                else ()
            ),
            admin_token=(
                read_secret(Path(ns.admin_token_file), "admin token file")
                if ns.admin_token_file
                else None
            ),
            viewer_token=(
                read_secret(Path(ns.ui_viewer_token_file), "viewer token file")
                if ns.ui_viewer_token_file
                else None
            ),
            tenants=load_api_keys(Path(ns.api_keys_file)) if ns.api_keys_file else None,
        )
    except SecurityConfigError as exc:
        raise SystemExit(f"meshserve-controlplane: {exc}") from None
    return tls, ns.tls_client_auth == "required", auth


def _etcd(ns: argparse.Namespace) -> EtcdAuth | None:
    """The etcd link's credentials (files), checked against --etcd; a bad one ends the process
    with a message naming the option or file (never a secret)."""
    try:
        return auth_from_args(ns)[1]
    except ValueError as exc:  # SecurityConfigError too
        raise SystemExit(f"meshserve-controlplane: --etcd: {exc}") from None


async def _serve(config: ControlPlaneConfig, metrics_listen: str = "") -> None:
    configure_tracing("meshserve-controlplane")
    configure_metrics("meshserve-controlplane", metrics_listen)
    # The view of a large mesh is a big, long-lived heap (10,000 node records); with the
    # default thresholds every few thousand allocations a collection walks all of it. Our
    # hot paths create few reference cycles, so collect far less often.
    gc.set_threshold(50_000, 20, 20)
    plane = ControlPlane(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    install_task_dump(loop)
    # A signal during start (etcd not reachable yet: start retries up to 30 s) stops it too.
    starting = asyncio.ensure_future(plane.start())
    signalled = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is not None:
        signalled.cancel()
        await plane.stop(grace_s=0.0)
        starting.result()  # raises: the replica could not start
    await signalled
    # The sequence below bounds itself to the grace; the deadline catches what it cannot
    # (a stuck thread that asyncio.run would join forever).
    exit_deadline(config.shutdown_grace_s + 1.0, f"control-plane replica {config.replica_id}")
    if not starting.done():
        starting.cancel()
        await asyncio.wait({starting}, timeout=1.0)
    await plane.stop(grace_s=min(3.0, config.shutdown_grace_s / 3))


def main(argv: list[str] | None = None) -> None:
    ns = _parser().parse_args(argv)
    configure_logging(ns.log_level)
    if ns.lease_ttl < 2:
        raise SystemExit("--lease-ttl must be at least 2 seconds")
    if ns.telemetry_interval_ms < 100:
        raise SystemExit("--telemetry-interval-ms must be at least 100")
    tls, require_client_cert, auth = _security(ns)
    etcd_auth = _etcd(ns)
    try:
        retry = parse_backoff(ns.retry_backoff_s)
    except ValueError as exc:
        raise SystemExit(f"--retry-backoff-s: {exc}") from None
    config = ControlPlaneConfig(
        etcd_url=ns.etcd,
        etcd_auth=etcd_auth,
        listen=ns.listen,
        advertise=ns.advertise,
        replica_id=ns.replica_id or default_replica_id(),
        lease_ttl_s=ns.lease_ttl,
        max_message_bytes=ns.max_message_mb << 20,
        telemetry_interval_ms=ns.telemetry_interval_ms,
        keepalive_ms=max(500, ns.keepalive_ms),
        admissions_per_s=max(0.1, ns.admissions_per_s),
        zone=ns.zone.strip(),
        max_in_flight_per_copy=max(0, ns.max_in_flight_per_copy),
        max_in_flight_per_client=max(0, ns.max_in_flight_per_client),
        shutdown_grace_s=max(1.0, ns.shutdown_grace_s),
        unload_confirm_s=max(0.0, ns.unload_confirm_s),
        etcd_keep_revisions=max(100, ns.etcd_keep_revisions),
        tls=tls,
        require_client_cert=require_client_cert,
        auth=auth,
        retry=retry,
        trust_node_labels=ns.trust_node_labels,
        http_listen=_http_listen(ns.http_listen, "meshserve-controlplane"),
        ui_listen=_http_listen(ns.ui_listen, "meshserve-controlplane", "--ui-listen"),
    )
    run(_serve(config, ns.metrics_listen))


if __name__ == "__main__":
    main()
