"""Scale soak: the whole control loop with thousands of live nodes, then churn (issue 19).

Method
------
One real etcd (plain, its ``/metrics`` on the client URL) and one control-plane replica
(``python -m meshserve.controlplane`` through :class:`meshserve.devtools.local.LocalMesh`, lease
TTL 5 s). Simulated nodes are real ``NodeLink/Connect`` streams (grpc.aio on uvloop, 100 streams
per HTTP/2 connection, as ``bench/telemetry_ingest.py`` opens them), spread over ``--sims``
simulator processes (this file with ``--simulate``) so the simulator is not charged to the
control plane; each simulator's own CPU is reported. A simulated node:

* says Hello with no copies (labels ``tier=edge``, ``zone=z<i % 10>``, 8 cores, 16 GiB);
* answers a LoadModel like a node: CopyStatus LOADING for the spec's sha256, then READY
  ``LOAD_S`` later (tensors, memory, provider); an UnloadModel with UNLOADED;
* sends telemetry on change as ``node/telemetry.py``'s ChangeFilter does: a full message right
  after connecting and every 30 s (``HEARTBEAT_S``), and between them a delta (the header and
  the entries of its copies) only when its figures changed: each second, ``--change-share``
  (10 %) of the nodes change theirs; the others send nothing;
* leaves by closing its stream hard (the call is cancelled: RST_STREAM, no goodbye) and rejoins
  ``REJOIN_S`` later as a fresh node (no copies in its Hello).

Steps (one control plane throughout, the nodes added to it): for each count of ``--counts``
(1,000 / 5,000 / 10,000) the simulators ramp up to it (``--ramp-per-s``, the control plane's
default admission rate), the run settles, then measures a steady window (``--window``): control
plane CPU (cores, utime + stime from /proc) and RSS, etcd writes/s (``etcd_mvcc_put_total``,
``_delete_total``, ``_txn_total`` deltas from etcd's own /metrics; also its revisions/s) and
database size, simulator messages and bytes per node per second (both directions). Then
``--probes`` models are registered (real ``Admin/RegisterModel``, copies 2..3, one every 2 s)
and timed: RegisterModel -> the placement record appears in etcd with nodes (the scheduler's
decision, observed through an etcd watch), -> each copy's LoadModel seen by its simulated node,
-> ``ModelReady`` true on the control plane's gateway. Then ``--kills`` nodes holding a copy
die (their stream is closed hard) and the time from the close to the placement naming another
node in their place (and to that node's Load) is measured. The probe models are removed.

Then a churn phase (``--churn-s``, default 5 min) at the largest count reached: 1 % of the
nodes leave and rejoin per minute (half of the leavers chosen among nodes holding a copy, so
re-placement is measured), a model is registered (copies 2..3) or removed every 2 s, telemetry
as above. Reported: the control plane's average and peak CPU, peak RSS, etcd writes/s against
the state changes/s that caused them (node links made and lost, copy status reports, model
registrations and removals), etcd database size at the start and end, and every latency above.
Optionally (``--two-replicas N``) a second step with two replicas: fresh simulators whose nodes
each link to both (as DESIGN says), measured like a step.

The run stops early and says why (``stopped_early``) when a ramp does not reach its count in
time, the control plane logs trouble (its etcd lease's keep-alive failing or lost, the leader
loop failing: ``cp_log`` counts its WARNING / ERROR lines per phase), a simulator or the control
plane saturates (more than ``SATURATED`` of a core) before the last count, or the next count
would not fit in ``--max-total-s`` (default 900 s); the churn then runs at the last healthy count
(the extra nodes leave first). The leader's scheduling passes are read from its
``--metrics-listen`` histogram (``scheduler_passes``). ``--quick``: 1,000 nodes (``--nodes`` to
override), one replica, a short window, 3 probes, a 30 s churn: a smoke run in about a minute.

Reading the JSON (stdout and ``--out``; progress on stderr): ``steps[]`` (one per count:
``nodes``, ``connected``, ``failed``, ``ramp_s``, and per phase (``ramp``, ``steady``,
``probes``): ``cp_cores``, ``cp_rss_mb``, ``etcd``, ``per_node``, ``simulators``,
``latency_ms``, ``cp_log``), ``churn`` (the same blocks over the churn phase, plus
``model_ops``, ``leaves``, ``state_changes_per_s``), ``two_replicas`` (or null), ``errors`` (the
harness's: RPC failures, probes never READY), ``targets`` (each target of the issue, the figure
quoted and its verdict: met / not met / not measured, with why).

    .venv/bin/python bench/scale_soak.py                       # 1,000 / 5,000 / 10,000 + 5 min
    .venv/bin/python bench/scale_soak.py --quick --nodes 300   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from grpc import aio  # noqa: E402

from bench._report import emit  # noqa: E402
from bench.telemetry_ingest import CHANNEL_OPTIONS, CLK_TCK, Simulator, cpu_seconds, rss_mb  # noqa: E402
from meshserve.common.errors import EOF  # noqa: E402
from meshserve.controlplane import keys  # noqa: E402
from meshserve.devtools.local import LocalMesh, ManagedProcess, free_port  # noqa: E402
from meshserve.node.telemetry import FRAME_OVERHEAD_BYTES, HEARTBEAT_S  # noqa: E402
from meshserve.protos import inference_pb2, inference_pb2_grpc, mesh_pb2, mesh_pb2_grpc  # noqa: E402

__all__ = ["run_soak"]

LOAD_S = 0.05  # a simulated node's artifact load: LOADING, then READY this much later
REJOIN_S = 10.0  # a node that left comes back this much later (> lease TTL + 1 s)
CONNECT_ATTEMPTS = (
    6  # a node's tries to link (backoff 0.5..1.5 s x attempt) before it counts failed
)
LATE_S = 0.25  # a telemetry tick this far behind schedule counts as late
SATURATED = 0.9  # share of one core above which a process counts as saturated
LEASE_TTL_S = 5
OP_EVERY_S = 2.0  # a model registered or removed this often during churn
PROBE_TIMEOUT_S = 30.0  # a probe model not READY by then counts as an error


def log(message: str) -> None:
    print(f"[scale_soak] {message}", file=sys.stderr, flush=True)


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


# -- the simulator (a separate process) --------------------------------------------------------


class _Counters(Counter[str]):
    """A simulator's counts: ``linked`` (nodes with every stream welcomed, now), ``links_made``
    (streams welcomed: joins and rejoins), ``retries`` (connects refused or unanswered, tried
    again), ``failed`` (no Welcome after every try), ``dropped`` (streams the
    control plane ended, not a planned leave), ``left`` (planned leaves: hard closes), telemetry
    (``tel_msgs``, ``tel_full``, ``tel_bytes``), copy status reports (``status_msgs``,
    ``status_bytes``), control messages received (``recv_msgs``, ``recv_bytes``), ``loads``,
    ``unloads`` and ``late`` telemetry ticks; and the first error seen."""

    first_error = ""

    def error(self, text: str) -> None:
        if not self.first_error:
            self.first_error = text[:500]


def _tensor(name: str, shape: list[int]) -> mesh_pb2.TensorSpec:
    return mesh_pb2.TensorSpec(name=name, datatype="FP32", shape=shape)


class _SimNode:
    """One simulated node: a stream to each target, its copies, its telemetry."""

    def __init__(self, sim: _Sim, index: int) -> None:
        self.sim = sim
        self.index = index
        self.node_id = f"soak-{index + 1:05d}"
        self.rng = random.Random(index)
        self.copies: dict[tuple[str, str], mesh_pb2.CopyStatus] = {}
        self.calls: list[Any] = []
        self.task: asyncio.Task[None] | None = None
        self.linked = False
        self.leaving = False
        self.requests = 0
        self.cpu = self.rng.uniform(5.0, 95.0)

    def hello(self) -> mesh_pb2.NodeMessage:
        return mesh_pb2.NodeMessage(
            hello=mesh_pb2.Hello(
                node_id=self.node_id,
                labels={"tier": "edge", "zone": f"z{self.index % 10}"},
                hardware=mesh_pb2.Hardware(
                    cpu_cores=8, memory_bytes=16 << 30, execution_providers=["CPUExecutionProvider"]
                ),
                version="0.1.0",
            )
        )

    async def _connect(self) -> bool:
        """Open a stream to every target and wait for each Welcome; False (streams closed)
        when one is refused or does not answer."""
        c = self.sim.counters
        for target in self.sim.targets:
            call = self.sim.stub(target, self.index).Connect()
            self.calls.append(call)
            try:
                await call.write(self.hello())
                first = await asyncio.wait_for(call.read(), 30.0)
                if first is EOF or not first.HasField("welcome"):
                    raise ConnectionError("no Welcome")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                c.error(_describe(exc))
                for opened in self.calls:
                    opened.cancel()
                self.calls = []
                return False
            c["links_made"] += 1
        return True

    async def run(self) -> None:
        """Link (a refused or unanswered connect is retried with backoff, as a node does), then
        serve until cancelled (a leave) or the stream breaks."""
        sim, c = self.sim, self.sim.counters
        tasks: list[asyncio.Task[None]] = []
        sim.connecting += 1
        try:
            for attempt in range(CONNECT_ATTEMPTS):
                if await self._connect():
                    break
                c["retries"] += 1
                await asyncio.sleep(self.rng.uniform(0.5, 1.5) * (attempt + 1))
            else:
                c["failed"] += 1
                return
            sim.connecting -= 1
            self.linked = True
            c["linked"] += 1
            locks = [asyncio.Lock() for _ in self.calls]
            tasks = [
                asyncio.create_task(self._read(call, lock))
                for call, lock in zip(self.calls, locks, strict=True)
            ]
            tasks.append(asyncio.create_task(self._telemetry(locks)))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                failure = t.exception()
                if failure is not None:
                    c["dropped"] += 1
                    c.error(f"after Welcome: {_describe(failure)}")
                    break
        finally:
            if not self.linked:
                sim.connecting -= 1
            for t in tasks:
                t.cancel()
            for call in self.calls:
                call.cancel()  # a hard close: RST_STREAM, no goodbye
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if self.linked:
                c["linked"] -= 1
            self.linked = False
            self.calls = []

    async def _write(self, call: Any, lock: asyncio.Lock, message: mesh_pb2.NodeMessage) -> int:
        async with lock:
            await call.write(message)
        return message.ByteSize() + FRAME_OVERHEAD_BYTES

    async def _read(self, call: Any, lock: asyncio.Lock) -> None:
        c = self.sim.counters
        while True:
            message = await call.read()
            if message is EOF:
                raise ConnectionError("the control plane ended the stream")
            c["recv_msgs"] += 1
            c["recv_bytes"] += message.ByteSize() + FRAME_OVERHEAD_BYTES
            kind = message.WhichOneof("body")
            if kind == "load":
                c["loads"] += 1
                load = message.load
                _emit("load", node=self.node_id, model=load.model, variant=load.variant)
                await self._load(call, lock, load)
            elif kind == "unload":
                c["unloads"] += 1
                key = (message.unload.model, message.unload.variant)
                old = self.copies.pop(key, None)
                status = mesh_pb2.CopyStatus(
                    model=key[0],
                    variant=key[1],
                    state=mesh_pb2.UNLOADED,
                    sha256=old.sha256 if old is not None else "",
                )
                c["status_bytes"] += await self._write(call, lock, _status(status))
                c["status_msgs"] += 1

    async def _load(self, call: Any, lock: asyncio.Lock, load: mesh_pb2.LoadModel) -> None:
        c = self.sim.counters
        key = (load.model, load.variant)
        held = self.copies.get(key)
        if held is None or held.sha256 != load.sha256:
            loading = mesh_pb2.CopyStatus(
                model=load.model, variant=load.variant, state=mesh_pb2.LOADING, sha256=load.sha256
            )
            c["status_bytes"] += await self._write(call, lock, _status(loading))
            c["status_msgs"] += 1
            await asyncio.sleep(LOAD_S)
            held = mesh_pb2.CopyStatus(
                model=load.model,
                variant=load.variant,
                state=mesh_pb2.READY,
                sha256=load.sha256,
                inputs=[_tensor("input", [-1, 16])],
                outputs=[_tensor("output", [-1, 4])],
                memory_bytes=50 << 20,
                load_seconds=LOAD_S,
                warmup_seconds=0.01,
                execution_provider="CPUExecutionProvider",
            )
            self.copies[key] = held
        c["status_bytes"] += await self._write(call, lock, _status(held))
        c["status_msgs"] += 1

    def _summary(self, delta: bool) -> mesh_pb2.Telemetry:
        t = mesh_pb2.Telemetry(
            unix_ms=int(time.time() * 1000),
            cpu_percent=self.cpu,
            rss_bytes=600 << 20,
            memory_available_bytes=12 << 30,
            delta=delta,
        )
        for model, variant in self.copies:
            t.models.add(
                model=model,
                variant=variant,
                in_flight=self.rng.randrange(4),
                requests=self.requests,
                latency_p50_ms=3.0,
                latency_p99_ms=9.0,
                max_batch_size=32,
            )
        return t

    async def _telemetry(self, locks: list[asyncio.Lock]) -> None:
        """One tick a second: a full message first and every HEARTBEAT_S, a delta when this
        node's figures changed (``change_share`` of the ticks), else nothing (ChangeFilter)."""
        loop = asyncio.get_running_loop()
        c = self.sim.counters
        due = loop.time() + self.rng.random()
        last_full = -math.inf
        while True:
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > LATE_S:
                c["late"] += 1
                if -delay > 1.0:
                    due = loop.time()
            due += 1.0
            now = loop.time()
            if now - last_full >= HEARTBEAT_S:
                last_full = now
                message = mesh_pb2.NodeMessage(telemetry=self._summary(delta=False))
                c["tel_full"] += len(locks)
            elif self.rng.random() < self.sim.change_share:
                self.cpu = self.rng.uniform(5.0, 95.0)
                self.requests += self.rng.randrange(1, 50)
                message = mesh_pb2.NodeMessage(telemetry=self._summary(delta=True))
            else:
                continue
            for call, lock in zip(self.calls, locks, strict=True):
                c["tel_bytes"] += await self._write(call, lock, message)
                c["tel_msgs"] += 1


