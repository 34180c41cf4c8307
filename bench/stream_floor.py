"""The memory floor of holding N idle bidirectional gRPC streams in one grpc.aio server.

What a control-plane replica pays per linked node before any meshserve code runs: a bare
grpc.aio server (uvloop, as the replica) with one stream-stream method whose handler reads
until the stream ends -- and, in the second shape, also runs a writer task per stream that
waits on a queue (the replica's shape: a read loop plus a send loop per node). Clients are
``--clients`` processes opening streams 100 per HTTP/2 connection (as ``bench/scale_soak.py``'s
simulated nodes), each stream sending one small message and then staying open. Reported per
count: the server's RSS (MB) and its growth per stream (KB) against the server idle, for both
shapes, so the replica's own RSS at the same count (``bench/scale_soak.py``) can be read as
floor + meshserve's share.

    .venv/bin/python bench/stream_floor.py [--counts 1000,5000,10000] [--clients 2]

Prints one JSON object. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._report import emit  # noqa: E402

METHOD = "/floor.Floor/Connect"
PER_CHANNEL = 100


def log(message: str) -> None:
    print(f"[stream_floor] {message}", file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- the server (a child process: --serve) ----------------------------------------------------


async def _serve(port_file: Path, writer_task: bool) -> None:
    async def connect(requests: Any, context: grpc.aio.ServicerContext) -> None:
        outbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)

        async def send() -> None:
            while True:
                await context.write(await outbox.get())

        task = asyncio.create_task(send()) if writer_task else None
        try:
            async for _ in requests:
                pass
        finally:
            if task is not None:
                task.cancel()

    handler = grpc.method_handlers_generic_handler(
        "floor.Floor", {"Connect": grpc.stream_stream_rpc_method_handler(connect)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))  # noqa: ASYNC240 (once, before serving)
    await server.wait_for_termination()


# -- a client process (--dial) ------------------------------------------------------------------


async def _dial(target: str, count: int, hold_s: float) -> None:
    channels = []
    calls = []
    for first in range(0, count, PER_CHANNEL):
        channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        channels.append(channel)
        await asyncio.wait_for(channel.channel_ready(), 30)
        connect = channel.stream_stream(METHOD)
        for _ in range(min(PER_CHANNEL, count - first)):
            call = connect()
            await call.write(b"hello")
            calls.append(call)
    print("ready", flush=True)
    await asyncio.sleep(hold_s)
    for channel in channels:
        await channel.close()


def _run(coro: Any) -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


# -- the driver -----------------------------------------------------------------------------------


def _measure(counts: list[int], clients: int, writer_task: bool, tmp: Path) -> dict[str, Any]:
    """One fresh server per count (what earlier streams left behind does not count)."""
    rows = []
    for count in counts:
        for attempt in (1, 2, 3):  # a dialer's stream may be cancelled while opening: again
            try:
                rows.append({**_measure_one(count, clients, writer_task, tmp), "attempt": attempt})
                break
            except RuntimeError as exc:
                log(f"{count} streams, attempt {attempt}: {exc}")
        else:
            rows.append({"streams": count, "error": "no attempt opened every stream"})
    return {"counts": rows}


def _measure_one(count: int, clients: int, writer_task: bool, tmp: Path) -> dict[str, Any]:
    port_file = tmp / f"port-{int(writer_task)}-{count}"
    port_file.unlink(missing_ok=True)
    argv = [sys.executable, __file__, "--serve", str(port_file)]
    server = subprocess.Popen(argv + (["--writer-task"] if writer_task else []))
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the floor server did not start")
            time.sleep(0.05)
        target = f"127.0.0.1:{port_file.read_text()}"
        time.sleep(1.0)
        idle = rss_mb(server.pid)
        each = -(-count // clients)
        dialers = [
            subprocess.Popen(
                [sys.executable, __file__, "--dial", target, "--count", str(each)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(clients)
        ]
        try:
            for d in dialers:
                assert d.stdout is not None
                line = d.stdout.readline()  # bounded by the dialer's own hold time
                if line.strip() != "ready":
                    raise RuntimeError(f"a dialer failed before {count} streams were open")
            time.sleep(3.0)
            rss = rss_mb(server.pid)
        finally:
            for d in dialers:
                d.send_signal(signal.SIGTERM)
            for d in dialers:
                try:
                    d.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    d.kill()
                    d.wait()
        held = each * clients
        log(f"writer_task={writer_task} {held} streams: {rss:.1f} MB (idle {idle:.1f} MB)")
        return {
            "streams": held,
            "idle_rss_mb": round(idle, 1),
            "rss_mb": round(rss, 1),
            "kb_per_stream": round((rss - idle) * 1024 / held, 1),
        }
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench/stream_floor.py", description=__doc__)
    p.add_argument("--counts", type=lambda s: [int(c) for c in s.split(",")], default=None)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stream_floor.json")
    p.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--writer-task", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dial", default="", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.serve is not None:
        _run(_serve(ns.serve, ns.writer_task))
        return
    if ns.dial:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        _run(_dial(ns.dial, ns.count, hold_s=120.0))
        return
    counts = ns.counts or [1000, 5000, 10000]
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"stream-floor-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "stream_floor",
        "grpc": grpc.__version__,
        "clients": ns.clients,
        "read_only": _measure(counts, ns.clients, False, tmp),
        "read_and_writer_task": _measure(counts, ns.clients, True, tmp),
    }
    emit(result, ns.out)


if __name__ == "__main__":
    main()
