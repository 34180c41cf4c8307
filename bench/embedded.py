"""Embedded-mode benchmark: what running a model through the SDK in-process costs (issue 20).

A real mesh (etcd + one control-plane replica) places nothing on the application: it registers
the MLP (64 -> 256 -> 256 -> 10, batch 1), and this process opens
``MeshClient(cp, embedded=["mlp"])``, which joins as an embedded member, fetches the artifact
(sha256-verified), warms it and answers in this process. Side by side in each round, on the same
input:

* ``floor``     in-process onnxruntime: ``session.run`` on a session with the options the
                member's copies use (one intra-op thread, all graph optimisations);
* ``embedded``  ``client.infer("mlp", {"x": x})`` (lookup, validation, run, accounting, drift
                sketch, answer object).

The added cost is ``embedded - floor`` at p50 (target <= 20 us). Then the member sits idle
(linked, telemetry on) for ``--idle-s`` and the process's CPU time over that window, as a share
of one core, is its background cost (target < 2 %). Rounds alternate; the figures are the
median and [min, max] over ``--rounds`` (>= 3). One JSON object on stdout (and ``--out``).

    .venv/bin/python bench/embedded.py                 # ~1 minute
    .venv/bin/python bench/embedded.py --quick         # ~20 s
"""

from __future__ import annotations

import argparse
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

from bench._report import emit, spread  # noqa: E402

TARGET_ADDED_US = 20.0
TARGET_IDLE_PERCENT = 2.0


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _timed(call: Any, n: int) -> list[float]:
    """Microseconds per call, ``n`` calls (bounded)."""
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        call()
        out.append((clock() - t0) / 1000.0)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    from meshserve.client import EmbeddedOptions, MeshClient
    from meshserve.client._admin import AdminClient
    from meshserve.devtools.demo_models import make_mlp, sha256_file
    from meshserve.devtools.local import LocalMesh

    work = Path(tempfile.mkdtemp(prefix="bench-embedded-"))
    model = make_mlp(work / "mlp.onnx")
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    rounds: list[dict[str, float]] = []
    with LocalMesh(work, lease_ttl_s=5) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        with AdminClient(cp.address) as admin:
            admin.register_model("mlp", model.as_uri(), sha256_file(model), copies=0)
        member = EmbeddedOptions(member_id="bench-app", cache_dir=work / "app")
        with MeshClient(cp.address, timeout=30, embedded=["mlp"], member=member) as client:
            first = client.infer("mlp", {"x": x})  # waits for the load
            assert first.node == "bench-app", first.parameters
            np.testing.assert_allclose(first["y"], session.run(["y"], {"x": x})[0], atol=1e-6)

            def floor() -> None:
                session.run(["y"], {"x": x})

            def embedded() -> None:
                client.infer("mlp", {"x": x})

            _timed(floor, args.calls // 4)  # warm both
            _timed(embedded, args.calls // 4)
            for r in range(args.rounds):
                f = _timed(floor, args.calls)
                e = _timed(embedded, args.calls)
                cpu0, wall0 = time.process_time(), time.monotonic()
                time.sleep(args.idle_s)
                idle = (time.process_time() - cpu0) / (time.monotonic() - wall0) * 100.0
                row = {
                    "floor_p50_us": _p(f, 50),
                    "embedded_p50_us": _p(e, 50),
                    "added_p50_us": _p(e, 50) - _p(f, 50),
                    "floor_p99_us": _p(f, 99),
                    "embedded_p99_us": _p(e, 99),
                    "idle_cpu_percent": idle,
                }
                rounds.append(row)
                print(f"round {r + 1}: {row}", file=sys.stderr)
            status = client.embedded_status()
            linked = status.linked if status is not None else 0
    figures = {k: spread([r[k] for r in rounds], 2) for k in rounds[0]}
    added = figures["added_p50_us"]
    idle_fig = figures["idle_cpu_percent"]
    assert added is not None and idle_fig is not None
    return {
        "benchmark": "embedded",
        "model": "mlp 64-256-256-10, batch 1, FP32",
        "figures": figures,
        "targets": {
            "added_p50_us": {
                "target": f"<= {TARGET_ADDED_US}",
                "median": added["median"],
                "met": added["median"] <= TARGET_ADDED_US,
            },
            "idle_cpu_percent_of_a_core": {
                "target": f"< {TARGET_IDLE_PERCENT}",
                "median": idle_fig["median"],
                "met": idle_fig["median"] < TARGET_IDLE_PERCENT,
            },
        },
        "config": {
            "rounds": args.rounds,
            "calls_per_round": args.calls,
            "idle_s": args.idle_s,
            "member_linked_replicas": linked,
            "cpus": os.cpu_count(),
            "note": "floor and embedded alternate in each round, same process, same input",
        },
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/embedded.py", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=5000, help="calls per row and round")
    p.add_argument("--idle-s", type=float, default=6.0, help="idle window per round")
    p.add_argument("--quick", action="store_true", help="3 rounds, 2000 calls, 3 s idle")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.idle_s = 3, 2000, 3.0
    args.rounds = max(3, args.rounds)
    started = time.monotonic()
    result = run(args)
    result["config"]["wall_s"] = round(time.monotonic() - started, 1)
    emit(result, args.out)


if __name__ == "__main__":
    main()
