"""Telemetry ingest: how many node streams one control-plane process holds, and at what cost.

Method
------
One real etcd and one real control-plane process (``python -m meshserve.controlplane``, started
through
:class:`meshserve.devtools.local.LocalMesh` on loopback, ``--lease-ttl`` as LocalMesh passes it). A
*simulator* runs in a separate process (this file with ``--simulate``) so that its CPU is not
charged to the control plane. It opens N ``meshserve.v1.NodeLink/Connect`` streams with grpc.aio
on uvloop, spread over ceil(N / 100) channels (one HTTP/2 connection each: every channel has its
own subchannel pool). Each stream is a node as the control plane sees it:

* a ``Hello`` with a unique ``node_id`` (``sim-00001`` ...), labels ``tier=edge``,
  ``zone=z<i % 10>``, hardware (cores, memory, CPUExecutionProvider) and two READY
  ``CopyStatus`` entries for fake models, so the link record in etcd has a realistic size;
* it waits for the ``Welcome`` and then sends one ``Telemetry`` per second, exactly 1 Hz whatever
  interval the Welcome names, each stream at its own random phase so the sends are spread
  uniformly over the second (cpu_percent, rss_bytes and two ``ModelTelemetry`` entries whose
  in_flight / queue_depth / request counters change every time);
* it reads and discards every ``ControlMessage`` (the hub sends each node an Unload for the two
  fake copies, which no placement wants; the simulator does not answer, so records keep them).

Streams are opened gradually (``--ramp-per-s``, default 200 per second) so that the measurement
is not taken during a connect storm; the ramp is timed and reported on its own (with the control
plane's CPU share during the ramp, which includes one snapshot rebuild per batch of new records).

For each count in ``--counts``, a FRESH control-plane process and a fresh simulator are used
(same etcd): a process that held 2,000 streams keeps its allocator's high-water mark, so reusing
it would bias the next count's RSS. After every stream is up the script waits ``--settle`` (2 s)
and then measures the control-plane process over ``--window`` seconds: CPU seconds from
``/proc/<pid>/stat`` (utime + stime, over all its threads, / SC_CLK_TCK) and RSS from
``/proc/<pid>/status`` (VmRSS). It then counts the link records under ``/meshserve/nodes/`` in
etcd, proving that the streams are real registrations. Between counts the simulator is stopped,
then the control plane, and the script waits (bounded) until no record is left. A baseline (the
first control plane, 0 nodes, same window) is taken first.

The run stops early (``stopped_early`` says why) when a stream fails to connect, the control
plane uses more than 90% of one core, or the next count would not fit in ``--max-total-s``.

Reading the JSON (one object on stdout; progress on stderr)
-----------------------------------------------------------
* ``baseline``: the idle control plane (``cpu_core_share``: 0..1 of one core; ``rss_mb``).
* ``rows[]``, one per count: ``nodes``, ``connected``, ``failed``, ``dropped`` (streams that died
  after the Welcome), ``ramp_s``, ``cp_cpu_core_share`` (0..1 of one core, gross),
  ``cp_cpu_per_node_us_per_s`` (CPU microseconds per node per second above the baseline, i.e.
  the cost of one node at 1 Hz; ``cp_cpu_us_per_telemetry_msg`` divides the same CPU by the
  messages actually sent in the window), ``cp_rss_mb``, ``rss_per_node_kb`` (above the baseline;
  ``rss_per_node_kb_vs_own_idle`` against this fresh process's own idle RSS), ``records_in_etcd``,
  ``telemetry_msgs_per_s`` (achieved send rate, should be ~nodes), ``late_sends`` (sends more
  than 250 ms behind schedule: the simulator could not keep up), ``tcp_connections`` (to the
  control plane's port, expected ceil(nodes / 100) + a few), ``simulator_cpu_share`` (the
  simulator shares the machine's cores; a saturated simulator under-offers load).
* ``summary``: ``largest_count``, extrapolations to 10,000 nodes at 1 Hz: ``from_largest`` (the
  baseline plus 10,000 x the largest count's per-node cost) and ``from_fit`` (least squares
  ``a + b * nodes`` over the baseline point at 0 nodes and every measured count), in cores and
  MB; ``target_met``: both extrapolations need <= 1.0 core for 10,000 nodes.

    .venv/bin/python bench/telemetry_ingest.py                         # 250..2000 nodes
    .venv/bin/python bench/telemetry_ingest.py --counts 100,300 --window 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import queue
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from grpc import aio  # noqa: E402

from bench._report import emit  # noqa: E402
from meshserve.common.errors import EOF  # noqa: E402
from meshserve.controlplane import keys  # noqa: E402
from meshserve.devtools.local import LocalMesh, ManagedProcess  # noqa: E402
from meshserve.protos import mesh_pb2, mesh_pb2_grpc  # noqa: E402

__all__ = ["run_ingest"]

CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGET_NODES = 10_000
CPU_LIMIT_SHARE = 0.9  # stop when the control plane uses more than this share of one core
LATE_S = 0.25  # a telemetry send this far behind its schedule counts as late

# Like meshserve.node.agent.channel_options, plus a subchannel pool per channel: without it gRPC
# shares one
# TCP connection between every channel to the same target.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.use_local_subchannel_pool", 1),
]


def log(message: str) -> None:
    print(f"[telemetry_ingest] {message}", file=sys.stderr, flush=True)


# -- /proc -----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid``, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def tcp_connections(port: int) -> int:
    """ESTABLISHED TCP connections whose local port is ``port`` (IPv4 and IPv6)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if parts[3] == "01" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


