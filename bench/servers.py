"""Reference servers for the data-plane benchmark, each run in its own process.

``echo``: the transport floor. A bare grpc.aio server with a *generic* handler (no protobuf on
either side) for ``inference.GRPCInferenceService``: ``ModelInfer`` answers every request with a
fixed byte string (``--response-file``: a serialised ``ModelInferResponse`` the size of the real
one; without it the request bytes are echoed), and ``ModelStreamInfer`` answers each message of a
stream with that response wrapped in a ``ModelStreamInferResponse``. It also serves the node's
multiplexed stream (``meshserve.v1.NodeInference/Infer``): each ``MuxRequest`` is answered with a
``MuxResponse`` of the same id carrying the fixed response (the floor of a multiplexed stream).

``ort``: what a user would write by hand — a grpc.aio OIP server that decodes the request with
``meshserve.common.codec``, runs ``session.run`` per request in a thread pool (one worker per
core), and
encodes the answer. Same onnxruntime session options as a meshserve node.

Both run on uvloop, like meshserve's own processes::

    .venv/bin/python bench/servers.py echo --listen 127.0.0.1:9100 --response-file resp.bin
    .venv/bin/python bench/servers.py ort --listen 127.0.0.1:9101 --model m.onnx --name mlp

They serve until SIGTERM/SIGINT.

Also the pieces the benchmarks share: the benchmark models (:func:`bench_models`), the
in-process onnxruntime floor (:func:`floor_run`), starting a reference server in its own process
(:func:`start_server`) and a model's serving config with batching on or off
(:func:`serving_config`).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from grpc import aio

if TYPE_CHECKING:
    from meshserve.devtools.local import ManagedProcess
    from meshserve.protos import mesh_pb2

SERVICE = "inference.GRPCInferenceService"
MUX_SERVICE = "meshserve.v1.NodeInference"  # the node's multiplexed stream (mesh.proto)
_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.so_reuseport", 0),
]


def ort_session(path: Path, intra_op_threads: int = 1) -> Any:
    """An onnxruntime CPU session with the options a meshserve node uses (node/runtime.py)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def mux_echo_handler(response: bytes | None) -> grpc.GenericRpcHandler[Any, Any]:
    """``NodeInference/Infer`` answering every ``MuxRequest`` with ``response`` under its id
    (one ``MuxResponses`` message per ``MuxRequests`` message)."""
    from meshserve.protos import mesh_pb2

    async def infer(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for raw in requests:
            out = mesh_pb2.MuxResponses()
            for request in mesh_pb2.MuxRequests.FromString(raw).frames:
                body = request.request if response is None else response
                out.frames.add(id=request.id, response=body)
            yield out.SerializeToString()

    return grpc.method_handlers_generic_handler(
        MUX_SERVICE, {"Infer": grpc.stream_stream_rpc_method_handler(infer)}
    )


def echo_handler(response: bytes | None) -> grpc.GenericRpcHandler[Any, Any]:
    """Generic (bytes in, bytes out) handlers for ModelInfer and ModelStreamInfer."""
    from meshserve.protos import inference_pb2

    stream_response = b""
    if response is not None:
        stream_response = inference_pb2.ModelStreamInferResponse(
            infer_response=inference_pb2.ModelInferResponse.FromString(response)
        ).SerializeToString()

    async def unary(request: bytes, context: Any) -> bytes:
        return request if response is None else response

    async def stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request if response is None else stream_response

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(unary),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(stream),
        },
    )


def handwritten_servicer(path: Path, name: str, workers: int) -> Any:
    """The hand-written OIP servicer (see the module docstring)."""
    from meshserve.common.codec import decode_request_inputs, encode_response_outputs
    from meshserve.protos import inference_pb2, inference_pb2_grpc

    session = ort_session(path)
    output_names = [o.name for o in session.get_outputs()]
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers)

    class Handwritten(inference_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        async def ServerLive(self, request: Any, context: Any) -> Any:
            return inference_pb2.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: Any) -> Any:
            return inference_pb2.ServerReadyResponse(ready=True)

        async def ModelReady(self, request: Any, context: Any) -> Any:
            return inference_pb2.ModelReadyResponse(ready=request.name == name)

        async def ModelInfer(self, request: Any, context: Any) -> Any:
            if request.model_name != name:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name}"
                )
            inputs = decode_request_inputs(request)
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(executor, session.run, output_names, inputs)
            response = inference_pb2.ModelInferResponse(model_name=name, id=request.id)
            encode_response_outputs(response, dict(zip(output_names, results, strict=True)))
            return response

    return Handwritten()