def _status(status: mesh_pb2.CopyStatus) -> mesh_pb2.NodeMessage:
    return mesh_pb2.NodeMessage(copy_status=status)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)


class _Sim:
    """One simulator process: nodes ``index = offset + k * stride``, commands on stdin."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.targets: list[str] = args.target.split(",")
        self.offset: int = args.offset
        self.stride: int = args.stride
        self.per_channel: int = args.per_channel
        self.ramp_per_s: float = args.ramp_per_s
        self.max_pending: int = args.max_pending
        self.change_share: float = args.change_share
        self.counters = _Counters()
        self.nodes: list[_SimNode] = []
        self.want = 0
        self.connecting = 0  # streams waiting for their Welcome
        self.channels: dict[tuple[str, int], aio.Channel] = {}
        self.churn: dict[str, Any] | None = None
        self.stop = asyncio.Event()

    def stub(self, target: str, index: int) -> mesh_pb2_grpc.NodeLinkStub:
        slot = (index // self.stride) // self.per_channel
        channel = self.channels.get((target, slot))
        if channel is None:
            channel = aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            self.channels[(target, slot)] = channel
        return mesh_pb2_grpc.NodeLinkStub(channel)

    def start(self, node: _SimNode) -> None:
        node.leaving = False
        node.copies.clear()
        node.task = asyncio.create_task(node.run())

    def command(self, line: str) -> None:
        with contextlib.suppress(ValueError):
            cmd = json.loads(line)
            if cmd["cmd"] == "target":
                self.want = int(cmd["n"])
                for node in self.nodes[self.want :]:  # fewer: the extra nodes leave for good
                    node.leaving = True
                    if node.task is not None:
                        node.task.cancel()
                del self.nodes[self.want :]
            elif cmd["cmd"] == "churn":
                self.churn = cmd
            elif cmd["cmd"] == "churn_off":
                self.churn = None
            elif cmd["cmd"] == "kill_holders":
                self.kill_holders(int(cmd["n"]))

    def leave(self, node: _SimNode, rejoin_s: float) -> None:
        """Close ``node``'s streams hard now; bring it back, fresh, ``rejoin_s`` later."""
        if node.task is None or node.leaving:
            return
        node.leaving = True
        _emit("left", node=node.node_id, copies=[m for m, _ in node.copies], linked=node.linked)
        self.counters["left"] += 1
        node.task.cancel()
        asyncio.get_running_loop().call_later(rejoin_s, self.rejoin, node)

    def rejoin(self, node: _SimNode) -> None:
        if not self.stop.is_set() and node in self.nodes:
            self.start(node)

    def kill_holders(self, n: int) -> None:
        holders = [x for x in self.nodes if x.linked and x.copies and not x.leaving]
        random.shuffle(holders)
        for node in holders[:n]:
            self.leave(node, REJOIN_S)

    async def ramp(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self.stop.is_set():
            if (
                len(self.nodes) < self.want
                and self.connecting < self.max_pending
                and loop.time() >= next_at
            ):
                node = _SimNode(self, self.offset + len(self.nodes) * self.stride)
                self.nodes.append(node)
                self.start(node)
                next_at = max(next_at + 1.0 / self.ramp_per_s, loop.time() - 0.5)
                continue
            await asyncio.sleep(0.005 if len(self.nodes) < self.want else 0.1)

    async def churner(self) -> None:
        rng = random.Random(self.offset)
        while not self.stop.is_set():
            churn = self.churn
            if churn is None or not self.nodes:
                await asyncio.sleep(0.2)
                continue
            per_s = float(churn["per_min"]) * len(self.nodes) / 60.0
            await asyncio.sleep(rng.expovariate(per_s) if per_s > 0 else 1.0)
            live = [x for x in self.nodes if x.linked and not x.leaving]
            holders = [x for x in live if x.copies]
            pool = holders if holders and rng.random() < float(churn["holder_share"]) else live
            if pool and self.churn is not None:
                self.leave(rng.choice(pool), float(churn["rejoin_s"]))

    async def report(self) -> None:
        while not self.stop.is_set():
            c = self.counters
            _emit("stats", nodes=len(self.nodes), first_error=c.first_error, **c)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 1.0)

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)

        def read_stdin() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(self.command, line)
            loop.call_soon_threadsafe(self.stop.set)  # the parent is gone

        threading.Thread(target=read_stdin, daemon=True).start()
        workers = [asyncio.create_task(w()) for w in (self.ramp, self.churner, self.report)]
        try:
            await self.stop.wait()
        finally:
            for w in workers:
                w.cancel()
            tasks = [x.task for x in self.nodes if x.task is not None]
            for t in tasks:
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    asyncio.gather(*(ch.close(None) for ch in self.channels.values())), 5.0
                )


