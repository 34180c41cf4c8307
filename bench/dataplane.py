"""Data-plane benchmark: what a query costs through the mesh, against the physical floor.

One run, one machine, one load generator (``bench/loadgen.py``, a closed loop in its own
process) for every row. Per model and concurrency it measures:

* ``floor``           in-process onnxruntime (``session.run`` on C threads, batch 1);
* ``echo_unary``      a bare grpc.aio unary echo with the same request/response bytes;
* ``echo_stream``     the same echo as ping-pong on an open bidirectional stream;
* ``handwritten``     a bare grpc.aio OIP server calling onnxruntime per request;
* ``node_direct``     a meshserve node's own port (one hop);
* ``gateway_direct``  the control plane's gateway, forwarding to the node's direct port;
* ``gateway_tunnel``  the gateway, forwarding over the node's dial-out stream (NAT'd node);
* ``sdk``             ``client.AsyncMeshClient`` through the gateway (builds requests per call);

the mesh rows with batching off and on. Optionally (``--triton-rows``) the same load is offered
with ``tritonclient.grpc.aio`` at concurrency 32, the client the peers' figures were taken with.

It prints ONE JSON object on stdout: every row, the ratios to the floor, the per-hop overhead
beyond transport + compute, and each target of the issue with its verdict. Progress goes to
stderr. Every load run is capped in time (``--warmup`` + ``--duration``) and in count.

    .venv/bin/python bench/dataplane.py                 # full run, ~6 minutes
    .venv/bin/python bench/dataplane.py --quick         # MLP only, short runs, ~1 minute
    .venv/bin/python bench/dataplane.py --monitoring-only   # monitoring on/off, ~1 minute

Monitoring on/off (``run_monitoring``): node direct, MLP, C=32, two identical nodes; "on" has
tracing at the default sampling, metrics and drift sketches, "off" none (alternating rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._report import emit  # noqa: E402
from bench.servers import (  # noqa: E402
    MLP_BATCH_SLO_MS as BATCH_SLO_MS,
)
from bench.servers import (  # noqa: E402
    Model,
    floor_run,
    log_to_stderr,
    write_payloads,
)
from bench.servers import bench_models as _bench_models  # noqa: E402
from bench.servers import serving_config as _serving  # noqa: E402
from bench.servers import start_server as _server  # noqa: E402
from meshserve.client._admin import AdminClient  # noqa: E402
from meshserve.devtools.demo_models import sha256_file  # noqa: E402
from meshserve.devtools.local import LocalMesh, free_port, wait_until  # noqa: E402
from meshserve.protos import mesh_pb2  # noqa: E402

# Peers measured on this machine (issue 3): same MLP, tritonclient.grpc closed loop, C=32, 10 s.
PEERS_RPS = {"kserve": 1570.0, "mlserver": 1400.0, "pytriton": 1400.0, "ray_serve": 170.0}
log = log_to_stderr("dataplane")


def _models(workdir: Path, wanted: list[str]) -> list[Model]:
    return _bench_models(workdir, wanted, log)


# -- the processes under test ----------------------------------------------------------------


def _mesh_name(model: str, path: str, batching: bool) -> str:
    return f"{model}-{path}" + ("-b" if batching else "")


def _loadgen(
    target: str,
    model_name: str,
    model: Model,
    concurrency: int,
    args: argparse.Namespace,
    env: dict[str, str],
    *,
    mode: str = "unary",
    request_file: Path | None = None,
) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(ROOT / "bench" / "loadgen.py"),
        "--target",
        target,
        "--concurrency",
        str(concurrency),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--max-requests",
        str(args.max_requests),
        "--mode",
        mode,
    ]
    if request_file is not None:
        argv += ["--request-file", str(request_file)]
    else:
        argv += [
            "--model",
            model_name,
            "--shape",
            model.shape_arg,
            "--dtype",
            model.dtype_arg,
            "--input-name",
            model.input_name,
        ]
    cap = args.warmup + args.duration + 60
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=cap, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _row(
    kind: str, model: str, concurrency: int, batching: bool | None, figures: dict[str, Any]
) -> dict[str, Any]:
    keep = ("rps", "p50_ms", "p99_ms", "mean_ms", "requests", "errors", "errors_by_code")
    row = {"path": kind, "model": model, "concurrency": concurrency, "batching": batching}
    row.update({k: figures[k] for k in keep if k in figures})
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="meshserve-bench-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    models = _models(workdir, args.models)
    concurrencies = args.concurrency
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + args.max_total_s

    def budget_left() -> bool:
        if time.monotonic() > deadline:
            log(f"--max-total-s {args.max_total_s:.0f}s reached; skipping the remaining rows")
            return False
        return True

    with LocalMesh(workdir, lease_ttl_s=5, env=env) as mesh:
        log(f"workdir {workdir}; starting etcd, a control plane and two nodes")
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        mesh.start_node("node-direct", [cp.address], labels={"path": "direct"}, direct=True)
        mesh.start_node("node-tunnel", [cp.address], labels={"path": "tunnel"})
        mesh.start_node(  # the same node on asyncio's default loop: is uvloop worth it?
            "node-asyncio",
            [cp.address],
            labels={"path": "asyncio"},
            direct=True,
            env={"MESHSERVE_UVLOOP": "0"},
        )
        with AdminClient(cp.address) as admin:
            for m in models:
                for path in ("direct", "tunnel"):
                    for batching in (False, True):
                        admin.register_model(
                            _mesh_name(m.name, path, batching),
                            m.path.as_uri(),
                            sha256_file(m.path),
                            node_selector={"path": path},
                            serving=_serving(batching, m.batch_slo_ms),
                        )
                admin.register_model(
                    _mesh_name(m.name, "asyncio", False),
                    m.path.as_uri(),
                    sha256_file(m.path),
                    node_selector={"path": "asyncio"},
                )
            want = 5 * len(models)
            wait_until(
                lambda: (
                    sum(c.state == mesh_pb2.READY for n in admin.list_nodes() for c in n.copies)
                    >= want
                ),
                120,
                what=f"{want} READY copies",
            )
            nodes = {n.node_id: n.direct_address for n in admin.list_nodes()}
            direct, direct_asyncio = nodes["node-direct"], nodes["node-asyncio"]
        log(f"mesh ready: gateway {cp.address}, node direct port {direct}")

        for m in models:
            request_file, response_file = write_payloads(m, workdir)
            echo = _server(
                workdir, f"echo-{m.name}", ["echo", "--response-file", str(response_file)], env
            )
            hand = _server(
                workdir,
                f"handwritten-{m.name}",
                ["ort", "--model", str(m.path), "--name", m.name],
                env,
            )
            try:
                for c in concurrencies:
                    if not budget_left():
                        break
                    log(f"{m.name} C={c}: floor, echo, hand-written")
                    figures = floor_run(m, c, args.duration, args.warmup)
                    rows.append(_row("floor", m.name, c, None, figures))
                    for mode in ("unary", "stream"):
                        figures = _loadgen(
                            echo.address,
                            m.name,
                            m,
                            c,
                            args,
                            env,
                            mode=mode,
                            request_file=request_file,
                        )
                        rows.append(_row(f"echo_{mode}", m.name, c, None, figures))
                    figures = _loadgen(hand.address, m.name, m, c, args, env)
                    rows.append(_row("handwritten", m.name, c, None, figures))
                    for batching in (False, True):
                        log(f"{m.name} C={c} batching={'on' if batching else 'off'}: mesh paths")
                        targets = {
                            "node_direct": (direct, _mesh_name(m.name, "direct", batching)),
                            "gateway_direct": (cp.address, _mesh_name(m.name, "direct", batching)),
                            "gateway_tunnel": (cp.address, _mesh_name(m.name, "tunnel", batching)),
                        }
                        for kind, (target, name) in targets.items():
                            figures = _loadgen(target, name, m, c, args, env)
                            rows.append(_row(kind, m.name, c, batching, figures))
                        figures = _loadgen(
                            cp.address, targets["gateway_direct"][1], m, c, args, env, mode="sdk"
                        )
                        rows.append(_row("sdk", m.name, c, batching, figures))
                    name = _mesh_name(m.name, "asyncio", False)
                    figures = _loadgen(direct_asyncio, name, m, c, args, env)
                    rows.append(_row("node_direct_asyncio_loop", m.name, c, False, figures))
                if args.triton_rows and m.name == "mlp" and budget_left():
                    log("mlp C=32: tritonclient.grpc.aio against node and gateway")
                    for kind, target in (("node_direct", direct), ("gateway_direct", cp.address)):
                        for batching in (False, True):
                            name = _mesh_name(m.name, "direct", batching)
                            figures = _loadgen(target, name, m, 32, args, env, mode="triton")
                            rows.append(_row(f"{kind}_tritonclient", m.name, 32, batching, figures))
                    figures = _loadgen(hand.address, m.name, m, 32, args, env, mode="triton")
                    rows.append(_row("handwritten_tritonclient", m.name, 32, None, figures))
            finally:
                echo.stop()
                hand.stop()
    return {"rows": rows, "summary": summarize(rows), "config": _config(args)}


def run_monitoring(args: argparse.Namespace) -> dict[str, Any]:
    """Monitoring on vs off, node direct, MLP, C=32: two identical nodes side by side; "on" has
    tracing at the default sampling (exported, batched, to its log), the Prometheus endpoint and
    drift sketches of all 64 input features and the output; "off" has none of them. Rounds
    alternate off/on so drift in the machine's load hits both alike; the ratio of the medians
    is the cost."""
    from meshserve.common.sketches import build_profile

    workdir = Path(tempfile.mkdtemp(prefix="meshserve-bench-monitoring-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    model = _models(workdir, ["mlp"])[0]
    rounds = args.monitoring_rounds
    rows: list[dict[str, Any]] = []
    with LocalMesh(workdir, lease_ttl_s=5, env=env) as mesh:
        log("monitoring on/off: etcd, a control plane, node-plain and node-monitored")
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        mesh.start_node("node-plain", [cp.address], labels={"path": "plain"}, direct=True)
        mesh.start_node(
            "node-monitored",
            [cp.address],
            labels={"path": "monitored"},
            direct=True,
            extra=["--metrics-listen", f"127.0.0.1:{free_port()}"],
            env={  # the production setting: 1 % of queries traced (default: all of them)
                "MESHSERVE_TRACE_CONSOLE": "1",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.01",
            },
        )
        rng = np.random.default_rng(0)
        sample = rng.standard_normal((2000, *model.x.shape[1:])).astype(model.x.dtype)
        profile = build_profile(sample, None, input_name=model.input_name, source="bench")
        with AdminClient(cp.address) as admin:
            for path, monitoring in (
                ("plain", mesh_pb2.MonitoringConfig(drift_off=True)),
                ("monitored", mesh_pb2.MonitoringConfig()),
            ):
                admin.register_model(
                    f"mlp-{path}",
                    model.path.as_uri(),
                    sha256_file(model.path),
                    node_selector={"path": path},
                    serving=mesh_pb2.ServingConfig(monitoring=monitoring),
                )
            admin.set_drift_profile("mlp-monitored", "default", profile)
            wait_until(
                lambda: (
                    sum(c.state == mesh_pb2.READY for n in admin.list_nodes() for c in n.copies)
                    >= 2
                ),
                120,
                what="2 READY copies",
            )
            nodes = {n.node_id: n.direct_address for n in admin.list_nodes()}
        for i in range(rounds):
            for path in ("plain", "monitored"):
                log(f"monitoring round {i + 1}/{rounds}: {path}")
                figures = _loadgen(nodes[f"node-{path}"], f"mlp-{path}", model, 32, args, env)
                rows.append(_row(f"node_direct_{path}", "mlp", 32, False, figures))
    # After the mesh stopped: the node's stdout (where the console exporter writes) is flushed.
    traced = sum(1 for line in (workdir / "node-monitored.log").open() if '"trace_id"' in line)
    off = float(np.median([r["rps"] for r in rows if r["path"] == "node_direct_plain"]))
    on = float(np.median([r["rps"] for r in rows if r["path"] == "node_direct_monitored"]))
    cost = 1.0 - on / off
    return {
        "rows": rows,
        "off_rps_median": round(off, 1),
        "on_rps_median": round(on, 1),
        "cost": round(cost, 4),
        "requests_monitored": sum(r["requests"] for r in rows if "monitored" in r["path"]),
        "spans_exported": traced,
        "target": {
            "monitoring (tracing at default sampling + metrics + drift sketches) costs <= 5% "
            "of throughput at C=32 (node direct)": {"cost": round(cost, 4), "met": cost <= 0.05}
        },
    }


def _config(args: argparse.Namespace) -> dict[str, Any]:
    import grpc
    import onnxruntime

    return {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "concurrency": args.concurrency,
        "cores": os.cpu_count(),
        "grpcio": grpc.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": sys.version.split()[0],
        "batch_latency_slo_ms": BATCH_SLO_MS,
    }


# -- figures against the targets -------------------------------------------------------------


def _find(
    rows: list[dict[str, Any]], path: str, model: str, c: int, batching: bool | None
) -> dict[str, Any] | None:
    for row in rows:
        if (row["path"], row["model"], row["concurrency"]) == (path, model, c) and (
            batching is None or row["batching"] == batching
        ):
            return row
    return None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"ratios_to_floor": [], "overhead_us": {}, "targets": {}}
    for row in rows:
        floor = _find(rows, "floor", row["model"], row["concurrency"], None)
        if floor and row["path"] != "floor" and row.get("rps"):
            out["ratios_to_floor"].append(
                {
                    "path": row["path"],
                    "model": row["model"],
                    "concurrency": row["concurrency"],
                    "batching": row["batching"],
                    "rps_ratio": round(row["rps"] / floor["rps"], 3),
                    "p50_ratio": round(row["p50_ms"] / floor["p50_ms"], 2),
                }
            )
    targets = out["targets"]
    for model in sorted({r["model"] for r in rows}):
        floor = _find(rows, "floor", model, 1, None)
        unary = _find(rows, "echo_unary", model, 1, None)
        stream = _find(rows, "echo_stream", model, 1, None)
        if not (floor and unary and stream):
            continue
        per_hop: dict[str, float] = {}
        node = _find(rows, "node_direct", model, 1, False)
        gw = _find(rows, "gateway_direct", model, 1, False)
        tun = _find(rows, "gateway_tunnel", model, 1, False)
        base = floor["p50_ms"]
        if node:
            per_hop["node_direct"] = (node["p50_ms"] - unary["p50_ms"] - base) * 1000
        if gw:
            per_hop["gateway_direct"] = (gw["p50_ms"] - 2 * unary["p50_ms"] - base) * 500
        if tun:
            per_hop["gateway_tunnel"] = (
                tun["p50_ms"] - unary["p50_ms"] - stream["p50_ms"] - base
            ) * 500
        out["overhead_us"][model] = {k: round(v, 1) for k, v in per_hop.items()}
        targets[f"{model}: overhead per hop <= 100 us p50 at C=1"] = {
            "value_us": {k: round(v, 1) for k, v in per_hop.items()},
            "met": all(v <= 100 for v in per_hop.values()),
        }
    on = _find(rows, "node_direct", "mlp", 32, True)
    off = _find(rows, "node_direct", "mlp", 32, False)
    if on and off:
        targets["mlp C=32: batching on >= 3x batching off (node direct)"] = {
            "on_rps": on["rps"],
            "off_rps": off["rps"],
            "ratio": round(on["rps"] / off["rps"], 2),
            "met": on["rps"] >= 3 * off["rps"],
        }
        targets["mlp C=32 batching on: p99 <= 2x the batch latency bound"] = {
            "p99_ms": on["p99_ms"],
            "bound_ms": 2 * BATCH_SLO_MS,
            "met": on["p99_ms"] <= 2 * BATCH_SLO_MS,
        }
    gw_on = _find(rows, "gateway_direct", "mlp", 32, True)
    hand = _find(rows, "handwritten", "mlp", 32, None)
    if gw_on and hand:
        targets["mlp C=32: gateway (batching on) >= 2x hand-written grpc.aio + onnxruntime"] = {
            "gateway_rps": gw_on["rps"],
            "handwritten_rps": hand["rps"],
            "ratio": round(gw_on["rps"] / hand["rps"], 2),
            "met": gw_on["rps"] >= 2 * hand["rps"],
        }
    best = max(PEERS_RPS.values())
    for kind, factor in (("node_direct", 1.5), ("gateway_direct", 1.0)):
        mine = [
            r
            for r in rows
            if r["model"] == "mlp" and r["concurrency"] == 32 and r["path"].startswith(kind)
        ]
        if mine:
            top = max(mine, key=lambda r: r["rps"])
            targets[f"mlp C=32: {kind} >= {factor}x the best peer ({best:.0f} req/s)"] = {
                "rps": top["rps"],
                "row": f"{top['path']} batching={top['batching']}",
                "ratio": round(top["rps"] / best, 2),
                "met": top["rps"] >= factor * best,
            }
    out["uvloop_vs_asyncio"] = [
        {
            "model": r["model"],
            "concurrency": r["concurrency"],
            "uvloop_rps": uv["rps"],
            "asyncio_rps": r["rps"],
            "ratio": round(uv["rps"] / r["rps"], 2),
        }
        for r in rows
        if r["path"] == "node_direct_asyncio_loop"
        and (uv := _find(rows, "node_direct", r["model"], r["concurrency"], False))
    ]
    errors = sum(r.get("errors", 0) for r in rows)
    targets["0 errors in every row"] = {"errors": errors, "met": errors == 0}
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/dataplane.py", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per row")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per row")
    p.add_argument(
        "--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8, 32]
    )
    p.add_argument("--models", type=lambda s: s.split(","), default=["mlp", "magika"])
    p.add_argument("--max-requests", type=int, default=1_000_000, help="cap per row")
    p.add_argument("--max-total-s", type=float, default=1200.0, help="cap for the whole run")
    p.add_argument("--no-triton-rows", dest="triton_rows", action="store_false")
    p.add_argument("--quick", action="store_true", help="MLP only, 1 s rows")
    p.add_argument("--monitoring-rounds", type=int, default=6, help="off/on pairs (C=32)")
    p.add_argument(
        "--monitoring-only", action="store_true", help="only the monitoring on/off comparison"
    )
    p.add_argument("--no-monitoring", dest="monitoring", action="store_false")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.quick:
        args.models, args.duration, args.warmup = ["mlp"], 1.0, 0.3
    started = time.monotonic()
    if args.monitoring_only:
        result = {"monitoring": run_monitoring(args), "config": _config(args)}
    else:
        result = run(args)
        if args.monitoring:
            result["monitoring"] = run_monitoring(args)
    result["config"]["wall_s"] = round(time.monotonic() - started, 1)
    emit(result, args.out)


if __name__ == "__main__":
    main()