# -- pieces the benchmarks share ----------------------------------------------------------------


def log_to_stderr(prefix: str) -> Callable[[str], None]:
    """A progress logger: ``[prefix] message`` on stderr (stdout is for the JSON)."""

    def log(message: str) -> None:
        print(f"[{prefix}] {message}", file=sys.stderr, flush=True)

    return log


@dataclass(frozen=True)
class Model:
    name: str
    path: Path
    input_name: str
    x: np.ndarray[Any, Any]  # one request's input, batch 1
    batch_slo_ms: float  # the adaptive batcher's latency SLO ("the batch latency bound")

    @property
    def shape_arg(self) -> str:
        return ",".join(str(d) for d in self.x.shape)

    @property
    def dtype_arg(self) -> str:
        return {"float32": "FP32", "int32": "INT32"}[str(self.x.dtype)]


MLP_BATCH_SLO_MS = 10.0  # the MLP's adaptive-batching latency SLO: "the batch latency bound"


def bench_models(
    workdir: Path, wanted: Sequence[str], log: Callable[[str], None] = print
) -> list[Model]:
    """The benchmark models: ``mlp`` (64 -> 256 -> 256 -> 10, written to ``workdir``) and
    ``magika`` (the pretrained network inside the ``magika`` wheel, copied to ``workdir``;
    skipped, with a message to ``log``, when it is not installed)."""
    from meshserve.devtools.demo_models import make_mlp

    out = []
    if "mlp" in wanted:
        path = make_mlp(workdir / "mlp.onnx")  # 64 -> 256 -> 256 -> 10, dynamic batch
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        out.append(Model("mlp", path, "x", x, MLP_BATCH_SLO_MS))
    if "magika" in wanted:
        try:
            import magika
        except ImportError:
            log("magika is not installed (pip install '.[bench]'); skipping the magika rows")
        else:
            wheel = Path(magika.__file__).parent / "models" / "standard_v3_3" / "model.onnx"
            path = workdir / "magika.onnx"  # a node reads file:// only under its artifact roots
            shutil.copyfile(wheel, path)
            x = np.random.default_rng(0).integers(0, 256, (1, 2048)).astype(np.int32)
            out.append(Model("magika", path, "bytes", x, 100.0))  # ~12 ms per row here
    return out


def write_payloads(model: Model, workdir: Path) -> tuple[Path, Path]:
    """``<name>.request`` (a serialised ModelInferRequest for ``model.x``) and ``<name>.response``
    (the real serialised answer) in ``workdir``: what the echo server and raw loads send."""
    from meshserve.common.codec import build_request, encode_response_outputs
    from meshserve.protos import inference_pb2

    session = ort_session(model.path)
    outputs = session.run(None, {model.input_name: model.x})
    names = [o.name for o in session.get_outputs()]
    request_file = workdir / f"{model.name}.request"
    request = build_request(model.name, {model.input_name: model.x})
    request_file.write_bytes(request.SerializeToString())
    response = inference_pb2.ModelInferResponse(model_name=model.name)
    encode_response_outputs(response, dict(zip(names, outputs, strict=True)))
    response_file = workdir / f"{model.name}.response"
    response_file.write_bytes(response.SerializeToString())
    return request_file, response_file


