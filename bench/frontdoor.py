"""Front-door benchmark (issue 15): every way a query can reach a model, side by side, in one run.

Per model (the MLP 64 -> 256 -> 256 -> 10 and magika, compute-bound) and concurrency C (closed
loop; every load is bounded by a request count and by time), the rows are:

* ``floor``                 in-process onnxruntime (``session.run`` on C threads, batch 1);
* ``echo_unary``            a bare grpc.aio unary echo with the model's request/response bytes;
* ``echo_stream``           the same echo on one bidi stream, requests multiplexed by id
                            (``NodeInference/Infer`` framing: the floor of a multiplexed stream);
* ``handwritten``           a hand-written grpc.aio + onnxruntime OIP server (``bench/servers.py
                            ort``): the stand-in for a standalone peer such as KServe;
* ``node_unary``            OIP ModelInfer on a node's own ``--listen`` port;
* ``node_stream``           the node's multiplexed ``NodeInference.Infer`` stream through
                            ``meshserve.common.mux.MuxChannel``;
* ``gateway_direct``        the replica's gateway forwarding to a node with a direct port;
* ``gateway_tunnel``        the gateway forwarding to a tunnel-only node (no ``--listen``);
* ``sdk_routed_unary`` / ``sdk_routed_stream``   ``AsyncMeshClient(routing="direct")``;
* ``sdk_gateway``           ``AsyncMeshClient`` through the gateway (``routing="gateway"``);
* ``standalone_gateway_1`` / ``standalone_gateway_2``   one / two ``meshserve-gateway`` processes
                            (with two, the load's client is given both addresses and sends
                            each query to the next one in turn).

Rows whose piece does not exist yet are recorded as ``{"skipped": reason}``. Every row: req/s,
p50, p99, errors (counted, never dropped), CPU seconds per 1,000 queries of each server process
involved and of the load generator, and its ratios to ``node_unary`` and ``handwritten`` at the
same C. Then batching: magika at C=32, node dynamic batching on vs off, against the gain
in-process onnxruntime gets from batch 32 over batch 1. ``--runs N`` repeats the whole matrix:
each figure is reported as its median and [min, max]. Each target of the issue is evaluated
under ``targets``.

The load generator is a separate process (this script's ``drive`` subcommand, built from
``bench/loadgen.py``'s workers), pinned to core 0 while every server process is pinned to the
other cores (see ``notes`` in the JSON). Progress goes to stderr, the JSON to stdout.

    .venv/bin/python bench/frontdoor.py                     # full matrix, 3 runs, ~20 min
    .venv/bin/python bench/frontdoor.py --quick             # MLP, C=1,8, 1 run: ~1 min
    .venv/bin/python bench/frontdoor.py --quick --rows floor,echo,node
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._report import emit, spread  # noqa: E402
from bench.servers import (  # noqa: E402
    MUX_SERVICE,
    Model,
    bench_models,
    floor_run,
    log_to_stderr,
    pin_threads,
    process_cpu_s,
    serving_config,
    start_server,
    write_payloads,
)

log = log_to_stderr("frontdoor")

ROWS = {
    "floor": ("floor",),
    "echo": ("echo_unary", "echo_stream"),
    "handwritten": ("handwritten",),
    "node": ("node_unary", "node_stream"),
    "gateway": ("gateway_direct", "gateway_tunnel"),
    "sdk": ("sdk_routed_unary", "sdk_routed_stream", "sdk_gateway"),
    "standalone": ("standalone_gateway_1", "standalone_gateway_2"),
}
ALL_ROWS = tuple(r for rows in ROWS.values() for r in rows)
BASELINES = ("node_unary", "handwritten")  # every row's ratios are to these, at the same C
BATCH_MODEL, BATCH_C, BATCH_N = "magika", 32, 32  # the batching row (max_batch_size 32)
MUX_PATH = f"/{MUX_SERVICE}/Infer"
STREAM_PARAMS = ("transport", "stream", "streams", "multiplex")  # an SDK stream switch
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
]


# -- the load generator: a separate process (``frontdoor.py drive SPEC``) -------------------------


async def _mux_stream_load(
    target: str, payload: bytes, concurrency: int, timeout_s: float, rec: Any
) -> None:
    """C workers sharing ONE bidi stream, requests multiplexed by id (``MuxRequest`` framing)."""
    import grpc
    from grpc import aio

    from meshserve.protos import mesh_pb2

    clock = time.perf_counter_ns
    names = {status.value[0]: status.name for status in grpc.StatusCode}
    pending: dict[int, asyncio.Future[int]] = {}
    outbox: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def requests() -> Any:
        while (item := await outbox.get()) is not None:
            yield item

    async with aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
        call = channel.stream_stream(MUX_PATH, request_serializer=None, response_deserializer=None)
        stream = call(requests(), timeout=rec_window_s(rec) + timeout_s)

        async def reader() -> None:
            ended: Exception = ConnectionError("the stream ended")
            try:
                async for raw in stream:
                    for answer in mesh_pb2.MuxResponses.FromString(raw).frames:
                        future = pending.pop(answer.id, None)
                        if future is not None and not future.done():
                            future.set_result(answer.status_code)
            except aio.AioRpcError as exc:
                ended = exc
            for future in pending.values():  # nothing more will come: fail the waiting calls
                if not future.done():
                    future.set_exception(ended)

        reading = asyncio.ensure_future(reader())
        next_id = 0

        async def worker() -> None:
            nonlocal next_id
            loop = asyncio.get_running_loop()
            while True:
                start = clock()
                if not rec.may_start(start):
                    return
                next_id += 1
                mine = next_id
                future: asyncio.Future[int] = loop.create_future()
                pending[mine] = future
                frame = mesh_pb2.MuxRequests(
                    frames=[mesh_pb2.MuxRequest(id=mine, request=payload)]
                ).SerializeToString()  # one query per message: the bare stream's floor
                outbox.put_nowait(frame)
                try:
                    async with asyncio.timeout(timeout_s):
                        code = await future
                except TimeoutError:
                    pending.pop(mine, None)
                    rec.error("DEADLINE_EXCEEDED")
                    continue
                except Exception as exc:  # the stream broke: this worker is done
                    rec.error(_code(exc))
                    return
                if code:
                    rec.error(names.get(code, f"STATUS_{code}"))
                else:
                    rec.ok(start, clock())

        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            outbox.put_nowait(None)
            try:
                await asyncio.wait_for(reading, 5.0)
            except (TimeoutError, asyncio.CancelledError):
                stream.cancel()


def rec_window_s(rec: Any) -> float:
    """Seconds left until the recorder's time cap."""
    return max(0.0, (int(rec.end_ns) - time.perf_counter_ns()) / 1e9)