@dataclass
class Sample:
    """CPU seconds of one or more processes at one instant."""

    at: float
    cpu: dict[int, float]

    @classmethod
    def take(cls, *pids: int) -> Sample:
        return cls(time.monotonic(), {pid: cpu_seconds(pid) for pid in pids})

    def share(self, later: Sample, pid: int) -> float:
        """CPU used by ``pid`` between the two samples, as a share of one core."""
        return (later.cpu[pid] - self.cpu[pid]) / max(later.at - self.at, 1e-9)


# -- etcd --------------------------------------------------------------------------------------


async def _node_records(etcd_url: str) -> tuple[int, int]:
    """(number of link records under /meshserve/nodes/, their total value bytes)."""
    from meshserve.controlplane.etcd import connect
    from meshserve.controlplane.etcd._client import get_prefix

    client = await connect(etcd_url)
    try:
        _, kvs = await get_prefix(client, keys.NODES.encode())
    finally:
        await client.close()
    return len(kvs), sum(len(kv.value) for kv in kvs)


def node_records(etcd_url: str) -> tuple[int, int]:
    return asyncio.run(asyncio.wait_for(_node_records(etcd_url), 30.0))


# -- the simulator (a separate process) --------------------------------------------------------


@dataclass
class _SimStats:
    connected: int = 0
    failed: int = 0
    dropped: int = 0
    sent: int = 0
    late: int = 0
    received: int = 0
    first_error: str = ""
    telemetry_interval_ms: int = 0


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


def _hello(i: int) -> mesh_pb2.Hello:
    node_id = f"sim-{i + 1:05d}"
    copies = []
    for n, model in enumerate(("sim-resnet", "sim-bert")):
        spec_in = mesh_pb2.TensorSpec(name="input", datatype="FP32", shape=[-1, 3, 224, 224])
        spec_out = mesh_pb2.TensorSpec(name="output", datatype="FP32", shape=[-1, 1000])
        copies.append(
            mesh_pb2.CopyStatus(
                model=model,
                variant="default",
                state=mesh_pb2.READY,
                inputs=[spec_in],
                outputs=[spec_out],
                memory_bytes=(100 + 300 * n) << 20,
                load_seconds=1.25 + n,
                sha256=f"{(i * 2 + n) * 2654435761 % (1 << 64):064x}",
                warmup_seconds=0.2,
                batched=n == 0,
            )
        )
    return mesh_pb2.Hello(
        node_id=node_id,
        labels={"tier": "edge", "zone": f"z{i % 10}"},
        hardware=mesh_pb2.Hardware(
            cpu_cores=8, memory_bytes=16 << 30, execution_providers=["CPUExecutionProvider"]
        ),
        version="0.1.0",
        copies=copies,
    )