def floor_run(
    model: Model, concurrency: int, duration_s: float, warmup_s: float, *, batch: int = 1
) -> dict[str, Any]:
    """C threads calling ``session.run`` in a closed loop (onnxruntime releases the GIL), each
    call on ``batch`` rows (``model.x`` repeated); ``rps`` counts calls, ``rows_per_s`` rows."""
    session = ort_session(model.path)
    feeds = {model.input_name: np.repeat(model.x, batch, axis=0)}
    start = time.perf_counter_ns()
    warm_end = start + int(warmup_s * 1e9)
    end = warm_end + int(duration_s * 1e9)
    samples: list[list[int]] = [[] for _ in range(concurrency)]

    def worker(i: int) -> None:
        clock, mine, run = time.perf_counter_ns, samples[i], session.run
        while True:
            t0 = clock()
            if t0 >= end:
                return
            run(None, feeds)
            if t0 >= warm_end:
                mine.append(clock() - t0)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    stopped = time.perf_counter_ns()
    lat = np.array([v for s in samples for v in s], dtype=np.int64) / 1e6
    rps = lat.size / ((stopped - warm_end) / 1e9)
    return {
        "requests": int(lat.size),
        "errors": 0,
        "rps": round(rps, 1),
        "rows_per_s": round(rps * batch, 1),
        "batch": batch,
        "p50_ms": round(float(np.percentile(lat, 50)), 4),
        "p99_ms": round(float(np.percentile(lat, 99)), 4),
        "mean_ms": round(float(lat.mean()), 4),
    }


def start_server(
    workdir: Path,
    name: str,
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    prefix: Sequence[str] = (),
) -> ManagedProcess:
    """Run ``bench/servers.py ARGS --listen <a free port>`` as ``name`` (``prefix``: e.g.
    ``taskset -c 1``) and wait until it listens."""
    from meshserve.devtools.local import ManagedProcess, free_port, wait_until

    address = f"127.0.0.1:{free_port()}"
    argv = [*prefix, sys.executable, str(Path(__file__).resolve()), *args, "--listen", address]
    proc = ManagedProcess(name, argv, workdir / f"{name}.log", address, env).start()
    wait_until(lambda: "listening" in proc.tail(5), 30, what=f"{name} to listen")
    return proc


def serving_config(batching: bool, slo_ms: float) -> mesh_pb2.ServingConfig:
    """A model's serving config: dynamic batching off, or on (adaptive, up to 32 rows)."""
    from meshserve.protos import mesh_pb2

    if not batching:
        return mesh_pb2.ServingConfig()
    return mesh_pb2.ServingConfig(
        batching=mesh_pb2.BatchingConfig(
            enabled=True,
            max_batch_size=32,
            max_queue_delay_us=2000,
            adaptive=True,
            latency_slo_ms=slo_ms,
            max_queue=4096,
        )
    )


async def serve(args: argparse.Namespace) -> None:
    server = aio.server(options=_OPTIONS)
    if args.kind == "echo":
        response = args.response_file.read_bytes() if args.response_file else None
        server.add_generic_rpc_handlers((echo_handler(response), mux_echo_handler(response)))
    else:
        from meshserve.protos import inference_pb2_grpc

        servicer = handwritten_servicer(args.model, args.name, args.workers)
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(args.listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"{args.kind} server listening on {args.listen}", flush=True)
    await stop.wait()
    await server.stop(1.0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench-servers", description=__doc__)
    sub = p.add_subparsers(dest="kind", required=True)
    echo = sub.add_parser("echo", help="generic-handler echo server (transport floor)")
    echo.add_argument("--listen", required=True)
    echo.add_argument("--response-file", type=Path, default=None)
    ort = sub.add_parser("ort", help="hand-written OIP server over onnxruntime")
    ort.add_argument("--listen", required=True)
    ort.add_argument("--model", type=Path, required=True)
    ort.add_argument("--name", required=True)
    ort.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args))


if __name__ == "__main__":
    main()


# -- processes under test: pinning and CPU time -------------------------------------------------


def pin_threads(pid: int, cores: Sequence[int]) -> bool:
    """Pin every thread of ``pid`` to ``cores`` (``taskset -a -p``): threads created later
    inherit the mask of their creator. False when the process is gone."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return False
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:  # the thread exited meanwhile
            pass
    return True


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` has used so far (psutil when installed, else
    ``/proc/<pid>/stat``: the same figure); None when the process is gone."""
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        psutil = None
    try:
        if psutil is not None:
            times = psutil.Process(pid).cpu_times()
            return float(times.user + times.system)
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    except Exception:  # psutil.NoSuchProcess and friends
        return None