def mux_channel_caller(target: str) -> tuple[Callable[[bytes, float], Any], Callable[[], Any]]:
    """``(call(payload, timeout), close())`` over ``meshserve.common.mux.MuxChannel``: one
    stream to ``target``, the serialized request passed through unchanged."""
    from grpc import aio

    from meshserve.common.mux import MuxChannel

    channel = aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
    mux = MuxChannel(channel)

    async def call(payload: bytes, timeout: float) -> bytes:
        return await mux.call(payload, timeout=timeout)

    async def close() -> None:
        await mux.close()
        await channel.close(None)

    return call, close


async def _drive(spec: dict[str, Any]) -> dict[str, Any]:
    from grpc import aio

    from bench.loadgen import MODEL_INFER, Recorder, _call_worker, summarize

    c, timeout_s = int(spec["concurrency"]), float(spec["timeout_s"])
    payload = _read(spec.get("request_file"))
    mode, targets = spec["mode"], spec["targets"]
    channels = []
    if mode == "unary":  # one channel per target, connected before the clock starts
        channels = [aio.insecure_channel(t, options=_CHANNEL_OPTIONS) for t in targets]
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 10.0)
    now = time.perf_counter_ns()
    warm_end = now + int(spec["warmup_s"] * 1e9)
    rec = Recorder(warm_end, warm_end + int(spec["duration_s"] * 1e9), int(spec["max_requests"]))
    cpu0 = time.process_time()
    if mode == "unary":  # with several targets, each query goes to the next (round robin)
        try:
            calls = [
                ch.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
                for ch in channels
            ]
            turn = itertools.cycle(calls)
            await asyncio.gather(
                *(
                    _call_worker(lambda: next(turn)(payload, timeout=timeout_s), rec, _code)
                    for _ in range(c)
                )
            )
        finally:
            await asyncio.gather(*(ch.close(None) for ch in channels))
    elif mode == "mux":
        await _mux_stream_load(targets[0], payload, c, timeout_s, rec)
    elif mode == "mux_channel":
        call, close = mux_channel_caller(targets[0])
        try:
            await asyncio.gather(
                *(_call_worker(lambda: call(payload, timeout_s), rec, _code) for _ in range(c))
            )
        finally:
            await close()
    elif mode == "sdk":
        from meshserve.client import AsyncMeshClient

        x = np.load(spec["input_npy"])
        sdk = AsyncMeshClient(",".join(targets), timeout=timeout_s, **spec["sdk_kwargs"])
        inputs = {spec["input_name"]: x}
        try:
            await asyncio.gather(
                *(
                    _call_worker(lambda: sdk.infer(spec["model"], inputs), rec, _code)
                    for _ in range(c)
                )
            )
        finally:
            await sdk.close()
    else:
        raise SystemExit(f"unknown drive mode {mode!r}")
    out = summarize(rec, time.perf_counter_ns())
    out["answered_total"] = len(rec.latencies)  # warm-up included: what the CPU time paid for
    out["client_cpu_s"] = round(time.process_time() - cpu0, 4)
    out["error_samples"] = dict(_ERROR_SAMPLES)
    return out


def _read(path: str | None) -> bytes:
    return Path(path).read_bytes() if path else b""


_ERROR_SAMPLES: dict[str, str] = {}  # the load process's first message per error code


def _code(exc: Exception) -> str:
    """The error's status code name (grpc or meshserve error); its first message is kept."""
    code = getattr(exc, "code", None)
    if callable(code):
        code = code()
    name = str(getattr(code, "name", code or type(exc).__name__))
    if name not in _ERROR_SAMPLES:
        details = getattr(exc, "details", None)
        _ERROR_SAMPLES[name] = str(details() if callable(details) else exc)[:300]
    return name


def drive_main(spec_json: str) -> None:
    from bench.loadgen import run_on_uvloop

    result, _ = run_on_uvloop(_drive(json.loads(spec_json)))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


# -- the orchestrator ---------------------------------------------------------------------------


