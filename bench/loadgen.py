"""Closed-loop load generator for any Open Inference Protocol v2 gRPC endpoint.

Works against meshserve (gateway or a node's direct port) and equally against Triton, KServe or
MLServer: it only speaks ``inference.GRPCInferenceService``.

Usage (from the repository root)::

    .venv/bin/python bench/loadgen.py --target 127.0.0.1:8001 --model mlp \\
        --concurrency 32 --duration 5 --shape 1,64 --dtype FP32 [--input-name x]
    .venv/bin/python bench/loadgen.py --target HOST:PORT --model NAME --input-npz inputs.npz

It prints ONE JSON object on stdout::

    {"requests": ..., "errors": ..., "rps": ..., "p50_ms": ..., "p99_ms": ..., "mean_ms": ..., ...}

How it measures:

* ``--concurrency`` workers (asyncio tasks on uvloop, one grpc.aio channel) each loop
  request → response until the time cap (``--warmup`` + ``--duration``) or the request cap
  (``--max-requests``, all workers together) is reached: a closed loop, so the offered load is
  exactly C outstanding requests.
* The ``ModelInferRequest`` is serialised ONCE and sent as raw bytes through a generic
  unary-unary call (no client-side protobuf work per request; responses are not parsed either),
  so the client costs as little as gRPC itself allows.
* ``--mode stream`` instead opens one bidirectional ``ModelStreamInfer`` stream per worker and
  ping-pongs on it (write one request, read one response). A response whose first field is
  ``error_message`` counts as an error (``IN_BAND``).
* Latency is ``time.perf_counter_ns`` around each call. Requests that *start* during the warm-up
  are excluded from ``requests``/``rps``/percentiles; ``rps`` = requests started in the measured
  window / (time the last worker stopped - end of the warm-up).
* ``--mode sdk`` drives meshserve's own ``client.AsyncMeshClient`` (it builds and parses
  every request, as a user's code would); ``--mode triton`` drives ``tritonclient.grpc.aio``
  (the client peers are usually measured with). Both take ``--shape/--dtype/--input-name``.
* Errors are counted by status code (``errors_by_code``), warm-up included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc import aio

from meshserve.common.datatypes import DATATYPES

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
_IN_BAND_ERROR_TAG = b"\x0a"  # ModelStreamInferResponse.error_message is field 1 (length-delim.)


@dataclass
class Recorder:
    """Per-run latency samples and error counts, shared by every worker of one event loop."""

    warmup_end_ns: int
    end_ns: int
    max_requests: int
    issued: int = 0
    starts: array[int] = field(default_factory=lambda: array("q"))
    latencies: array[int] = field(default_factory=lambda: array("q"))
    errors: Counter[str] = field(default_factory=Counter)

    def may_start(self, now_ns: int) -> bool:
        if now_ns >= self.end_ns or self.issued >= self.max_requests:
            return False
        self.issued += 1
        return True

    def ok(self, start_ns: int, end_ns: int) -> None:
        self.starts.append(start_ns)
        self.latencies.append(end_ns - start_ns)

    def error(self, code: str) -> None:
        self.errors[code] += 1


def summarize(recorder: Recorder, stopped_ns: int) -> dict[str, Any]:
    """The JSON figures for one run (see the module docstring for what counts)."""
    starts = np.frombuffer(recorder.starts, dtype=np.int64)
    lat = np.frombuffer(recorder.latencies, dtype=np.int64)
    lat = lat[starts >= recorder.warmup_end_ns]
    window_s = max(stopped_ns - recorder.warmup_end_ns, 1) / 1e9
    out: dict[str, Any] = {
        "requests": int(lat.size),
        "errors": int(sum(recorder.errors.values())),
        "errors_by_code": dict(recorder.errors),
        "rps": round(lat.size / window_s, 1),
        "window_s": round(window_s, 3),
    }
    if lat.size:
        ms = lat / 1e6
        out.update(
            p50_ms=round(float(np.percentile(ms, 50)), 4),
            p90_ms=round(float(np.percentile(ms, 90)), 4),
            p99_ms=round(float(np.percentile(ms, 99)), 4),
            mean_ms=round(float(ms.mean()), 4),
            max_ms=round(float(ms.max()), 4),
        )
    else:
        out.update(p50_ms=None, p90_ms=None, p99_ms=None, mean_ms=None, max_ms=None)
    return out


async def _unary_worker(
    call: aio.UnaryUnaryMultiCallable, payload: bytes, timeout: float, rec: Recorder
) -> None:
    await _call_worker(lambda: call(payload, timeout=timeout), rec, _rpc_code)


def _rpc_code(exc: Exception) -> str:
    return exc.code().name if isinstance(exc, aio.AioRpcError) else type(exc).__name__


async def _stream_worker(
    call: aio.StreamStreamMultiCallable, payload: bytes, timeout: float, rec: Recorder
) -> None:
    clock = time.perf_counter_ns
    stream = call(timeout=timeout)
    try:
        while True:
            start = clock()
            if not rec.may_start(start):
                break
            await stream.write(payload)
            response = await stream.read()
            if response is aio.EOF:
                rec.error("EOF")
                return
            assert isinstance(response, bytes)
            if response[:1] == _IN_BAND_ERROR_TAG:
                rec.error("IN_BAND")
                continue
            rec.ok(start, clock())
        await stream.done_writing()
        code = await stream.code()  # the stream's final status
        if code != grpc.StatusCode.OK:
            rec.error(code.name)
    except aio.AioRpcError as exc:
        rec.error(exc.code().name)
    finally:
        stream.cancel()


async def _call_worker(
    call: Callable[[], Any], rec: Recorder, error_code: Callable[[Exception], str]
) -> None:
    """A worker around an SDK's awaitable ``call()`` (sdk / triton modes)."""
    clock = time.perf_counter_ns
    while True:
        start = clock()
        if not rec.may_start(start):
            return
        try:
            await call()
        except Exception as exc:
            rec.error(error_code(exc))
            continue
        rec.ok(start, clock())


