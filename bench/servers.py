"""Reference servers for the data-plane benchmark, each run in its own process.

``echo``: the transport floor. A bare grpc.aio server with a *generic* handler (no protobuf on
either side) for ``inference.GRPCInferenceService``: ``ModelInfer`` answers every request with a
fixed byte string (``--response-file``: a serialised ``ModelInferResponse`` the size of the real
one; without it the request bytes are echoed), and ``ModelStreamInfer`` answers each message of a
stream with that response wrapped in a ``ModelStreamInferResponse``.

``ort``: what a user would write by hand — a grpc.aio OIP server that decodes the request with
``meshserve.common.codec``, runs ``session.run`` per request in a thread pool (one worker per
core), and
encodes the answer. Same onnxruntime session options as a meshserve node.

Both run on uvloop, like meshserve's own processes::

    .venv/bin/python bench/servers.py echo --listen 127.0.0.1:9100 --response-file resp.bin
    .venv/bin/python bench/servers.py ort --listen 127.0.0.1:9101 --model m.onnx --name mlp

They serve until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

SERVICE = "inference.GRPCInferenceService"
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


def echo_handler(response: bytes | None) -> grpc.GenericRpcHandler:
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


async def serve(args: argparse.Namespace) -> None:
    server = aio.server(options=_OPTIONS)
    if args.kind == "echo":
        response = args.response_file.read_bytes() if args.response_file else None
        server.add_generic_rpc_handlers((echo_handler(response),))
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