@dataclass
class Pinning:
    """Which cores the load generator and the server processes get (empty: not pinned)."""

    client: list[int] = field(default_factory=list)
    servers: list[int] = field(default_factory=list)

    @classmethod
    def choose(cls, enabled: bool) -> Pinning:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if not enabled or len(cores) < 2 or shutil.which("taskset") is None:
            return cls()
        return cls(client=cores[:1], servers=cores[1:])

    def prefix(self, cores: list[int]) -> list[str]:
        return ["taskset", "-c", ",".join(map(str, cores))] if cores else []

    def note(self) -> str:
        if not self.client:
            return "not pinned (fewer than 2 cores, no taskset, or --no-pin)"
        srv = ",".join(map(str, self.servers))
        return (
            f"load generator: each load is a separate process started under `taskset -c "
            f"{self.client[0]}`; echo, hand-written and standalone-gateway servers started under "
            f"`taskset -c {srv}`; etcd, the control-plane replica and the nodes (started by "
            f"LocalMesh) pinned to core(s) {srv} with sched_setaffinity on every thread after "
            f"start and again before every row (new threads inherit); the in-process floor runs "
            f"in the orchestrator with its worker threads pinned to core(s) {srv}; the "
            f"orchestrator itself (idle during loads) is not pinned. Servers share core(s) "
            f"{srv}: a row's processes compete for them as they would on one box."
        )


@dataclass
class Ctx:
    args: argparse.Namespace
    workdir: Path
    env: dict[str, str]
    pin: Pinning
    pids: dict[str, int] = field(default_factory=dict)  # every server process by role
    deadline: float = 0.0

    def repin(self) -> None:
        if self.pin.servers:
            for pid in self.pids.values():
                pin_threads(pid, self.pin.servers)

    def load(
        self,
        mode: str,
        targets: Sequence[str],
        c: int,
        roles: Sequence[str],
        duration_s: float | None = None,
        warmup_s: float | None = None,
        **spec: Any,
    ) -> dict[str, Any]:
        """One load in its own (pinned) process; figures plus CPU per 1,000 queries of
        ``roles``' processes and of the load generator."""
        self.repin()
        spec.update(
            mode=mode,
            targets=list(targets),
            concurrency=c,
            duration_s=self.args.duration if duration_s is None else duration_s,
            warmup_s=self.args.warmup if warmup_s is None else warmup_s,
            max_requests=self.args.max_requests,
            timeout_s=self.args.timeout,
        )
        argv = [
            *self.pin.prefix(self.pin.client),
            sys.executable,
            str(Path(__file__).resolve()),
            "drive",
            json.dumps(spec),
        ]
        before = {r: process_cpu_s(self.pids[r]) for r in roles}
        cap = spec["warmup_s"] + spec["duration_s"] + self.args.timeout + 60
        done = subprocess.run(
            argv, capture_output=True, text=True, env=self.env, timeout=cap, check=False
        )
        after = {r: process_cpu_s(self.pids[r]) for r in roles}
        if done.returncode != 0:
            raise RuntimeError(f"load failed ({done.returncode}): {done.stderr[-2000:]}")
        figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        answered = max(1, figures["answered_total"] + figures["errors"])
        cpu: dict[str, float | None] = {}
        for role in roles:
            b, a = before[role], after[role]
            cpu[role] = None if a is None or b is None else round((a - b) * 1000 / answered, 4)
        figures["cpu_s_per_1k"] = cpu
        figures["client_cpu_s_per_1k"] = round(figures["client_cpu_s"] * 1000 / answered, 4)
        return figures


def _keep(figures: dict[str, Any]) -> dict[str, Any]:
    keys = ["rps", "p50_ms", "p99_ms", "requests", "errors", "errors_by_code"]
    keys += ["error_samples", "cpu_s_per_1k", "client_cpu_s_per_1k"]
    return {k: figures[k] for k in keys if k in figures}


def _probe_skips(wanted: set[str]) -> dict[str, str]:
    """Rows whose piece is not there (yet), with the reason."""
    skips: dict[str, str] = {}
    if "node_stream" in wanted:
        try:
            from meshserve.common.mux import MuxChannel  # noqa: F401
        except ImportError as exc:
            skips["node_stream"] = f"meshserve.common.mux.MuxChannel is not importable ({exc})"
    from meshserve.client import AsyncMeshClient

    params = inspect.signature(AsyncMeshClient.__init__).parameters
    if "routing" not in params:
        reason = "AsyncMeshClient has no routing= parameter (the SDK does not route itself yet)"
        skips["sdk_routed_unary"] = skips["sdk_routed_stream"] = reason
    elif not any(p in params for p in STREAM_PARAMS):
        skips["sdk_routed_stream"] = (
            f"AsyncMeshClient has no stream switch (looked for {', '.join(STREAM_PARAMS)}=)"
        )
    if not _standalone_command():
        reason = (
            "no standalone gateway: neither a meshserve-gateway console script nor the module "
            "meshserve.controlplane.dataplane.standalone"
        )
        skips["standalone_gateway_1"] = skips["standalone_gateway_2"] = reason
    return skips


def _standalone_command() -> list[str]:
    script = Path(sys.executable).with_name("meshserve-gateway")
    if script.exists():
        return [str(script)]
    try:
        found = importlib.util.find_spec("meshserve.controlplane.dataplane.standalone")
    except ModuleNotFoundError:
        found = None
    if found is not None:
        return [sys.executable, "-m", "meshserve.controlplane.dataplane.standalone"]
    return []