async def run_client_load(
    target: str,
    model: str,
    array: np.ndarray[Any, Any],
    input_name: str,
    *,
    client: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    max_requests: int = 5_000_000,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """Like :func:`run_load`, through a client library: ``sdk`` (meshserve) or ``triton``."""
    now = time.perf_counter_ns()
    warmup_end = now + int(warmup_s * 1e9)
    rec = Recorder(warmup_end, warmup_end + int(duration_s * 1e9), max_requests)
    if client == "sdk":
        from meshserve.client import AsyncMeshClient

        sdk = AsyncMeshClient(target, timeout=timeout_s)
        inputs = {input_name: array}

        def sdk_call() -> Any:
            return sdk.infer(model, inputs)

        def sdk_code(exc: Exception) -> str:
            return str(getattr(exc, "code", type(exc).__name__))

        try:
            await asyncio.gather(
                *(_call_worker(sdk_call, rec, sdk_code) for _ in range(concurrency))
            )
        finally:
            await sdk.close()
    else:
        import tritonclient.grpc.aio as tc
        from tritonclient.utils import np_to_triton_dtype

        triton = tc.InferenceServerClient(target)
        infer_input = tc.InferInput(input_name, list(array.shape), np_to_triton_dtype(array.dtype))
        infer_input.set_data_from_numpy(array)

        def triton_call() -> Any:
            return triton.infer(model, [infer_input], client_timeout=timeout_s)

        def triton_code(exc: Exception) -> str:
            status = getattr(exc, "status", None)
            return str(status() if callable(status) else type(exc).__name__)

        try:
            await asyncio.gather(
                *(_call_worker(triton_call, rec, triton_code) for _ in range(concurrency))
            )
        finally:
            await triton.close()
    out = summarize(rec, time.perf_counter_ns())
    out.update(
        target=target,
        mode=client,
        concurrency=concurrency,
        duration_s=duration_s,
        warmup_s=warmup_s,
    )
    return out


async def run_load(
    target: str,
    payload: bytes,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    max_requests: int = 5_000_000,
    mode: str = "unary",
    timeout_s: float = 10.0,
    channels: int = 1,
) -> dict[str, Any]:
    """Drive ``target`` with ``payload`` (a serialised ModelInferRequest) and summarise."""
    options = [
        ("grpc.max_send_message_length", 256 << 20),
        ("grpc.max_receive_message_length", 256 << 20),
    ]
    chans = [aio.insecure_channel(target, options=options) for _ in range(max(1, channels))]
    try:
        for chan in chans:
            try:
                await asyncio.wait_for(chan.channel_ready(), timeout=10.0)
            except TimeoutError:
                raise SystemExit(f"loadgen: nothing answers at {target} (waited 10 s)") from None
        now = time.perf_counter_ns()
        warmup_end = now + int(warmup_s * 1e9)
        rec = Recorder(warmup_end, warmup_end + int(duration_s * 1e9), max_requests)
        # The stream call's own deadline: the whole run plus a margin.
        stream_timeout = warmup_s + duration_s + timeout_s
        workers = []
        for i in range(concurrency):
            chan = chans[i % len(chans)]
            if mode == "stream":
                scall = chan.stream_stream(
                    MODEL_STREAM_INFER, request_serializer=None, response_deserializer=None
                )
                workers.append(_stream_worker(scall, payload, stream_timeout, rec))
            else:
                ucall = chan.unary_unary(
                    MODEL_INFER, request_serializer=None, response_deserializer=None
                )
                workers.append(_unary_worker(ucall, payload, timeout_s, rec))
        await asyncio.gather(*workers)
        stopped = time.perf_counter_ns()
    finally:
        await asyncio.gather(*(c.close(None) for c in chans), return_exceptions=True)
    out = summarize(rec, stopped)
    out.update(
        target=target,
        mode=mode,
        concurrency=concurrency,
        duration_s=duration_s,
        warmup_s=warmup_s,
        request_bytes=len(payload),
    )
    return out


def run_on_uvloop(
    coro: Coroutine[Any, Any, dict[str, Any]], *, use_uvloop: bool = True
) -> tuple[dict[str, Any], bool]:
    """Run ``coro`` on uvloop when installed (and wanted); return its result and whether it was."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro), factory is not None


def _random_input(shape: list[int], datatype: str, seed: int = 0) -> np.ndarray[Any, Any]:
    if datatype not in DATATYPES:
        raise SystemExit(f"unsupported --dtype {datatype}; use one of {sorted(DATATYPES)}")
    dtype = DATATYPES[datatype]
    rng = np.random.default_rng(seed)
    if datatype == "BYTES":
        return np.full(shape, b"x", dtype=object)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def build_payload(args: argparse.Namespace) -> bytes:
    """The serialised ModelInferRequest for the command line's model and inputs."""
    from meshserve.common.codec import build_request

    if args.input_npz:
        with np.load(args.input_npz, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    else:
        shape = [int(d) for d in args.shape.split(",") if d.strip()]
        arrays = {args.input_name: _random_input(shape, args.dtype.upper())}
    request = build_request(
        args.model, arrays, outputs=args.output or None, version=args.model_version
    )
    return bytes(request.SerializeToString())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loadgen", description="Closed-loop OIP v2 gRPC load generator (prints JSON)."
    )
    p.add_argument("--target", required=True, help="host:port of an OIP v2 gRPC endpoint")
    p.add_argument("--model", default="", help="model name (ignored with --request-file)")
    p.add_argument("--model-version", default="")
    p.add_argument("--concurrency", type=int, default=1, help="closed-loop workers")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds excluded from figures")
    p.add_argument("--max-requests", type=int, default=5_000_000, help="cap, all workers")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, seconds")
    p.add_argument("--mode", choices=("unary", "stream", "sdk", "triton"), default="unary")
    p.add_argument("--channels", type=int, default=1, help="gRPC channels (connections)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input-npz", type=Path, help="inputs: one array per input name")
    src.add_argument("--request-file", type=Path, help="a serialised ModelInferRequest, sent as is")
    p.add_argument("--shape", default="1,64", help="random input shape (no --input-npz)")
    p.add_argument("--dtype", default="FP32", help="OIP datatype of the random input")
    p.add_argument("--input-name", default="x", help="name of the random input")
    p.add_argument("--output", action="append", default=[], help="requested output (repeat)")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0 or args.warmup < 0 or args.max_requests < 1:
        raise SystemExit("--concurrency, --duration and --max-requests must be positive")
    if args.mode in ("sdk", "triton"):
        if not args.model or args.request_file or args.input_npz:
            raise SystemExit(f"--mode {args.mode} takes --model with --shape/--dtype/--input-name")
        shape = [int(d) for d in args.shape.split(",") if d.strip()]
        client_coro = run_client_load(
            args.target,
            args.model,
            _random_input(shape, args.dtype.upper()),
            args.input_name,
            client=args.mode,
            concurrency=args.concurrency,
            duration_s=args.duration,
            warmup_s=args.warmup,
            max_requests=args.max_requests,
            timeout_s=args.timeout,
        )
        result, uvloop_on = run_on_uvloop(client_coro, use_uvloop=not args.no_uvloop)
        result.update(uvloop=uvloop_on, grpcio=grpc.__version__)
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        return
    if args.request_file:
        payload = args.request_file.read_bytes()
    else:
        if not args.model:
            raise SystemExit("--model is required (or --request-file)")
        payload = build_payload(args)
    coro = run_load(
        args.target,
        payload,
        concurrency=args.concurrency,
        duration_s=args.duration,
        warmup_s=args.warmup,
        max_requests=args.max_requests,
        mode=args.mode,
        timeout_s=args.timeout,
        channels=args.channels,
    )
    result, uvloop_on = run_on_uvloop(coro, use_uvloop=not args.no_uvloop)
    result["uvloop"] = uvloop_on
    result["grpcio"] = grpc.__version__
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