def _telemetry_message() -> mesh_pb2.NodeMessage:
    message = mesh_pb2.NodeMessage()
    t = message.telemetry
    t.memory_available_bytes = 12 << 30
    for model in ("sim-resnet", "sim-bert"):
        t.models.add(model=model, variant="default", max_batch_size=32)
    return message


def _update_telemetry(message: mesh_pb2.NodeMessage, rng: random.Random) -> None:
    t = message.telemetry
    t.unix_ms = int(time.time() * 1000)
    t.cpu_percent = rng.uniform(5.0, 95.0)
    t.rss_bytes = (600 << 20) + rng.randrange(1 << 26)
    for m in t.models:
        served = rng.randrange(50)
        m.in_flight = rng.randrange(8)
        m.queue_depth = rng.randrange(4)
        m.requests += served
        m.errors += 1 if rng.random() < 0.01 else 0
        m.latency_p50_ms = rng.uniform(2.0, 6.0)
        m.latency_p99_ms = m.latency_p50_ms * rng.uniform(2.0, 4.0)
        m.batches += served // 4
        m.batched_rows += served
        m.cache_hits += served // 10
        m.cache_misses += served - served // 10


async def _drain(call: Any, stats: _SimStats) -> None:
    while True:
        message = await call.read()
        if message is EOF:
            return
        stats.received += 1


async def _sim_node(
    i: int, stub: mesh_pb2_grpc.NodeLinkStub, stats: _SimStats, welcome_timeout_s: float
) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(i)
    call = stub.Connect()
    try:
        await call.write(mesh_pb2.NodeMessage(hello=_hello(i)))
        first = await asyncio.wait_for(call.read(), welcome_timeout_s)
        if first is EOF or not first.HasField("welcome"):
            raise ConnectionError("no Welcome")
        stats.telemetry_interval_ms = first.welcome.telemetry_interval_ms
    except asyncio.CancelledError:
        call.cancel()
        raise
    except Exception as exc:
        stats.failed += 1
        if not stats.first_error:
            stats.first_error = (
                f"{exc.code().name}: {exc.details()}"
                if isinstance(exc, grpc.aio.AioRpcError)
                else repr(exc)
            )
        call.cancel()
        return
    stats.connected += 1
    reader = asyncio.create_task(_drain(call, stats))
    message = _telemetry_message()
    due = loop.time() + rng.random()  # a uniformly random phase within the second
    try:
        while True:
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > LATE_S:
                stats.late += 1
                if -delay > 1.0:  # far behind: resynchronise instead of bursting
                    due = loop.time()
            _update_telemetry(message, rng)
            await call.write(message)
            stats.sent += 1
            due += 1.0
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        stats.dropped += 1
        if not stats.first_error:
            stats.first_error = f"after Welcome: {exc!r}"
    finally:
        reader.cancel()
        call.cancel()


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """The parent holds our stdin: EOF means it is gone, so stop."""
    with contextlib.suppress(Exception):
        sys.stdin.buffer.read()
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(stop.set)