def _sdk_kwargs(routing: str, stream: bool) -> dict[str, Any]:
    from meshserve.client import AsyncMeshClient

    params = inspect.signature(AsyncMeshClient.__init__).parameters
    kwargs: dict[str, Any] = {}
    if "routing" in params:
        kwargs["routing"] = routing
    if routing == "direct":
        name = next((p for p in STREAM_PARAMS if p in params), None)
        if name == "transport":
            kwargs[name] = "stream" if stream else "unary"
        elif name is not None:
            kwargs[name] = stream
    return kwargs


def _kwargs_text(row: str) -> str:
    kwargs = _sdk_kwargs("gateway" if row == "sdk_gateway" else "direct", row.endswith("stream"))
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _request_file(ctx: Ctx, model: Model, name: str) -> str:
    from meshserve.common.codec import build_request

    path = ctx.workdir / f"{name}.request"
    if not path.exists():
        path.write_bytes(build_request(name, {model.input_name: model.x}).SerializeToString())
    return str(path)


def _floor(
    ctx: Ctx, model: Model, c: int, *, batch: int = 1, duration_s: float | None = None
) -> dict[str, Any]:
    """The in-process floor, its threads on the servers' cores (they inherit the mask)."""
    everything = os.sched_getaffinity(0)
    if ctx.pin.servers:
        os.sched_setaffinity(0, ctx.pin.servers)
    try:
        duration = ctx.args.duration if duration_s is None else duration_s
        return floor_run(model, c, duration, ctx.args.warmup, batch=batch)
    finally:
        if ctx.pin.servers:
            os.sched_setaffinity(0, everything)


def _start_standalone(ctx: Ctx, name: str, cp_address: str, model: str) -> Any:
    """A standalone gateway process, or the reason it did not come up."""
    from meshserve.devtools.local import ManagedProcess, free_port, wait_until
    from meshserve.protos import inference_pb2, inference_pb2_grpc

    address = f"127.0.0.1:{free_port()}"
    argv = [
        *ctx.pin.prefix(ctx.pin.servers),
        *_standalone_command(),
        "--feed",
        cp_address,
        "--listen",
        address,
    ]
    proc = ManagedProcess(name, argv, ctx.workdir / f"{name}.log", address, ctx.env).start()

    def ready() -> bool:
        import grpc

        if not proc.alive():
            raise RuntimeError("exited")
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = inference_pb2.ModelReadyRequest(name=model)
            return bool(stub.ModelReady(request, timeout=1.0).ready)

    try:
        wait_until(ready, 30, interval=0.3, what=f"{name} to serve {model}")
    except (TimeoutError, RuntimeError) as exc:
        tail = proc.tail(5).replace("\n", " | ")
        proc.stop(grace_s=3)
        return f"{name} did not serve {model}: {exc}; log: {tail[-600:]}"
    ctx.pids[name] = proc.pid
    return proc


@dataclass
class Setup:
    """Where one model's rows send their load during one run."""

    model: Model
    cp: str  # the replica (gateway, routing feed)
    direct: str  # the direct node's port
    echo: str = ""
    hand: str = ""
    gateways: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # request files by kind


def measure(ctx: Ctx, row: str, c: int, s: Setup) -> dict[str, Any]:
    """One row at concurrency ``c``: which load, against what, and whose CPU counts."""
    f, m = s.files, s.model
    sdk: dict[str, Any] = {"model": f"{m.name}-direct", "input_name": m.input_name}
    sdk["input_npy"] = f["npy"]
    if row == "floor":
        return _floor(ctx, m, c)
    if row == "echo_unary":
        return ctx.load("unary", [s.echo], c, ["echo"], request_file=f["echo"])
    if row == "echo_stream":
        return ctx.load("mux", [s.echo], c, ["echo"], request_file=f["echo"])
    if row == "handwritten":
        return ctx.load("unary", [s.hand], c, ["handwritten"], request_file=f["plain"])
    if row == "node_unary":
        return ctx.load("unary", [s.direct], c, ["node"], request_file=f["direct"])
    if row == "node_stream":
        return ctx.load("mux_channel", [s.direct], c, ["node"], request_file=f["direct"])
    if row == "gateway_direct":
        return ctx.load("unary", [s.cp], c, ["replica", "node"], request_file=f["direct"])
    if row == "gateway_tunnel":
        return ctx.load("unary", [s.cp], c, ["replica", "node_tunnel"], request_file=f["tunnel"])
    if row.startswith("sdk_"):
        routing = "gateway" if row == "sdk_gateway" else "direct"
        kwargs = _sdk_kwargs(routing, row == "sdk_routed_stream")
        return ctx.load("sdk", [s.cp], c, ["node", "replica"], sdk_kwargs=kwargs, **sdk)
    if row.startswith("standalone_gateway_"):
        n = int(row.rsplit("_", 1)[1])
        roles = [f"gateway_{i + 1}" for i in range(n)] + ["replica", "node"]
        return ctx.load("unary", s.gateways[:n], c, roles, request_file=f["direct"])
    raise ValueError(f"unknown row {row}")