def simulate_main(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def go() -> None:
        await _Sim(args).main()

    try:
        import uvloop
    except ImportError:
        asyncio.run(go())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(go())


# -- the parent: processes and figures ---------------------------------------------------------


def _start_sim(
    workdir: Path, name: str, targets: list[str], offset: int, stride: int, opts: dict[str, Any]
) -> Simulator:
    log_path = workdir / f"{name}.log"
    log_file = open(log_path, "ab")  # closed by Simulator.stop
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--simulate",
        "--target",
        ",".join(targets),
        "--offset",
        str(offset),
        "--stride",
        str(stride),
        *(x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))),
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, start_new_session=True
    )
    sim = Simulator(proc, log_path, _log=log_file)
    threading.Thread(target=sim._read, daemon=True).start()
    return sim


def _send(sim: Simulator, **cmd: Any) -> None:
    if sim.proc.stdin is not None and sim.proc.poll() is None:
        with contextlib.suppress(OSError):
            sim.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            sim.proc.stdin.flush()


def etcd_metrics(url: str) -> dict[str, float]:
    """The etcd_mvcc / db-size figures of etcd's own /metrics (plain etcd: on its client URL)."""
    wanted = (
        "etcd_mvcc_put_total",
        "etcd_mvcc_delete_total",
        "etcd_mvcc_txn_total",
        "etcd_mvcc_range_total",
        "etcd_mvcc_db_total_size_in_bytes",
        "etcd_mvcc_db_total_size_in_use_in_bytes",
        "etcd_debugging_mvcc_current_revision",
        "etcd_debugging_mvcc_compact_revision",
        "etcd_debugging_mvcc_keys_total",
    )
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"{url.split(',')[0]}/metrics", timeout=5.0) as response:
        for raw in response.read().decode().splitlines():
            name, _, value = raw.partition(" ")
            if name in wanted:
                out[name] = float(value)
    return out


_PASS_BUCKET = re.compile(
    r'^meshserve_scheduler_(duration|decision)\w*_bucket\{(?:.*,)?le="([^"]+)".*\} (\S+)'
)


def scheduler_buckets(address: str) -> dict[str, dict[float, float]]:
    """The leader's histograms from a control plane's ``--metrics-listen``, le -> count:
    ``duration`` (``meshserve.scheduler.duration``: one scheduling pass, the view read, the
    decisions and their etcd write) and ``decision`` (``meshserve.scheduler.decision``: the
    decisions alone, autoscaler and placement over the view, no I/O)."""
    out: dict[str, dict[float, float]] = {"duration": {}, "decision": {}}
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5.0) as response:
        for raw in response.read().decode().splitlines():
            match = _PASS_BUCKET.match(raw)
            if match:
                le = math.inf if match[2] == "+Inf" else float(match[2])
                out[match[1]][le] = out[match[1]].get(le, 0.0) + float(match[3])
    return out