async def _simulate(
    target: str,
    nodes: int,
    ramp_per_s: float,
    per_channel: int,
    max_pending: int,
    ramp_timeout_s: float,
    max_run_s: float,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    threading.Thread(target=_watch_stdin, args=(loop, stop), daemon=True).start()
    channels = [
        aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        for _ in range(max(1, math.ceil(nodes / per_channel)))
    ]
    stubs = [mesh_pb2_grpc.NodeLinkStub(channel) for channel in channels]
    stats = _SimStats()
    tasks: list[asyncio.Task[None]] = []
    started = loop.time()
    deadline = started + ramp_timeout_s
    welcome_timeout = 30.0
    try:
        next_at = started
        for i in range(nodes):
            # Paced: at most ramp_per_s new streams per second and at most max_pending streams
            # waiting for their Welcome, so a busy control plane slows the ramp down instead
            # of timing connects out.
            while not stop.is_set() and (
                len(tasks) - stats.connected - stats.failed >= max_pending or loop.time() < next_at
            ):
                if loop.time() > deadline:
                    break
                await asyncio.sleep(max(0.002, min(next_at - loop.time(), 0.02)))
            if stop.is_set() or loop.time() > deadline:
                break
            next_at = max(next_at + 1.0 / ramp_per_s, loop.time())
            node = _sim_node(i, stubs[i // per_channel], stats, welcome_timeout)
            tasks.append(asyncio.create_task(node))
        launched = len(tasks)
        limit = loop.time() + welcome_timeout + 1.0  # every pending stream resolves by then
        while stats.connected + stats.failed < launched and not stop.is_set():
            if loop.time() > limit:
                break
            await asyncio.sleep(0.02)
        _emit(
            "ready",
            nodes=nodes,
            launched=launched,
            connected=stats.connected,
            failed=stats.failed,
            pending=launched - stats.connected - stats.failed,
            ramp_s=round(loop.time() - started, 3),
            channels=len(channels),
            telemetry_interval_ms=stats.telemetry_interval_ms,
            first_error=stats.first_error
            or (f"ramp stopped after {launched} streams (timeout)" if launched < nodes else ""),
            loop=type(loop).__module__,
        )
        end = loop.time() + max_run_s
        while not stop.is_set() and loop.time() < end:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            _emit(
                "stats",
                connected=stats.connected,
                failed=stats.failed,
                dropped=stats.dropped,
                sent=stats.sent,
                late=stats.late,
                received=stats.received,
                first_error=stats.first_error,
            )
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(c.close(None) for c in channels)), 5.0)


def simulate_main(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    coro = _simulate(
        args.target,
        args.nodes,
        args.ramp_per_s,
        args.per_channel,
        args.max_pending,
        args.ramp_timeout_s,
        args.max_run_s,
    )
    try:
        import uvloop
    except ImportError:  # the data point is still valid, only the simulator is slower
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


@dataclass
class Simulator:
    """The parent's handle on one simulator process; its JSON lines arrive on a queue."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    events: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    last_stats: dict[str, Any] | None = None
    _log: IO[bytes] | None = None

    @classmethod
    def start(
        cls,
        target: str,
        nodes: int,
        *,
        workdir: Path,
        ramp_per_s: float,
        per_channel: int,
        max_pending: int,
        ramp_timeout_s: float,
        max_run_s: float,
    ) -> Simulator:
        log_path = workdir / f"simulator-{nodes}.log"
        log_file = open(log_path, "ab")
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--simulate",
            "--target",
            target,
            "--nodes",
            str(nodes),
            "--ramp-per-s",
            str(ramp_per_s),
            "--per-channel",
            str(per_channel),
            "--max-pending",
            str(max_pending),
            "--ramp-timeout-s",
            str(ramp_timeout_s),
            "--max-run-s",
            str(max_run_s),
        ]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            start_new_session=True,
        )
        sim = cls(proc, log_path, _log=log_file)
        threading.Thread(target=sim._read, daemon=True).start()
        return sim

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.put(json.loads(line))
        self.events.put({"event": "exit"})

    def wait_event(self, kind: str, timeout: float) -> dict[str, Any]:
        """The next event of ``kind`` (stats events seen meanwhile are remembered)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind!r} from the simulator within {timeout:.0f}s")
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if event["event"] == "stats":
                self.last_stats = event
            if event["event"] == kind:
                return event
            if event["event"] == "exit":
                raise RuntimeError(f"the simulator exited:\n{self.tail()}")

    def fresh_stats(self, timeout: float = 3.0) -> dict[str, Any]:
        """The newest stats line, waiting for one that arrives after this call."""
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            if event["event"] == "stats":
                self.last_stats = event
        return self.wait_event("stats", timeout)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 8.0) -> None:
        """Close its stdin and SIGTERM it; SIGKILL (its whole session) after ``grace_s``."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5.0)
        if self._log is not None:
            self._log.close()
            self._log = None


# -- the measurement -------------------------------------------------------------------------


class _OutOfTime(Exception):
    pass


_TEARDOWN_S = 20.0  # kept back per count for stopping the simulator and the control plane
_MIN_RAMP_S = 10.0
_WELCOME_WAIT_S = 15.0  # kept back for the last streams' Welcomes (each is bounded to 30 s)


def _wait_records(etcd_url: str, want: int, timeout: float) -> int:
    """Poll the record count until it equals ``want`` or ``timeout``; returns the last count."""
    deadline = time.monotonic() + timeout
    count = -1
    while True:
        with contextlib.suppress(Exception):
            count = node_records(etcd_url)[0]
        if count == want or time.monotonic() >= deadline:
            return count
        time.sleep(0.25)


def _measure_window(pid: int, window_s: float, sim: Simulator | None) -> dict[str, Any]:
    pids = (pid,) if sim is None else (pid, sim.pid)
    before_stats = sim.fresh_stats() if sim is not None else None
    before = Sample.take(*pids)
    time.sleep(window_s)
    after = Sample.take(*pids)
    after_stats = sim.fresh_stats() if sim is not None else None
    out: dict[str, Any] = {
        "window_s": round(after.at - before.at, 3),
        "cpu_core_share": before.share(after, pid),
        "cpu_s": after.cpu[pid] - before.cpu[pid],
        "rss_mb": rss_mb(pid),
    }
    if sim is not None and before_stats is not None and after_stats is not None:
        span = after_stats["t"] - before_stats["t"]
        out["sim_cpu_share"] = before.share(after, sim.pid)
        out["msgs"] = after_stats["sent"] - before_stats["sent"]
        out["msgs_per_s"] = out["msgs"] / span if span > 0 else 0.0
        out["late"] = after_stats["late"] - before_stats["late"]
        out["stats"] = after_stats
    return out


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a + b x``; returns (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, 0.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - b * mx, b


def _summary(baseline: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in rows if r.get("connected")]
    if not good:
        return {"largest_count": 0, "target_met": False, "note": "no count was measured"}
    top = max(good, key=lambda r: r["connected"])
    n = top["connected"]
    base_cpu, base_rss = baseline["cpu_core_share"], baseline["rss_mb"]
    per_node_cpu = (top["cp_cpu_core_share"] - base_cpu) / n
    per_node_mb = (top["cp_rss_mb"] - base_rss) / n
    largest = {
        "cores": round(base_cpu + per_node_cpu * TARGET_NODES, 3),
        "rss_mb": round(base_rss + per_node_mb * TARGET_NODES, 1),
    }
    xs = [0.0] + [float(r["connected"]) for r in good]
    a_cpu, b_cpu = _fit(xs, [base_cpu] + [r["cp_cpu_core_share"] for r in good])
    a_mem, b_mem = _fit(xs, [base_rss] + [r["cp_rss_mb"] for r in good])
    fit = {
        "cores": round(a_cpu + b_cpu * TARGET_NODES, 3),
        "rss_mb": round(a_mem + b_mem * TARGET_NODES, 1),
        "cpu_intercept_cores": round(a_cpu, 4),
        "cpu_per_node_us_per_s": round(b_cpu * 1e6, 2),
        "rss_intercept_mb": round(a_mem, 1),
        "rss_per_node_kb": round(b_mem * 1024, 2),
        "points": len(xs),
    }
    return {
        "largest_count": n,
        "extrapolated_to": TARGET_NODES,
        "from_largest": largest,
        "from_fit": fit,
        "target": f"<= 1.0 core for {TARGET_NODES} nodes at 1 Hz telemetry",
        "target_met": largest["cores"] <= 1.0 and fit["cores"] <= 1.0,
    }


def run_ingest(
    counts: list[int],
    window_s: float,
    max_total_s: float,
    *,
    ramp_per_s: float = 200.0,
    streams_per_channel: int = 100,
    max_pending: int = 50,
    settle_s: float = 2.0,
    lease_ttl_s: int = 5,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    """Measure the control plane with 0 nodes and then with each count; see the module doc.

    Everything it starts (etcd, control planes, simulators) is stopped before it returns or
    raises. ``profile_dir``: also run ``py-spy record --nonblocking`` on the control plane during
    each window (it costs the machine CPU; keep it off for the numbers you report).
    """
    started = time.monotonic()
    deadline = started + max_total_s
    rows: list[dict[str, Any]] = []
    stopped_early = ""
    baseline: dict[str, Any] = {}
    config = {
        "counts": counts,
        "window_s": window_s,
        "settle_s": settle_s,
        "ramp_per_s": ramp_per_s,
        "streams_per_channel": streams_per_channel,
        "max_pending_connects": max_pending,
        "lease_ttl_s": lease_ttl_s,
        "max_total_s": max_total_s,
        "telemetry_hz": 1.0,
        "cpu_count": os.cpu_count(),
        "per_count": "fresh control-plane process and fresh simulator process, same etcd",
    }

    def left() -> float:
        return deadline - time.monotonic()

    with tempfile.TemporaryDirectory(prefix="meshserve-ingest-") as tmp:
        workdir = Path(tmp)
        with LocalMesh(workdir, lease_ttl_s=lease_ttl_s) as mesh:
            etcd_url = mesh.start_etcd()
            log(f"etcd at {etcd_url}")
            cp: ManagedProcess | None = mesh.start_controlplane("cp-0")
            assert cp is not None
            time.sleep(min(settle_s, max(left(), 0)))
            log(f"baseline: control plane pid {cp.pid}, 0 nodes, {window_s:.0f}s window")
            base = _measure_window(cp.pid, window_s, None)
            baseline = {
                "cpu_core_share": round(base["cpu_core_share"], 4),
                "rss_mb": round(base["rss_mb"], 1),
                "window_s": base["window_s"],
            }
            log(f"baseline: {baseline}")
            for index, nodes in enumerate(counts):
                # The ramp's cost grows with the square of the count (each new record makes
                # the control plane rebuild its view of every record), so predict it from the
                # last count; a count whose ramp does not fit is still run, cut short by the
                # budget, and measured at the count it reached.
                ramp_estimate = nodes / ramp_per_s
                if rows:
                    last = rows[-1]
                    ramp_estimate = max(
                        ramp_estimate, last["ramp_s"] * (nodes / last["connected"]) ** 2
                    )
                reserve = settle_s + window_s + _TEARDOWN_S + _WELCOME_WAIT_S
                if left() < reserve + _MIN_RAMP_S:
                    stopped_early = (
                        f"time budget: {left():.0f}s left of --max-total-s {max_total_s:.0f}, "
                        f"{nodes} nodes needs ~{ramp_estimate + reserve:.0f}s"
                    )
                    break
                log(
                    f"{nodes} nodes: ramp predicted ~{ramp_estimate:.0f}s, "
                    f"{left() - reserve:.0f}s available"
                )
                if cp is None:
                    try:
                        cp = mesh.start_controlplane(f"cp-{index}")
                    except RuntimeError as exc:
                        stopped_early = f"control plane cp-{index} did not start: {exc}"[:2000]
                        break
                    time.sleep(1.0)
                idle_rss = rss_mb(cp.pid)
                port = int(cp.address.rsplit(":", 1)[1])
                log(f"{nodes} nodes: control plane {cp.name} pid {cp.pid}; ramping")
                sim = Simulator.start(
                    cp.address,
                    nodes,
                    workdir=workdir,
                    ramp_per_s=ramp_per_s,
                    per_channel=streams_per_channel,
                    max_pending=max_pending,
                    ramp_timeout_s=max(left() - reserve, _MIN_RAMP_S),
                    max_run_s=max(left(), 1.0),
                )
                spy: subprocess.Popen[bytes] | None = None
                orderly = False  # False: an exception (Ctrl-C) is unwinding; skip the waits
                try:
                    ramp_from = Sample.take(cp.pid)
                    ready = sim.wait_event("ready", max(left(), 1.0))
                    ramp_to = Sample.take(cp.pid)
                    log(
                        f"{nodes} nodes: {ready['connected']} connected, {ready['failed']} "
                        f"failed in {ready['ramp_s']:.1f}s"
                        + (f" ({ready['first_error']})" if ready["first_error"] else "")
                    )
                    if left() < settle_s + window_s + 3.0:
                        raise _OutOfTime
                    time.sleep(settle_s)
                    if profile_dir is not None:
                        profile_dir.mkdir(parents=True, exist_ok=True)
                        spy = subprocess.Popen(
                            [
                                str(Path(sys.executable).parent / "py-spy"),
                                "record",
                                "-p",
                                str(cp.pid),
                                "-d",
                                str(max(1, int(window_s))),
                                "-f",
                                "raw",
                                "--nonblocking",
                                "-o",
                                str(profile_dir / f"cp-{nodes}.txt"),
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    win = _measure_window(cp.pid, window_s, sim)
                    conns = tcp_connections(port)
                    records, record_bytes = node_records(etcd_url)
                    stats = win["stats"]
                    # Streams alive during the window (a Welcome that came after the ramp
                    # counts; a stream that died does not): the per-node figures use these.
                    connected = int(stats["connected"]) - int(stats["dropped"])
                    not_launched = nodes - int(ready["launched"])
                    net_cpu = win["cpu_core_share"] - baseline["cpu_core_share"]
                    row: dict[str, Any] = {
                        "nodes": nodes,
                        "connected": connected,
                        "connected_at_ramp_end": int(ready["connected"]),
                        "failed": int(ready["failed"]),
                        "not_launched": not_launched,
                        "dropped": int(stats["dropped"]),
                        "ramp_s": ready["ramp_s"],
                        "cp_cpu_share_during_ramp": round(ramp_from.share(ramp_to, cp.pid), 3),
                        "cp_cpu_core_share": round(win["cpu_core_share"], 4),
                        "cp_cpu_per_node_us_per_s": (
                            round(net_cpu * 1e6 / connected, 2) if connected else None
                        ),
                        "cp_cpu_us_per_telemetry_msg": (
                            round(net_cpu * win["window_s"] * 1e6 / win["msgs"], 2)
                            if win["msgs"]
                            else None
                        ),
                        "cp_rss_mb": round(win["rss_mb"], 1),
                        "cp_rss_idle_mb": round(idle_rss, 1),
                        "rss_per_node_kb": (
                            round((win["rss_mb"] - baseline["rss_mb"]) * 1024 / connected, 2)
                            if connected
                            else None
                        ),
                        "rss_per_node_kb_vs_own_idle": (
                            round((win["rss_mb"] - idle_rss) * 1024 / connected, 2)
                            if connected
                            else None
                        ),
                        "records_in_etcd": records,
                        "record_bytes_avg": round(record_bytes / records) if records else 0,
                        "telemetry_msgs_per_s": round(win["msgs_per_s"], 1),
                        "late_sends": win["late"],
                        "control_messages_received": int(stats["received"]),
                        "tcp_connections": conns,
                        "channels": ready["channels"],
                        "welcome_telemetry_interval_ms": ready["telemetry_interval_ms"],
                        "simulator_cpu_share": round(win["sim_cpu_share"], 3),
                        "window_s": win["window_s"],
                    }
                    rows.append(row)
                    log(
                        f"{nodes} nodes: cp {row['cp_cpu_core_share']:.3f} core, "
                        f"{row['cp_cpu_per_node_us_per_s']} us/node/s, {row['cp_rss_mb']} MB, "
                        f"{records} records, {row['telemetry_msgs_per_s']} msg/s, "
                        f"simulator {row['simulator_cpu_share']:.2f} core"
                    )
                    if not_launched:
                        stopped_early = (
                            f"time budget: the {nodes}-node ramp was cut at {connected} streams "
                            f"after {ready['ramp_s']:.0f}s (measured there); raise --max-total-s"
                        )
                    elif row["failed"] or row["dropped"]:
                        stopped_early = (
                            f"{row['failed']} failed / {row['dropped']} dropped streams at "
                            f"{nodes} nodes: {stats['first_error'] or ready['first_error']}"
                        )
                    elif row["cp_cpu_core_share"] > CPU_LIMIT_SHARE:
                        stopped_early = (
                            f"control plane above {CPU_LIMIT_SHARE:.0%} of one core at "
                            f"{nodes} nodes"
                        )
                    orderly = True
                except (_OutOfTime, TimeoutError) as exc:
                    stopped_early = f"time budget ran out during {nodes} nodes ({exc!r})"
                    orderly = True
                finally:
                    if spy is not None:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            spy.wait(5.0)
                        if spy.poll() is None:
                            spy.kill()
                            spy.wait()
                    sim.stop()
                    # The streams end; the control plane deletes their records. Then stop it
                    # too so the next count starts from a fresh process.
                    remaining = 0
                    if orderly:
                        remaining = _wait_records(etcd_url, 0, min(15.0, max(left(), 5.0)))
                    cp.stop(grace_s=8.0)
                    cp = None
                    if remaining and orderly:
                        remaining = _wait_records(etcd_url, 0, float(lease_ttl_s) + 5.0)
                    if remaining:
                        log(f"{remaining} records still in etcd after {nodes} nodes")
                if stopped_early:
                    break
    return {
        "benchmark": "telemetry_ingest",
        "config": config,
        "baseline": baseline,
        "rows": rows,
        "stopped_early": stopped_early or None,
        "summary": _summary(baseline, rows) if baseline else {"target_met": False},
        "wall_s": round(time.monotonic() - started, 1),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/telemetry_ingest.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("--counts", type=lambda s: [int(c) for c in s.split(",")], default=None)
    p.add_argument("--window", type=float, default=10.0, help="measured seconds per count")
    p.add_argument("--max-total-s", type=float, default=300.0, help="cap for the whole run")
    p.add_argument("--ramp-per-s", type=float, default=200.0, help="new streams per second")
    p.add_argument("--per-channel", type=int, default=100, help="streams per HTTP/2 connection")
    p.add_argument(
        "--max-pending", type=int, default=50, help="streams awaiting their Welcome, at most"
    )
    p.add_argument("--settle", type=float, default=2.0, help="seconds between ramp and window")
    p.add_argument("--profile-dir", type=Path, default=None, help="py-spy raw profiles here")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    # The simulator sub-mode (this file run by itself in a child process).
    p.add_argument("--simulate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", default="", help=argparse.SUPPRESS)
    p.add_argument("--nodes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ramp-timeout-s", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--max-run-s", type=float, default=300.0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.simulate:
        simulate_main(args)
        return

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through every finally: processes are stopped

    signal.signal(signal.SIGTERM, terminate)
    counts = args.counts or [250, 500, 1000, 2000]
    result = run_ingest(
        counts,
        args.window,
        args.max_total_s,
        ramp_per_s=args.ramp_per_s,
        streams_per_channel=args.per_channel,
        max_pending=args.max_pending,
        settle_s=args.settle,
        profile_dir=args.profile_dir,
    )
    emit(result, args.out)


if __name__ == "__main__":
    main()