def _setup(
    ctx: Ctx, m: Model, address: dict[str, str], wanted: set[str], skips: dict[str, str], i: int
) -> tuple[Setup, list[Any]]:
    """Start this model's reference servers (and standalone gateways) for run ``i``."""
    s, servers = Setup(m, address["cp"], address["node_direct"]), []
    echo_req, echo_resp = write_payloads(m, ctx.workdir)
    npy = ctx.workdir / f"{m.name}.npy"
    np.save(npy, m.x)
    s.files = {
        "echo": str(echo_req),
        "plain": _request_file(ctx, m, m.name),
        "direct": _request_file(ctx, m, f"{m.name}-direct"),
        "tunnel": _request_file(ctx, m, f"{m.name}-tunnel"),
        "npy": str(npy),
    }
    prefix = ctx.pin.prefix(ctx.pin.servers)
    if wanted & {"echo_unary", "echo_stream"}:
        argv = ["echo", "--response-file", str(echo_resp)]
        echo = start_server(ctx.workdir, f"echo-{m.name}-{i}", argv, ctx.env, prefix=prefix)
        servers.append(echo)
        ctx.pids["echo"], s.echo = echo.pid, echo.address
    if "handwritten" in wanted:
        argv = ["ort", "--model", str(m.path), "--name", m.name]
        hand = start_server(ctx.workdir, f"handwritten-{m.name}-{i}", argv, ctx.env, prefix=prefix)
        servers.append(hand)
        ctx.pids["handwritten"], s.hand = hand.pid, hand.address
    standalone = ("standalone_gateway_1", "standalone_gateway_2")
    if wanted & set(standalone) and standalone[0] not in skips:
        for n in (1, 2):
            started = _start_standalone(ctx, f"gateway_{n}", s.cp, f"{m.name}-direct")
            if isinstance(started, str):
                skips.update(dict.fromkeys(standalone[n - 1 :], started))
                break
            servers.append(started)
            s.gateways.append(started.address)
    return s, servers


def run_matrix(
    ctx: Ctx,
    models: list[Model],
    address: dict[str, str],
    skips: dict[str, str],
    wanted: set[str],
    run_index: int,
) -> list[dict[str, Any]]:
    """One pass over every (model, C, row); each result a row dict (or a skipped one)."""
    args, rows = ctx.args, []
    for m in models:
        setup, servers = _setup(ctx, m, address, wanted, skips, run_index)
        try:
            for c in args.concurrency:
                for row in ALL_ROWS:
                    if row not in wanted:
                        continue
                    base = {"row": row, "model": m.name, "concurrency": c}
                    if row in skips:
                        rows.append({**base, "skipped": skips[row]})
                        continue
                    if time.monotonic() > ctx.deadline:
                        rows.append(
                            {**base, "skipped": f"--max-total-s {args.max_total_s} reached"}
                        )
                        continue
                    log(f"run {run_index + 1}/{args.runs} {m.name} C={c}: {row}")
                    try:
                        figures = measure(ctx, row, c, setup)
                    except Exception as exc:  # a failed load is a result too: say so
                        log(f"  {row} failed: {exc}")
                        rows.append({**base, "failed": str(exc)[-500:]})
                        continue
                    rows.append({**base, **_keep(figures)})
                    log(
                        f"  {figures['rps']} req/s p50 {figures['p50_ms']} ms "
                        f"errors {figures['errors']}"
                    )
        finally:
            for proc in servers:
                proc.stop(grace_s=3)
    return rows


def run_batching(ctx: Ctx, model: Model, direct: str, run_index: int) -> dict[str, Any]:
    """Magika at C=32 through the node's port, dynamic batching on vs off; first the gain
    in-process onnxruntime gets from batch 32 over batch 1 (one thread per server core)."""
    threads = max(1, len(ctx.pin.servers) or (os.cpu_count() or 1))
    log(f"run {run_index + 1}/{ctx.args.runs} batching: in-process batch 1 vs {BATCH_N}")
    long_s = max(ctx.args.duration, 5.0)  # a batch-32 call of magika takes a good part of 1 s
    one = _floor(ctx, model, threads, batch=1, duration_s=long_s)
    many = _floor(ctx, model, threads, batch=BATCH_N, duration_s=long_s)
    in_process = many["rows_per_s"] / one["rows_per_s"]
    out: dict[str, Any] = {
        "in_process_batch_1_rows_per_s": one["rows_per_s"],
        f"in_process_batch_{BATCH_N}_rows_per_s": many["rows_per_s"],
        "in_process_gain": round(in_process, 3),
    }
    for batching in (False, True):
        name = f"{model.name}-direct" + ("-b" if batching else "")
        log(f"run {run_index + 1}/{ctx.args.runs} batching {'on' if batching else 'off'}")
        figures = ctx.load(
            "unary",
            [direct],
            BATCH_C,
            ["node"],
            request_file=_request_file(ctx, model, name),
            duration_s=long_s,
            warmup_s=max(ctx.args.warmup, 1.0),  # a magika query waits ~1 s at C=32 here
        )
        out["on" if batching else "off"] = _keep(figures)
    mesh_gain = out["on"]["rps"] / out["off"]["rps"] if out["off"]["rps"] else 0.0
    out["mesh_gain"] = round(mesh_gain, 3)
    out["batching_gain_ratio"] = round(mesh_gain / in_process, 3) if in_process else None
    return out


