"""OIP over HTTP/REST vs gRPC through the same replica gateway (issue 17, item 1).

One real mesh (etcd, a control-plane replica started with ``--http-listen``, one node with a
direct port), the MLP 64 -> 256 -> 256 -> 10 at batch 1. Per concurrency C (closed loop: C
coroutines, each sending its next query when the last is answered; every load is bounded by a
request count and by time), three rows through the replica's gateway:

* ``rest_json``    ``tritonclient.http.aio``, inputs and outputs in the JSON tensor encoding;
* ``rest_binary``  ``tritonclient.http.aio``, Triton's binary-data extension both ways;
* ``grpc``         ``tritonclient.grpc.aio`` ModelInfer on the replica's gRPC port.

Each row: req/s, p50, p99, errors (counted, never dropped), and CPU milliseconds per query of
the replica (where REST and gRPC differ: parsing, rendering, the HTTP server), of the node and of
the load generator (the client libraries differ too). The ratios ``rest_json / grpc`` and
``rest_binary / grpc`` (req/s) per C, and the issue's target (REST >= 0.6x gRPC at C=32, stated
for each encoding). ``--runs N`` repeats the matrix on the same mesh: each figure is its median
and [min, max]. The load generator runs in this process on one event loop; the servers are
separate processes on the same machine (a 2-core machine shares its CPUs between them: see
``notes``). Progress goes to stderr, the JSON to stdout (and ``--out``).

    .venv/bin/python bench/rest.py                 # C=1,8,32, 3 runs -> bench/results/rest.json
    .venv/bin/python bench/rest.py --quick         # C=1,8, 1 run, short loads
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tritonclient.grpc.aio as tgrpc  # noqa: E402
import tritonclient.http as thttp_sync  # noqa: E402
import tritonclient.http.aio as thttp  # noqa: E402

from bench._report import emit, spread  # noqa: E402
from bench.servers import process_cpu_s  # noqa: E402
from meshserve.client._admin import AdminClient  # noqa: E402
from meshserve.devtools.demo_models import make_mlp  # noqa: E402
from meshserve.devtools.local import LocalMesh, free_port, wait_until  # noqa: E402
from tests.support.mesh import register_file, wait_copies  # noqa: E402

ROWS = ("rest_json", "rest_binary", "grpc")
MODEL = "mlp"


def _log(message: str) -> None:
    print(f"[rest] {message}", file=sys.stderr, flush=True)


class _Load:
    """One row at one C: C workers, each calling ``call()`` until ``count`` queries are done in
    all or ``seconds`` have passed (after ``warmup`` queries that are not measured)."""

    def __init__(self, count: int, seconds: float, warmup: int) -> None:
        self.count, self.seconds, self.warmup = count, seconds, warmup
        self.latencies: list[int] = []
        self.errors: dict[str, int] = {}

    async def run(self, call: Any, concurrency: int, pids: dict[str, int]) -> dict[str, Any]:
        for _ in range(self.warmup):  # connections open, the copy warm
            await call()
        cpu_before = {name: process_cpu_s(pid) for name, pid in pids.items()}
        started = time.monotonic_ns()
        stop_at = started + int(self.seconds * 1e9)
        left = [self.count]

        async def worker() -> None:
            while left[0] > 0 and time.monotonic_ns() < stop_at:
                left[0] -= 1
                t0 = time.monotonic_ns()
                try:
                    await call()
                except Exception as exc:  # counted, never dropped
                    name = type(exc).__name__
                    self.errors[name] = self.errors.get(name, 0) + 1
                    continue
                self.latencies.append(time.monotonic_ns() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        window_s = (time.monotonic_ns() - started) / 1e9
        ms = np.asarray(self.latencies, dtype=np.float64) / 1e6
        cpu: dict[str, float | None] = {}
        for name, pid in pids.items():
            before, after = cpu_before[name], process_cpu_s(pid)
            spent = None if before is None or after is None else after - before
            cpu[f"{name}_cpu_ms_per_query"] = (
                round(spent * 1000 / ms.size, 4) if spent is not None and ms.size else None
            )
        return {
            **cpu,
            "requests": int(ms.size),
            "errors": sum(self.errors.values()),
            "errors_by_kind": dict(self.errors),
            "rps": round(ms.size / window_s, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 3) if ms.size else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 3) if ms.size else None,
            "window_s": round(window_s, 3),
        }


async def _row(
    row: str,
    grpc_address: str,
    rest_address: str,
    concurrency: int,
    load: _Load,
    pids: dict[str, int],
) -> dict[str, Any]:
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    if row == "grpc":
        client: Any = tgrpc.InferenceServerClient(grpc_address)
        tensor: Any = tgrpc.InferInput("x", [1, 64], "FP32")
        tensor.set_data_from_numpy(x)
        outputs: Any = [tgrpc.InferRequestedOutput("y")]
    else:
        binary = row == "rest_binary"
        client = thttp.InferenceServerClient(rest_address, conn_limit=max(concurrency, 1))
        tensor = thttp.InferInput("x", [1, 64], "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        outputs = [thttp.InferRequestedOutput("y", binary_data=binary)]

    async def call() -> None:
        result = await client.infer(MODEL, [tensor], outputs=outputs)
        if result.as_numpy("y").shape != (1, 10):
            raise RuntimeError("wrong answer shape")

    try:
        return await load.run(call, concurrency, pids)
    finally:
        await client.close()


def _ratios(runs: list[dict[str, Any]], levels: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in levels:
        for enc in ("rest_json", "rest_binary"):
            values = []
            for run in runs:
                grpc_rps = run[str(c)]["grpc"]["rps"]
                values.append(run[str(c)][enc]["rps"] / grpc_rps if grpc_rps else None)
            out.setdefault(str(c), {})[f"{enc}/grpc"] = spread(values, 3)
            cpu = []
            for run in runs:
                rest_ms = run[str(c)][enc]["replica_cpu_ms_per_query"]
                grpc_ms = run[str(c)]["grpc"]["replica_cpu_ms_per_query"]
                cpu.append(rest_ms / grpc_ms if rest_ms and grpc_ms else None)
            out[str(c)][f"{enc}/grpc replica CPU per query"] = spread(cpu, 3)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--count", type=int, default=3000, help="queries per row at most")
    p.add_argument("--seconds", type=float, default=6.0, help="seconds per row at most")
    p.add_argument("--quick", action="store_true", help="C=1,8, 1 run, 1,000 queries / 3 s")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.concurrency, ns.runs, ns.count, ns.seconds = "1,8", 1, 1000, 3.0
    levels = [int(c) for c in ns.concurrency.split(",") if c.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp:
        work = Path(tmp)
        rest_address = f"127.0.0.1:{free_port()}"
        with LocalMesh(work) as mesh:
            mesh.start_etcd()
            cp = mesh.start_controlplane("cp-1", extra=["--http-listen", rest_address])
            node = mesh.start_node("n1", [cp.address], direct=True)
            pids = {"replica": cp.pid, "node": node.pid, "loadgen": os.getpid()}
            with AdminClient(cp.address) as admin:
                register_file(admin, MODEL, make_mlp(work / "mlp.onnx"))
                wait_copies(admin, MODEL, 1)
            probe = thttp_sync.InferenceServerClient(rest_address)
            wait_until(lambda: probe.is_model_ready(MODEL), 30, what="the model ready over REST")
            probe.close()
            runs: list[dict[str, Any]] = []
            for run in range(ns.runs):
                result: dict[str, Any] = {}
                for c in levels:
                    for row in ROWS:
                        load = _Load(ns.count, ns.seconds, warmup=min(100, ns.count))
                        figures = asyncio.run(_row(row, cp.address, rest_address, c, load, pids))
                        result.setdefault(str(c), {})[row] = figures
                        _log(
                            f"run {run + 1}/{ns.runs} C={c} {row}: {figures['rps']} req/s, "
                            f"p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
                            f"errors {figures['errors']}, replica "
                            f"{figures['replica_cpu_ms_per_query']} CPU ms/query"
                        )
                runs.append(result)
    rows: dict[str, Any] = {}
    for c in levels:
        for row in ROWS:
            per = [r[str(c)][row] for r in runs]
            rows.setdefault(str(c), {})[row] = {
                key: spread([f[key] for f in per], 4)
                for key in (
                    "rps",
                    "p50_ms",
                    "p99_ms",
                    "replica_cpu_ms_per_query",
                    "node_cpu_ms_per_query",
                    "loadgen_cpu_ms_per_query",
                )
            } | {"errors": sum(f["errors"] for f in per)}
    ratios = _ratios(runs, levels)
    targets: dict[str, Any] = {}
    if "32" in ratios:
        for enc in ("rest_json", "rest_binary"):
            median = ratios["32"][f"{enc}/grpc"]["median"]
            targets[f"{enc} >= 0.6x grpc at C=32"] = {"measured": median, "met": median >= 0.6}
    emit(
        {
            "benchmark": "rest",
            "model": "mlp 64-256-256-10, batch 1",
            "runs": ns.runs,
            "per_row": {"count_max": ns.count, "seconds_max": ns.seconds},
            "rows": rows,
            "ratios_rps": ratios,
            "targets": targets,
            "raw_runs": runs,
            "notes": [
                f"{os.cpu_count()} CPUs shared by the load generator (this process, one event "
                "loop), the control-plane replica, the node and etcd; nothing pinned",
                "REST and gRPC both go through the replica's embedded gateway to one node's "
                "direct port; the same handler (Gateway.ModelInfer) serves both",
            ],
        },
        ns.out,
    )


if __name__ == "__main__":
    main()