def _passes(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """Scheduling passes between two histogram readings: how many, the share within 10 ms,
    and p50 / p99 as the histogram's bucket bounds (ms; None past the last bound)."""
    cumulative = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = cumulative[-1][1] if cumulative else 0.0

    def bound(q: float) -> float | None:
        for le, n in cumulative:
            if n >= q * total:
                return None if math.isinf(le) else le * 1000
        return None

    within = next((n for le, n in cumulative if le == 0.01), 0.0)
    return {
        "passes": int(total),
        "share_within_10ms": round(within / total, 4) if total else None,
        "p50_le_ms": bound(0.5) if total else None,
        "p99_le_ms": bound(0.99) if total else None,
    }


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (not idle, not iowait), all cores."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / CLK_TCK


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _dist_ms(values: list[float]) -> dict[str, Any]:
    p50, p99 = _pct(values, 0.5), _pct(values, 0.99)
    return {
        "n": len(values),
        "p50": round(p50 * 1000, 1) if p50 is not None else None,
        "p99": round(p99 * 1000, 1) if p99 is not None else None,
        "max": round(max(values) * 1000, 1) if values else None,
    }


async def _until(done: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    """Poll ``done`` every ``step`` seconds, at most ``timeout`` seconds; its last answer."""
    for _ in range(max(1, math.ceil(timeout / step))):
        if done():
            return True
        await asyncio.sleep(step)
    return done()


class _LogScan:
    """The control plane's WARNING / ERROR lines since the last look, counted by kind."""

    TROUBLE = ("lease lost", "keep-alive failed", "leader loop failed")
    SHOWN = (*TROUBLE, "store replaced", "unload floor")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def take(self) -> dict[str, int]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
                self.offset = f.tell()
        except OSError:
            return {}
        kinds: Counter[str] = Counter()
        for raw in data.decode(errors="replace").splitlines():
            parts = raw.split(" ", 3)
            if len(parts) == 4 and parts[2] in ("WARNING", "ERROR"):
                words = re.sub(r"soak-\d+|\b[0-9a-f]{16}\b|\d+(\.\d+)?", "#", parts[3])
                kinds[f"{parts[2]} {' '.join(words.split()[:7])}"] += 1
        shown = dict(kinds.most_common(12))
        shown.update((k, n) for k, n in kinds.items() if any(t in k for t in self.SHOWN))
        return shown

    @classmethod
    def trouble(cls, kinds: dict[str, int]) -> str:
        """The first sign of a control plane in trouble among ``kinds`` ("" if none)."""
        for kind in kinds:
            if any(t in kind for t in cls.TROUBLE):
                return kind
        return ""


@dataclass
class _Probe:
    model: str
    desired: int
    t_register: float
    rpc_s: float = 0.0
    t_decision: float | None = None
    loads: dict[str, float] = field(default_factory=dict)
    t_ready: float | None = None
    removed: bool = False  # removed (churn) before it was seen READY


@dataclass
class _Death:
    node: str
    model: str
    t_dead: float
    t_replaced: float | None = None  # the placement names another node in its place
    t_load: float | None = None  # that node saw its Load


class _Tracker:
    """Watches placements in etcd and the simulators' events; times probes and deaths."""

    def __init__(self) -> None:
        self.probes: dict[str, _Probe] = {}
        self.deaths: list[_Death] = []
        self.placements: dict[str, mesh_pb2.Placement] = {}
        self.placement_writes = 0
        # recent history per model, for deaths reported after what followed them (the
        # simulators' events arrive through a pipe, the placements through a watch)
        self.placed: dict[str, deque[tuple[float, frozenset[str], int]]] = {}
        self.loaded: dict[str, deque[tuple[float, str]]] = {}
        self.live_models: dict[str, int] = {}  # registered by this run -> desired copies
        self.errors: list[str] = []

    def error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text[:300])
        log(f"error: {text[:300]}")

    def on_placement(self, model: str, placement: mesh_pb2.Placement | None, t: float) -> None:
        self.placement_writes += 1
        if placement is None:
            self.placements.pop(model, None)
            return
        self.placements[model] = placement
        probe = self.probes.get(model)
        if probe is not None and probe.t_decision is None and placement.nodes:
            probe.t_decision = t
        nodes = frozenset(placement.nodes)
        self.placed.setdefault(model, deque(maxlen=32)).append((t, nodes, placement.desired_copies))
        for d in self.deaths:
            if d.model == model:
                self._replaced(d, t, nodes, placement.desired_copies)

    @staticmethod
    def _replaced(d: _Death, t: float, nodes: frozenset[str], desired: int) -> None:
        if d.t_replaced is None and t >= d.t_dead and d.node not in nodes and len(nodes) >= desired:
            d.t_replaced = t

    def on_load(self, event: dict[str, Any]) -> None:
        model, node, t = event["model"], event["node"], float(event["t"])
        probe = self.probes.get(model)
        if probe is not None and node not in probe.loads:
            probe.loads[node] = t
        self.loaded.setdefault(model, deque(maxlen=32)).append((t, node))
        for d in self.deaths:
            if d.model == model and d.t_load is None and node != d.node and t >= d.t_dead:
                d.t_load = t

    def on_left(self, event: dict[str, Any]) -> None:
        for model in event["copies"]:
            if model not in self.live_models:
                continue
            d = _Death(event["node"], model, float(event["t"]))
            self.deaths.append(d)
            for t, nodes, desired in self.placed.get(model, ()):
                self._replaced(d, t, nodes, desired)
            d.t_load = min(
                (t for t, node in self.loaded.get(model, ()) if node != d.node and t >= d.t_dead),
                default=None,
            )

    def forget(self, model: str) -> None:
        self.live_models.pop(model, None)
        if model in self.probes:
            self.probes[model].removed = True
        self.placed.pop(model, None)
        self.loaded.pop(model, None)
        self.deaths = [d for d in self.deaths if d.model != model or d.t_replaced is not None]

    def latencies(self, probes: list[_Probe], deaths: list[_Death]) -> dict[str, Any]:
        decision = [p.t_decision - p.t_register for p in probes if p.t_decision is not None]
        loads = [t - p.t_register for p in probes for t in list(p.loads.values())[: p.desired]]
        all_loads = [
            sorted(p.loads.values())[p.desired - 1] - p.t_register
            for p in probes
            if len(p.loads) >= p.desired
        ]
        ready = [p.t_ready - p.t_register for p in probes if p.t_ready is not None]
        replaced = [d.t_replaced - d.t_dead for d in deaths if d.t_replaced is not None]
        reloaded = [d.t_load - d.t_dead for d in deaths if d.t_load is not None]
        return {
            "models_registered": len(probes),
            "register_rpc": _dist_ms([p.rpc_s for p in probes]),
            "register_to_decision": _dist_ms(decision),
            "register_to_load_each_copy": _dist_ms(loads),
            "register_to_load_all_copies": _dist_ms(all_loads),
            "register_to_ready_gateway": _dist_ms(ready),
            "not_ready": sum(1 for p in probes if p.t_ready is None),
            "not_ready_removed_first": sum(1 for p in probes if p.t_ready is None and p.removed),
            "copies_lost_with_dead_nodes": len(deaths),
            "death_to_replaced": _dist_ms(replaced),
            "replaced_later_than_ttl_plus_1s": sum(1 for x in replaced if x > LEASE_TTL_S + 1.0),
            "death_to_load_elsewhere": _dist_ms(reloaded),
            "not_replaced": sum(1 for d in deaths if d.t_replaced is None),
        }


@dataclass
class _Mark:
    """Everything counted at one instant, to diff two of them."""

    t: float
    cpu: dict[int, float]
    etcd: dict[str, float]
    sims: list[dict[str, Any]]
    ops: int
    busy: float
    passes: dict[str, dict[float, float]]

    def diff(
        self, later: _Mark, cp_pids: list[int], sim_pids: list[int], etcd_pid: int
    ) -> dict[str, Any]:
        span = max(later.t - self.t, 1e-9)

        def cores(pid: int) -> float:
            return round((later.cpu.get(pid, 0.0) - self.cpu.get(pid, 0.0)) / span, 3)

        def etcd(name: str) -> float:
            return later.etcd.get(name, 0.0) - self.etcd.get(name, 0.0)

        def sims(name: str) -> int:
            return sum(
                int(b.get(name, 0)) - int(a.get(name, 0))
                for a, b in zip(self.sims, later.sims, strict=True)
            )

        nodes = max(1, sum(int(s.get("linked", 0)) for s in later.sims))
        puts, deletes, txns = (etcd(f"etcd_mvcc_{k}_total") for k in ("put", "delete", "txn"))
        changes = (
            sims("links_made")
            + sims("left")
            + sims("dropped")
            + sims("status_msgs")
            + later.ops
            - self.ops
        )
        return {
            "window_s": round(span, 2),
            "cp_cores": [cores(p) for p in cp_pids],
            "cp_rss_mb": [round(rss_mb(p), 1) for p in cp_pids],
            "machine_busy_cores": round((later.busy - self.busy) / span, 2),
            "scheduler_passes": _passes(
                self.passes.get("duration", {}), later.passes.get("duration", {})
            ),
            "scheduler_decisions": _passes(
                self.passes.get("decision", {}), later.passes.get("decision", {})
            ),
            "etcd": {
                "cores": cores(etcd_pid),
                "writes_per_s": round((puts + deletes + txns) / span, 2),
                "puts_per_s": round(puts / span, 2),
                "deletes_per_s": round(deletes / span, 2),
                "txns_per_s": round(txns / span, 2),
                "revisions_per_s": round(etcd("etcd_debugging_mvcc_current_revision") / span, 2),
                "db_mb": round(later.etcd.get("etcd_mvcc_db_total_size_in_bytes", 0) / 2**20, 2),
                "db_in_use_mb": round(
                    later.etcd.get("etcd_mvcc_db_total_size_in_use_in_bytes", 0) / 2**20, 2
                ),
                "keys": int(later.etcd.get("etcd_debugging_mvcc_keys_total", 0)),
                "compact_revision": int(later.etcd.get("etcd_debugging_mvcc_compact_revision", 0)),
            },
            "state_changes_per_s": round(changes / span, 2),
            "per_node": {
                "telemetry_msgs_per_s": round(sims("tel_msgs") / span / nodes, 4),
                "telemetry_bytes_per_s": round(sims("tel_bytes") / span / nodes, 2),
                "sent_bytes_per_s": round(
                    (sims("tel_bytes") + sims("status_bytes")) / span / nodes, 2
                ),
                "received_msgs_per_s": round(sims("recv_msgs") / span / nodes, 4),
                "received_bytes_per_s": round(sims("recv_bytes") / span / nodes, 2),
            },
            "simulators": {
                "processes": len(sim_pids),
                "cores_each": [cores(p) for p in sim_pids],
                "late_ticks": sims("late"),
                "ticks": round(nodes * span),
            },
        }


class _Run:
    """The parent's state: the mesh, the simulators, the tracker, the clock."""

    def __init__(self, mesh: LocalMesh, args: argparse.Namespace, deadline: float) -> None:
        self.mesh = mesh
        self.args = args
        self.deadline = deadline
        self.cps: list[ManagedProcess] = []
        self.sims: list[Simulator] = []
        self.tracker = _Tracker()
        self.ops = 0
        self.rng = random.Random(19)
        self.serial = 0
        self.watch_task: asyncio.Task[None] | None = None
        self.pump_task: asyncio.Task[None] | None = None
        self.channels: list[aio.Channel] = []
        self.exited: set[int] = set()
        self.etcd_pid: int = mesh.etcd.pid
        self.logs: list[_LogScan] = []
        self.base: set[str] = set()
        self.metrics_address = f"127.0.0.1:{free_port()}"
        self.waiters: set[asyncio.Task[None]] = set()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # simulators
    def start_sims(self, n_sims: int) -> None:
        opts = {
            "per_channel": 100,
            "ramp_per_s": self.args.ramp_per_s / n_sims,
            "max_pending": max(10, 50 // n_sims),
            "change_share": self.args.change_share,
        }
        targets = [cp.address for cp in self.cps]
        self.sims = [
            _start_sim(self.mesh.workdir, f"sim-{len(self.cps)}r-{k}", targets, k, n_sims, opts)
            for k in range(n_sims)
        ]

    def stop_sims(self) -> None:
        for sim in self.sims:
            sim.stop(grace_s=10.0)
        self.sims = []

    def stats(self) -> list[dict[str, Any]]:
        return [s.last_stats or {} for s in self.sims]

    def linked(self) -> int:
        return sum(int(s.get("linked", 0)) for s in self.stats())

    async def pump(self) -> None:
        """Move the simulators' events to the tracker (their own timestamps are kept)."""
        while True:
            for sim in self.sims:
                for _ in range(10_000):
                    try:
                        event = sim.events.get_nowait()
                    except Exception:
                        break
                    kind = event["event"]
                    if kind == "stats":
                        sim.last_stats = event
                    elif kind == "load":
                        self.tracker.on_load(event)
                    elif kind == "left":
                        self.tracker.on_left(event)
                    elif kind == "exit" and sim.pid not in self.exited:
                        self.exited.add(sim.pid)
                        self.tracker.error(f"a simulator exited: {sim.tail(5)}")
            await asyncio.sleep(0.02)

    async def watch_placements(self) -> None:
        from meshserve.controlplane.etcd import connect
        from meshserve.controlplane.etcd._client import get_prefix, watch

        client = await connect(self.mesh.etcd_url)
        try:
            revision, _ = await get_prefix(client, keys.PLACEMENTS.encode())
            stream = await watch(
                client, keys.PLACEMENTS.encode(), start_revision=revision + 1, prefix=True
            )
            async for event in stream:
                model = event.kv.key.decode()[len(keys.PLACEMENTS) :].split("/")[0]
                placement = (
                    keys.decode(event.kv.value, mesh_pb2.Placement())
                    if event.kind == "PUT"
                    else None
                )
                self.tracker.on_placement(model, placement, time.monotonic())
        finally:
            await client.close()

    def mark(self) -> _Mark:
        pids = [cp.pid for cp in self.cps] + [s.pid for s in self.sims] + [self.etcd_pid]
        cpu = {}
        for pid in pids:
            with contextlib.suppress(OSError):
                cpu[pid] = cpu_seconds(pid)
        try:
            metrics = etcd_metrics(self.mesh.etcd_url)
        except OSError as exc:
            self.tracker.error(f"etcd /metrics: {exc!r}")
            metrics = {}
        passes: dict[str, dict[float, float]] = {}
        with contextlib.suppress(OSError, ValueError):
            passes = scheduler_buckets(self.metrics_address)
        return _Mark(
            time.monotonic(), cpu, metrics, self.stats(), self.ops, machine_busy_s(), passes
        )

    def diff(self, a: _Mark, b: _Mark) -> dict[str, Any]:
        return a.diff(b, [cp.pid for cp in self.cps], [s.pid for s in self.sims], self.etcd_pid)

    # the Admin API
    def admin(self) -> mesh_pb2_grpc.AdminStub:
        return mesh_pb2_grpc.AdminStub(self.channels[0])

    async def register(self) -> _Probe:
        self.serial += 1
        name = f"soak-m{self.serial:04d}"
        copies = self.rng.choice((2, 3))
        spec = mesh_pb2.ModelSpec(
            name=name,
            variant="default",
            artifact_uri=f"file:///nonexistent/{name}.onnx",  # never fetched: nodes are simulated
            sha256=hashlib.sha256(name.encode()).hexdigest(),
            copies=copies,
            size_bytes=50 << 20,
            inputs=[_tensor("input", [-1, 16])],
            outputs=[_tensor("output", [-1, 4])],
        )
        p = _Probe(name, copies, time.monotonic())
        self.tracker.probes[name] = p
        self.tracker.live_models[name] = copies
        await self.admin().RegisterModel(mesh_pb2.RegisterModelRequest(model=spec), timeout=10.0)
        p.rpc_s = time.monotonic() - p.t_register
        self.ops += 1
        self.waiters.add(asyncio.create_task(self._await_ready(p)))
        return p

    async def _await_ready(self, p: _Probe) -> None:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(self.channels[-1])
        end = p.t_register + PROBE_TIMEOUT_S
        while time.monotonic() < end and p.model in self.tracker.live_models:
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await stub.ModelReady(
                    inference_pb2.ModelReadyRequest(name=p.model), timeout=2.0
                )
                if answer.ready:
                    p.t_ready = time.monotonic()
                    return
            await asyncio.sleep(0.02)

    async def remove(self, model: str) -> None:
        self.tracker.forget(model)
        await self.admin().RemoveModel(mesh_pb2.RemoveModelRequest(name=model), timeout=10.0)
        self.ops += 1

    async def settle_probes(self, probes: list[_Probe], timeout: float) -> None:
        await _until(lambda: all(p.t_ready is not None for p in probes), timeout)
        for p in probes:
            if p.t_ready is None:
                self.tracker.error(
                    f"{p.model}: not READY at the gateway within {timeout:.0f}s "
                    f"(decision {'seen' if p.t_decision else 'not seen'}, {len(p.loads)} loads)"
                )

    async def wait_deaths(self, deaths: list[_Death], timeout: float) -> None:
        await _until(lambda: all(d.t_replaced is not None for d in deaths), timeout)

    # one step
    async def ramp_to(self, nodes: int) -> dict[str, Any]:
        k = len(self.sims)
        for i, sim in enumerate(self.sims):
            _send(sim, cmd="target", n=(nodes - i + k - 1) // k)
        started = time.monotonic()
        limit = min(self.left() - self.reserve(), nodes / self.args.ramp_per_s * 4 + 90.0)
        while self.linked() < nodes and time.monotonic() - started < limit:
            stats = self.stats()
            if sum(int(s.get("failed", 0)) for s in stats) > nodes // 100 + 5:
                break
            await asyncio.sleep(0.25)
        await asyncio.sleep(1.1)  # a fresh stats line from every simulator
        stats = self.stats()
        return {
            "nodes": nodes,
            "connected": self.linked(),
            "failed": sum(int(s.get("failed", 0)) for s in stats),
            "connect_retries": sum(int(s.get("retries", 0)) for s in stats),
            "dropped": sum(int(s.get("dropped", 0)) for s in stats),
            "ramp_s": round(time.monotonic() - started, 1),
            "first_error": next((s["first_error"] for s in stats if s.get("first_error")), ""),
        }

    async def shrink(self, nodes: int) -> None:
        """Fewer nodes: the extra ones leave for good; then wait (bounded) for the replica's
        node records to match."""
        k = len(self.sims)
        for i, sim in enumerate(self.sims):
            _send(sim, cmd="target", n=(nodes - i + k - 1) // k)
        log(f"back to {nodes} nodes; waiting for the control plane to settle")
        await _until(lambda: self.linked() <= nodes, 30.0)
        await asyncio.sleep(min(30.0, max(0.0, self.left() - self.reserve())))

    async def base_models(self) -> None:
        """Models registered once and kept (so removing a step's probes is not a mass unload
        for the safety floor: docs/resilience.md)."""
        for _ in range(self.args.base_models):
            p = await self.register()
            self.base.add(p.model)
            self.tracker.probes.pop(p.model, None)

    def reserve(self) -> float:
        return float(self.args.churn_s) + 25.0

    async def measure_step(self, nodes: int) -> dict[str, Any]:
        a = self.args
        self.logs[0].take()
        ramp_from = self.mark()
        row = await self.ramp_to(nodes)
        row["ramp"] = self.diff(ramp_from, self.mark())
        log(f"{nodes} nodes: {row['connected']} linked in {row['ramp_s']}s, {row['failed']} failed")
        if not self.base and self.args.base_models:
            await self.base_models()
        await asyncio.sleep(a.settle)
        before = self.mark()
        await asyncio.sleep(a.window)
        row["steady"] = self.diff(before, self.mark())
        # placement latency probes, then deaths of copy holders
        before = self.mark()
        probes = []
        for i in range(a.probes):
            if i:
                await asyncio.sleep(OP_EVERY_S)
            probes.append(await self.register())
        await self.settle_probes(probes, PROBE_TIMEOUT_S)
        deaths_from = len(self.tracker.deaths)
        if a.kills:
            for sim in self.sims[: a.kills]:
                _send(sim, cmd="kill_holders", n=1)
            await asyncio.sleep(1.0)
            await self.wait_deaths(self.tracker.deaths[deaths_from:], LEASE_TTL_S + 10.0)
        deaths = self.tracker.deaths[deaths_from:]
        row["probes"] = self.diff(before, self.mark())
        row["latency_ms"] = self.tracker.latencies(probes, deaths)
        for p in probes:
            await self.remove(p.model)
        row["cp_log"] = [scan.take() for scan in self.logs]
        log(f"{nodes} nodes: {json.dumps(_brief(row))}")
        return row

    async def churn(self, nodes: int) -> dict[str, Any]:
        a = self.args
        for sim in self.sims:
            _send(sim, cmd="churn", per_min=a.leave_per_min, rejoin_s=REJOIN_S, holder_share=0.5)
        started = time.monotonic()
        self.logs[0].take()
        first = self.mark()
        probes: list[_Probe] = []
        deaths_from = len(self.tracker.deaths)
        samples: list[dict[str, Any]] = []
        last = first
        spy = self.profile()
        end = started + a.churn_s
        next_op = started
        while time.monotonic() < end and self.left() > 25.0:
            now = time.monotonic()
            if now >= next_op:
                next_op += OP_EVERY_S
                live = [m for m in self.tracker.live_models if m not in self.base]
                if len(live) < a.min_models or (
                    len(live) < a.max_models and self.rng.random() < 0.5
                ):
                    try:
                        probes.append(await self.register())
                    except grpc.aio.AioRpcError as exc:
                        self.tracker.error(f"RegisterModel: {_describe(exc)}")
                else:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await self.remove(live[0])
            if now - last.t >= 5.0:
                m = self.mark()
                sample = self.diff(last, m)
                samples.append({"cp_cores": sample["cp_cores"], "cp_rss_mb": sample["cp_rss_mb"]})
                last = m
            await asyncio.sleep(0.1)
        for sim in self.sims:
            _send(sim, cmd="churn_off")
        row = self.diff(first, self.mark())
        row["cp_log"] = [scan.take() for scan in self.logs]
        await self.settle_probes([p for p in probes if p.model in self.tracker.live_models], 10.0)
        deaths = self.tracker.deaths[deaths_from:]
        await self.wait_deaths(deaths, LEASE_TTL_S + 5.0)
        if spy is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30.0)
        stats = self.stats()
        row.update(
            {
                "nodes": nodes,
                "connected_at_end": self.linked(),
                "churn_s": round(time.monotonic() - started, 1),
                "model_ops": self.ops,
                "leaves": sum(int(s.get("left", 0)) for s in stats),
                "dropped": sum(int(s.get("dropped", 0)) for s in stats),
                "failed": sum(int(s.get("failed", 0)) for s in stats),
                "connect_retries": sum(int(s.get("retries", 0)) for s in stats),
                "cp_cores_peak_5s": max((max(s["cp_cores"]) for s in samples), default=None),
                "cp_rss_mb_peak": max((max(s["cp_rss_mb"]) for s in samples), default=None),
                "etcd_at_start": {
                    "db_mb": round(
                        first.etcd.get("etcd_mvcc_db_total_size_in_bytes", 0) / 2**20, 2
                    ),
                    "db_in_use_mb": round(
                        first.etcd.get("etcd_mvcc_db_total_size_in_use_in_bytes", 0) / 2**20, 2
                    ),
                    "revision": int(first.etcd.get("etcd_debugging_mvcc_current_revision", 0)),
                },
                "latency_ms": self.tracker.latencies(probes, deaths),
            }
        )
        log(f"churn: {json.dumps(_brief(row))}")
        return row

    def profile(self) -> subprocess.Popen[bytes] | None:
        if self.args.profile is None:
            return None
        spy = Path(sys.executable).parent / "py-spy"
        if not spy.exists():
            log("no py-spy in the venv: no profile")
            return None
        return subprocess.Popen(
            [
                str(spy),
                "record",
                "-p",
                str(self.cps[0].pid),
                "-d",
                "20",
                "--nonblocking",
                "-o",
                str(self.args.profile),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    lat = row.get("latency_ms", {})
    return {
        "cp_cores": row.get("cp_cores") or row.get("steady", {}).get("cp_cores"),
        "cp_rss_mb": row.get("cp_rss_mb") or row.get("steady", {}).get("cp_rss_mb"),
        "decision_p99": lat.get("register_to_decision", {}).get("p99"),
        "load_p99": lat.get("register_to_load_each_copy", {}).get("p99"),
        "ready_p99": lat.get("register_to_ready_gateway", {}).get("p99"),
        "replaced_p99": lat.get("death_to_replaced", {}).get("p99"),
    }


async def _soak(run: _Run) -> dict[str, Any]:
    a = run.args
    result: dict[str, Any] = {"steps": [], "churn": None, "two_replicas": None}
    stopped = ""
    run.cps.append(
        run.mesh.start_controlplane("cp-1", extra=["--metrics-listen", run.metrics_address])
    )
    run.logs.append(_LogScan(run.cps[0].log_path))
    run.channels.append(aio.insecure_channel(run.cps[0].address))
    run.watch_task = asyncio.create_task(run.watch_placements())
    run.pump_task = asyncio.create_task(run.pump())
    await asyncio.sleep(1.0)
    idle = run.mark()
    await asyncio.sleep(3.0)
    result["idle"] = run.diff(idle, run.mark())
    run.start_sims(a.sims)
    largest = healthy = 0  # nodes linked at the last step; at the last step without trouble
    for nodes in a.counts:
        need = (
            (nodes - largest) / a.ramp_per_s * 1.5
            + a.settle
            + a.window
            + a.probes * OP_EVERY_S
            + (LEASE_TTL_S + 3.0 if a.kills else 0.0)
            + 10.0
        )
        if run.left() < need + run.reserve():
            stopped = (
                f"time: {run.left():.0f}s left of --max-total-s; {nodes} nodes need "
                f"~{need:.0f}s + the churn phase"
            )
            break
        row = await run.measure_step(nodes)
        largest = row["connected"]
        result["steps"].append(row)
        trouble = _LogScan.trouble(row["cp_log"][0])
        if row["connected"] < nodes:
            stopped = f"{nodes} nodes: only {row['connected']} linked ({row['first_error']})"
        elif trouble:
            stopped = f"{nodes} nodes: the control plane logged trouble: {trouble!r}"
        if not trouble:
            healthy = row["connected"]  # a ramp cut short by time: healthy where it got to
        if stopped:
            stopped += f"; the churn runs at the last healthy count, {healthy}"
            break
        why = _saturated(row["steady"])
        if why and nodes != a.counts[-1]:
            stopped = f"{nodes} nodes: {why}; the next count would measure the machine"
            break
    if healthy and a.churn_s > 0 and run.left() > 40:
        if run.linked() > healthy:  # back to the last healthy count; let the replica recover
            await run.shrink(healthy)
            result["recovery"] = {"to_nodes": healthy, "cp_log": run.logs[0].take()}
        result["churn"] = await run.churn(healthy)
    run.stop_sims()
    if a.two_replicas and run.left() > 120:
        result["two_replicas"] = await _two_replicas(run, a.two_replicas)
    result["stopped_early"] = stopped or None
    return result


def _saturated(window: dict[str, Any]) -> str:
    """Why the machine measured in ``window`` cannot take more nodes ("" if it can)."""
    sims = window["simulators"]
    if max(window["cp_cores"]) > SATURATED:
        return f"the control plane is saturated ({window['cp_cores']} cores)"
    if max(sims["cores_each"], default=0.0) > SATURATED:
        return f"a simulator is saturated ({sims['cores_each']} cores)"
    if sims["late_ticks"] > 0.02 * sims["ticks"]:
        return f"the simulators fell behind ({sims['late_ticks']} late ticks of {sims['ticks']})"
    if window["machine_busy_cores"] > SATURATED * (os.cpu_count() or 1):
        return f"the machine is saturated ({window['machine_busy_cores']} cores busy)"
    return ""


async def _two_replicas(run: _Run, nodes: int) -> dict[str, Any]:
    await asyncio.sleep(LEASE_TTL_S + 1.0)
    run.cps.append(run.mesh.start_controlplane("cp-2"))
    run.logs.append(_LogScan(run.cps[1].log_path))
    run.channels.append(aio.insecure_channel(run.cps[1].address))
    await asyncio.sleep(2.0)
    run.start_sims(run.args.sims)
    row = await run.measure_step(nodes)
    run.stop_sims()
    row["note"] = "every node links to both replicas; cp_cores / cp_rss_mb: [cp-1, cp-2]"
    return row


def _targets(result: dict[str, Any], largest_asked: int) -> list[dict[str, Any]]:
    churn = result.get("churn")
    steps = result.get("steps") or []
    n = churn["nodes"] if churn else (steps[-1]["connected"] if steps else 0)
    at = f"at {n} nodes" + ("" if n >= 10_000 else f" (not 10,000: {largest_asked} asked)")
    out: list[dict[str, Any]] = []

    def verdict(name: str, figure: Any, met: bool | None, why: str = "") -> None:
        v = "not measured" if met is None else ("met" if met else "not met")
        if met is not None and n < 10_000:
            v += f" {at}"
        out.append(
            {"target": name, "figure": figure, "verdict": v, **({"note": why} if why else {})}
        )

    if churn is None:
        verdict("all", None, None, "no churn phase ran")
        return out
    cores, rss = churn["cp_cores"][0], churn["cp_rss_mb_peak"] or churn["cp_rss_mb"][0]
    verdict("control plane <= 1 core average through churn", cores, cores <= 1.0)
    verdict("control plane <= 300 MB RSS through churn", rss, rss <= 300.0)
    lat = churn["latency_ms"]
    passes = churn.get("scheduler_passes") or {}
    decisions = churn.get("scheduler_decisions") or {}
    dec = decisions.get("p99_le_ms")
    verdict(
        "placement decision p99 < 10 ms",
        {
            "scheduler_decisions": decisions or None,
            "scheduler_pass": passes or None,
            "register_to_decision_p99_ms": lat["register_to_decision"]["p99"],
        },
        None if not decisions.get("passes") else (dec is not None and dec <= 10.0),
        "judged on the decisions of the leader's live passes (meshserve.scheduler.decision from "
        "its --metrics-listen: autoscaler and placement of every variant over the live view of "
        "all nodes, on the leader's loop, no I/O; p99 is a histogram bucket bound: buckets at "
        "5, 10 and 20 ms). scheduler_pass is the "
        "whole pass (meshserve.scheduler.duration: plus reading the view and awaiting the etcd "
        "write of the changes, on a loop shared with 10,000 streams); register_to_decision adds "
        "the RPC, the etcd writes and the watch",
    )
    load = lat["register_to_load_each_copy"]["p99"]
    verdict(
        "register -> decision -> Load command p99 < 1 s",
        load,
        None if load is None else load < 1000.0,
    )
    rep = lat["death_to_replaced"]["p99"]
    verdict(
        f"dead node's copies re-placed within lease TTL + 1 s ({LEASE_TTL_S + 1} s)",
        rep,
        None
        if rep is None or lat["copies_lost_with_dead_nodes"] == 0
        else (rep <= (LEASE_TTL_S + 1) * 1000.0 and lat["not_replaced"] == 0),
    )
    e, changes = churn["etcd"], churn["state_changes_per_s"]
    ratio = e["revisions_per_s"] / changes if changes else None
    verdict(
        "etcd writes/s <= 2 x state changes/s",
        {
            "write_txns_per_s": e["revisions_per_s"],
            "put_delete_txn_per_s": e["writes_per_s"],
            "state_changes_per_s": changes,
            "ratio": round(ratio, 2) if ratio is not None else None,
            "ratio_put_delete_txn": round(e["writes_per_s"] / changes, 2) if changes else None,
        },
        None if ratio is None else ratio <= 2.0,
        "judged on write transactions committed (etcd revisions/s: one per write, however many "
        "keys it puts); put + delete + txn (etcd_mvcc_*_total) counts a multi-key txn's puts "
        "twice and is quoted beside it; state changes = node links made and lost + copy status "
        "reports + model registrations and removals",
    )
    start, end_mb = churn["etcd_at_start"]["db_in_use_mb"], e["db_in_use_mb"]
    verdict(
        "etcd database size bounded",
        {
            "in_use_mb_start": start,
            "in_use_mb_end": end_mb,
            "file_mb_end": e["db_mb"],
            "compact_revision": e["compact_revision"],
        },
        None
        if churn["churn_s"] < 120 or e["compact_revision"] <= 0
        else end_mb <= max(2 * start, start + 8.0),
        "bound: the leader compacts to the newest 10,000 revisions (--etcd-keep-revisions), "
        "so the in-use size (the file keeps its high-water mark until a defrag) must stay "
        "within 2x its size at the start of the churn; judged only when a compaction happened "
        "by the end of a churn of 2 min or more (before one, the history only grows)",
    )
    return out


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="meshserve-soak-") as tmp:
        with LocalMesh(Path(tmp), lease_ttl_s=LEASE_TTL_S) as mesh:
            etcd_url = mesh.start_etcd()
            log(f"etcd at {etcd_url}")
            run = _Run(mesh, args, started + args.max_total_s - 10.0)

            async def main() -> dict[str, Any]:
                try:
                    return await _soak(run)
                finally:
                    for task in (run.watch_task, run.pump_task):
                        if task is not None:
                            task.cancel()
                    for ch in run.channels:
                        await ch.close(None)

            try:
                result = asyncio.run(main())
            finally:
                run.stop_sims()
                if args.keep_logs is not None:
                    mesh.close()  # the logs are complete once every process is stopped
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    for log_file in Path(tmp).glob("*.log"):
                        shutil.copy(log_file, args.keep_logs / log_file.name)
            result["errors"] = run.tracker.errors
    result["targets"] = _targets(result, max(args.counts))
    result["config"] = {
        k: v for k, v in vars(args).items() if k not in ("simulate", "target", "offset", "stride")
    } | {
        "cpu_count": os.cpu_count(),
        "lease_ttl_s": LEASE_TTL_S,
        "load_s": LOAD_S,
        "rejoin_s": REJOIN_S,
        "heartbeat_s": HEARTBEAT_S,
    }
    result["config"]["profile"] = str(args.profile) if args.profile else None
    result["config"]["out"] = str(args.out)
    result["config"]["keep_logs"] = str(args.keep_logs) if args.keep_logs else None
    result["wall_s"] = round(time.monotonic() - started, 1)
    return {"benchmark": "scale_soak", **result}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/scale_soak.py", description=__doc__.split("\n")[0])
    p.add_argument("--counts", type=lambda s: [int(c) for c in s.split(",")], default=None)
    p.add_argument("--nodes", type=int, default=0, help="--quick: this many nodes (default 1000)")
    p.add_argument("--quick", action="store_true", help="smoke: 1,000 nodes, 30 s churn")
    p.add_argument("--sims", type=int, default=4, help="simulator processes")
    p.add_argument("--ramp-per-s", type=float, default=200.0, help="new nodes per second")
    p.add_argument("--change-share", type=float, default=0.1, help="nodes changing per second")
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--window", type=float, default=20.0, help="steady seconds measured per step")
    p.add_argument("--probes", type=int, default=5, help="models registered and timed per step")
    p.add_argument("--kills", type=int, default=2, help="copy holders killed per step")
    p.add_argument("--churn-s", type=float, default=None, help="default 300 (--quick: 30)")
    p.add_argument("--leave-per-min", type=float, default=0.01, help="share of nodes leaving")
    p.add_argument("--base-models", type=int, default=10, help="registered once, kept")
    p.add_argument("--min-models", type=int, default=10)
    p.add_argument("--max-models", type=int, default=30)
    p.add_argument("--two-replicas", type=int, default=0, help="nodes for a two-replica step")
    p.add_argument("--profile", type=Path, default=None, help="py-spy svg of cp-1 (churn, 20 s)")
    p.add_argument("--max-total-s", type=float, default=900.0)
    p.add_argument("--keep-logs", type=Path, default=None, help="copy every process's log here")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale_soak.json")
    # the simulator sub-mode
    p.add_argument("--simulate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", default="", help=argparse.SUPPRESS)
    p.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--stride", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--per-channel", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--max-pending", type=int, default=50, help=argparse.SUPPRESS)
    return p


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM: unwind through every ``finally`` (simulators, control plane and etcd stop)."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.simulate:
        return simulate_main(args)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.quick:
        args.counts = [args.nodes or 1000]
        args.window, args.settle, args.probes, args.kills = 5.0, 2.0, 3, 1
        args.churn_s = 30.0 if args.churn_s is None else args.churn_s
        args.max_total_s = min(args.max_total_s, 120.0)
        args.sims = min(args.sims, 2)
        args.min_models, args.max_models, args.base_models = 3, 8, 3
    elif args.counts is None:
        args.counts = [args.nodes] if args.nodes else [1000, 5000, 10_000]
    if args.churn_s is None:
        args.churn_s = 300.0
    emit(run_soak(args), args.out)


if __name__ == "__main__":
    main()