# -- ratios, aggregation over runs, targets ----------------------------------------------------


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's req/s and p50 over the baselines' at the same model and C (one run)."""
    index = {(r["row"], r["model"], r["concurrency"]): r for r in rows if "rps" in r}
    for row in rows:
        if "rps" not in row:
            continue
        for base in BASELINES:
            ref = index.get((base, row["model"], row["concurrency"]))
            if ref and ref["rps"] and ref.get("p50_ms") and row.get("p50_ms"):
                row[f"vs_{base}"] = {
                    "rps": round(row["rps"] / ref["rps"], 3),
                    "p50": round(row["p50_ms"] / ref["p50_ms"], 3),
                }


def aggregate(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per (row, model, C): the median and [min, max] of every figure over the runs."""
    order: list[tuple[str, str, int]] = []
    by_key: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for rows in runs:
        for r in rows:
            key = (r["row"], r["model"], r["concurrency"])
            if key not in by_key:
                order.append(key)
                by_key[key] = []
            by_key[key].append(r)
    out = []
    for key in order:
        got = by_key[key]
        row: dict[str, Any] = {"row": key[0], "model": key[1], "concurrency": key[2]}
        measured = [r for r in got if "rps" in r]
        if not measured:
            reason = got[0].get("skipped") or got[0].get("failed")
            row["skipped" if "skipped" in got[0] else "failed"] = reason
            out.append(row)
            continue
        row["runs"] = len(measured)
        if len(measured) < len(got):
            row["failed_runs"] = [
                r.get("failed") or r.get("skipped") for r in got if "rps" not in r
            ]
        for fig in ("rps", "p50_ms", "p99_ms"):
            row[fig] = spread((r.get(fig) for r in measured), 4 if fig != "rps" else 1)
        row["errors"] = sum(r["errors"] for r in measured)
        codes: dict[str, int] = {}
        for r in measured:
            for code, n in (r.get("errors_by_code") or {}).items():
                codes[code] = codes.get(code, 0) + n
        row["errors_by_code"] = codes
        samples: dict[str, str] = {}
        for r in measured:
            for code, text in (r.get("error_samples") or {}).items():
                samples.setdefault(code, text)
        if samples:
            row["error_samples"] = samples
        row["requests"] = sum(r["requests"] for r in measured)
        roles = sorted({k for r in measured for k in (r.get("cpu_s_per_1k") or {})})
        if roles:
            row["cpu_s_per_1k"] = {
                role: spread(r["cpu_s_per_1k"].get(role) for r in measured) for role in roles
            }
        if any("client_cpu_s_per_1k" in r for r in measured):
            row["client_cpu_s_per_1k"] = spread(r.get("client_cpu_s_per_1k") for r in measured)
        for base in BASELINES:
            ratios = [r[f"vs_{base}"] for r in measured if f"vs_{base}" in r]
            if ratios:
                row[f"vs_{base}"] = {
                    "rps": spread((x["rps"] for x in ratios), 3),
                    "p50": spread((x["p50"] for x in ratios), 3),
                }
        out.append(row)
    return out


def _per_run(
    runs: list[list[dict[str, Any]]], model: str, c: int, fn: Callable[..., float], *names: str
) -> list[float]:
    """``fn(row_a, row_b, ...)`` in every run where all the named rows were measured."""
    values = []
    for rows in runs:
        index = {r["row"]: r for r in rows if r["model"] == model and r["concurrency"] == c}
        found = [index.get(n) for n in names]
        if all(f is not None and f.get("rps") and f.get("p50_ms") is not None for f in found):
            values.append(fn(*found))
    return values


def _target(
    text: str, values: list[float], ok: Callable[[float], bool], why: str
) -> dict[str, Any]:
    if not values:
        return {"target": text, "skipped": why}
    s = spread(values, 4)
    assert s is not None
    return {"target": text, "measured": s["median"], "range": s["range"], "met": ok(s["median"])}


def targets(
    runs: list[list[dict[str, Any]]], batching: list[dict[str, Any]], models: list[str]
) -> dict[str, Any]:
    """Issue 15's targets, evaluated on the per-run ratios (median decides; range shown)."""
    out: dict[str, Any] = {}
    missing = "a row it needs was not measured (skipped, failed or not selected)"
    for m in models:
        for sdk in ("sdk_routed_unary", "sdk_routed_stream"):
            out[f"{m}: {sdk} C=32 >= 1.0x node direct unary (req/s)"] = _target(
                f"{sdk}.rps / node_unary.rps at C=32 >= 1.0",
                _per_run(runs, m, 32, lambda s, n: s["rps"] / n["rps"], sdk, "node_unary"),
                lambda v: v >= 1.0,
                missing,
            )
            out[f"{m}: {sdk} C=1 p50 <= node direct p50 + 0.1 ms"] = _target(
                f"{sdk}.p50 - node_unary.p50 at C=1 <= 0.1 ms",
                _per_run(runs, m, 1, lambda s, n: s["p50_ms"] - n["p50_ms"], sdk, "node_unary"),
                lambda v: v <= 0.1,
                missing,
            )
        out[f"{m}: gateway -> direct node C=32 >= 0.8x node direct"] = _target(
            "gateway_direct.rps / node_unary.rps at C=32 >= 0.8",
            _per_run(runs, m, 32, lambda g, n: g["rps"] / n["rps"], "gateway_direct", "node_unary"),
            lambda v: v >= 0.8,
            missing,
        )
        out[f"{m}: gateway -> direct node C=32 >= 1.0x hand-written server"] = _target(
            "gateway_direct.rps / handwritten.rps at C=32 >= 1.0",
            _per_run(
                runs, m, 32, lambda g, h: g["rps"] / h["rps"], "gateway_direct", "handwritten"
            ),
            lambda v: v >= 1.0,
            missing,
        )
        out[f"{m}: gateway C=1 p50 overhead <= 1 echo RTT"] = _target(
            "(gateway_direct.p50 - node_unary.p50) / echo_unary.p50 at C=1 <= 1.0",
            _per_run(
                runs,
                m,
                1,
                lambda g, n, e: (g["p50_ms"] - n["p50_ms"]) / e["p50_ms"],
                "gateway_direct",
                "node_unary",
                "echo_unary",
            ),
            lambda v: v <= 1.0,
            missing,
        )
        out[f"{m}: tunnel within 10% of direct (req/s, C=32)"] = _target(
            "gateway_tunnel.rps / gateway_direct.rps at C=32 >= 0.9",
            _per_run(
                runs, m, 32, lambda t, d: t["rps"] / d["rps"], "gateway_tunnel", "gateway_direct"
            ),
            lambda v: v >= 0.9,
            missing,
        )
        out[f"{m}: tunnel within 10% of direct (p50, C=1)"] = _target(
            "gateway_tunnel.p50 / gateway_direct.p50 at C=1 <= 1.1",
            _per_run(
                runs,
                m,
                1,
                lambda t, d: t["p50_ms"] / d["p50_ms"],
                "gateway_tunnel",
                "gateway_direct",
            ),
            lambda v: v <= 1.1,
            missing,
        )
    out[f"{BATCH_MODEL} C={BATCH_C}: batching gain >= 0.8x the in-process gain"] = _target(
        "batching_gain_ratio = (node on/off req/s) / (in-process batch "
        f"{BATCH_N}/batch 1 rows/s) >= 0.8",
        [b["batching_gain_ratio"] for b in batching if b.get("batching_gain_ratio") is not None],
        lambda v: v >= 0.8,
        "the batching row was not run (needs magika at C=32; --quick skips it)",
    )
    return out


# -- main ----------------------------------------------------------------------------------------


def _wanted_rows(spec: str) -> set[str]:
    wanted: set[str] = set()
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in ROWS:
            wanted.update(ROWS[item])
        elif item in ALL_ROWS or item == "batching":
            wanted.add(item)
        else:
            raise SystemExit(f"--rows: unknown {item!r}; groups {sorted(ROWS)}, rows {ALL_ROWS}")
    return wanted


def run(args: argparse.Namespace) -> dict[str, Any]:
    from meshserve.client._admin import AdminClient
    from meshserve.devtools.demo_models import sha256_file
    from meshserve.devtools.local import LocalMesh, wait_until
    from meshserve.protos import mesh_pb2

    started = time.monotonic()
    wanted = _wanted_rows(args.rows)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="meshserve-frontdoor-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pin = Pinning.choose(not args.no_pin)
    ctx = Ctx(args, workdir, env, pin, deadline=started + args.max_total_s)
    models = bench_models(workdir, args.models, log)
    skips = _probe_skips(wanted)
    for name in sorted(set(args.models) - {m.name for m in models}):
        skips[f"{name} (every row)"] = "not installed (pip install '.[bench]')"
    batch_model = next((m for m in models if m.name == BATCH_MODEL), None)
    do_batching = "batching" in wanted and batch_model is not None
    runs: list[list[dict[str, Any]]] = []
    batching: list[dict[str, Any]] = []
    with LocalMesh(workdir, lease_ttl_s=5, env=env) as mesh:
        log(f"workdir {workdir}; starting etcd, a control plane, a direct and a tunnel-only node")
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        node = mesh.start_node("node-direct", [cp.address], labels={"path": "direct"}, direct=True)
        tunnel = mesh.start_node("node-tunnel", [cp.address], labels={"path": "tunnel"})
        ctx.pids.update(replica=cp.pid, node=node.pid, node_tunnel=tunnel.pid)
        if mesh.etcd is not None and mesh.etcd.pid:
            ctx.pids["etcd"] = mesh.etcd.pid
        with AdminClient(cp.address) as admin:
            want = 0
            for m in models:
                variants = [("direct", False), ("tunnel", False)]
                if do_batching and m is batch_model:
                    variants.append(("direct", True))
                for path, batched in variants:
                    admin.register_model(
                        f"{m.name}-{path}" + ("-b" if batched else ""),
                        m.path.as_uri(),
                        sha256_file(m.path),
                        node_selector={"path": path},
                        serving=serving_config(batched, m.batch_slo_ms),
                    )
                    want += 1
            wait_until(
                lambda: (
                    sum(c.state == mesh_pb2.READY for n in admin.list_nodes() for c in n.copies)
                    >= want
                ),
                120,
                what=f"{want} READY copies",
            )
            direct = {n.node_id: n.direct_address for n in admin.list_nodes()}["node-direct"]
        ctx.repin()
        log(f"mesh ready: gateway {cp.address}, node direct port {direct}; pinning: {pin.note()}")
        address = {"cp": cp.address, "node_direct": direct}
        for i in range(args.runs):
            rows = run_matrix(ctx, models, address, skips, wanted, i)
            add_ratios(rows)
            runs.append(rows)
            if do_batching and batch_model is not None and time.monotonic() < ctx.deadline:
                batching.append(run_batching(ctx, batch_model, direct, i))
    return {
        "bench": "frontdoor",
        "rows": aggregate(runs),
        "batching": _batching_summary(batching, batch_model, wanted, do_batching, args.models),
        "targets": targets(runs, batching, [m.name for m in models]),
        "notes": {
            "pinning": pin.note(),
            "figures": (
                "req/s, p50, p99: closed loop of C workers in the load process, requests that "
                "started in the warm-up excluded; each figure is the median and [min, max] over "
                "--runs; errors summed over the runs; cpu_s_per_1k: CPU seconds (user+system) "
                "of each server process per 1,000 answered queries, warm-up included; "
                "client_cpu_s_per_1k: the load process's own; vs_<row>: the row's req/s and p50 "
                "over that row's at the same model and C, within each run."
            ),
            "skipped_rows": {k: v for k, v in skips.items() if k in wanted},
            "echo_stream": "one bidi stream, C requests in flight, multiplexed by id "
            "(the node's NodeInference.Infer framing, one query per message)",
            "standalone_gateway_2": "the load's client holds a channel to each of the two "
            "gateways and sends each query to the next one in turn (round robin)",
            "sdk": {
                row: f"AsyncMeshClient(<replica>, {_kwargs_text(row)})"
                for row in ("sdk_routed_unary", "sdk_routed_stream", "sdk_gateway")
                if row in wanted and row not in skips
            },
            "batching": (
                f"node dynamic batching: max_batch_size 32, max_queue_delay 2 ms, adaptive, "
                f"latency SLO of the model; mesh_gain = req/s on / off at C={BATCH_C} through "
                f"the node's port; in_process_gain = rows/s of session.run on batch {BATCH_N} "
                f"/ batch 1, one thread per server core, same session options as a node"
            ),
        },
        "config": {**_config(args, time.monotonic() - started), "workdir_logs": str(workdir)},
    }


def _batching_summary(
    batching: list[dict[str, Any]],
    model: Model | None,
    wanted: set[str],
    done: bool,
    ctx_models: Sequence[str] = (),
) -> dict[str, Any]:
    if not done:
        if "batching" not in wanted:
            why = "not selected (--rows)"
        elif BATCH_MODEL in ctx_models:
            why = "magika is not installed (pip install '.[bench]')"
        else:
            why = "magika not in --models"
        return {"skipped": why}
    if not batching:
        return {"skipped": "--max-total-s reached before it ran"}
    out: dict[str, Any] = {"model": BATCH_MODEL, "concurrency": BATCH_C, "batch": BATCH_N}
    for key in ("in_process_gain", "mesh_gain", "batching_gain_ratio"):
        out[key] = spread((b.get(key) for b in batching), 3)
    out["in_process_batch_1_rows_per_s"] = spread(
        b["in_process_batch_1_rows_per_s"] for b in batching
    )
    out[f"in_process_batch_{BATCH_N}_rows_per_s"] = spread(
        b[f"in_process_batch_{BATCH_N}_rows_per_s"] for b in batching
    )
    for arm in ("off", "on"):
        out[f"node_{arm}"] = aggregate(
            [
                [
                    {
                        "row": f"node_unary_batching_{arm}",
                        "model": BATCH_MODEL,
                        "concurrency": BATCH_C,
                        **b[arm],
                    }
                ]
                for b in batching
            ]
        )[0]
    return out


def _config(args: argparse.Namespace, wall_s: float) -> dict[str, Any]:
    import grpc
    import onnxruntime

    return {
        "runs": args.runs,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "max_requests": args.max_requests,
        "concurrency": args.concurrency,
        "models": args.models,
        "rows": args.rows,
        "cores": os.cpu_count(),
        "grpcio": grpc.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": sys.version.split()[0],
        "wall_s": round(wall_s, 1),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/frontdoor.py", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="repeat the whole matrix N times")
    p.add_argument("--quick", action="store_true", help="smoke: MLP, C=1,8, short loads, 1 run")
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per load")
    p.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per load")
    p.add_argument("--max-requests", type=int, default=200_000, help="cap per load")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, s")
    p.add_argument(
        "--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8, 32]
    )
    p.add_argument("--models", type=lambda s: s.split(","), default=["mlp", "magika"])
    p.add_argument(
        "--rows",
        default=",".join([*ROWS, "batching"]),
        help=f"groups ({', '.join(ROWS)}, batching) or row names, comma-separated",
    )
    p.add_argument("--max-total-s", type=float, default=3600.0, help="cap for the whole run")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="models, logs, etcd data (default: a new temp dir)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="also write the JSON here (default for full runs: bench/results/frontdoor.json)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["drive"]:  # the load generator's process
        drive_main(argv[1])
        return
    args = _parser().parse_args(argv)
    if args.quick:
        args.models, args.runs = ["mlp"], 1
        args.duration, args.warmup, args.max_requests = 0.5, 0.1, 1000
        args.concurrency = [c for c in args.concurrency if c <= 8] or [1, 8]
    elif args.out is None:
        args.out = ROOT / "bench" / "results" / "frontdoor.json"
    if args.runs < 1 or args.duration <= 0 or args.max_requests < 1:
        raise SystemExit("--runs, --duration and --max-requests must be positive")
    emit(run(args), args.out)


if __name__ == "__main__":
    main()
