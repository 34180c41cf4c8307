"""Hostile queries cost the servers a bounded amount, with real processes (etcd, a control plane
with its gateway, a node with its own port, real ONNX files).

- A thousand failed queries naming unique long models and versions, to the gateway and to the
  node's port, leave each process's resident memory and its request-metrics table bounded: the
  table records resolved names only (unknown -> ``(unknown)``), and holds a bounded number of rows.
- A 57 MiB request of 10 M two-byte BYTES elements for an FP32 model is refused from its header
  (INVALID_ARGUMENT) without decoding it, directly and through the gateway, and a query naming
  11 M preferred variants is answered without looking them up: the node's own ServerLive keeps
  answering while such requests are in flight (before, each froze it ~6 s here, 17 s in the
  review).
- With API keys on, the gateway's per-client admission counts per tenant: a caller rotating
  ``x-client-id`` on each query is still refused (RESOURCE_EXHAUSTED) past the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from meshserve.client._admin import AdminClient
from meshserve.common.codec import build_request
from meshserve.devtools.demo_models import make_mlp
from meshserve.devtools.local import LocalMesh, free_port, wait_until
from meshserve.protos import inference_pb2, inference_pb2_grpc
from tests.support.mesh import register_file, wait_copies

HOSTILE = 1000  # queries per target
LABEL_BYTES = 64 << 10  # each model name and version: 64 KiB (a request stays ~130 KiB)
RSS_BOUND = 100 << 20  # growth allowed per process (the table alone grew ~128 MiB before)
ROWS_BOUND = 64  # label sets a metrics endpoint may show after the hostile queries
CONCURRENCY = 8


def _rss(pid: int) -> int:
    """The resident memory of process ``pid`` in bytes (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no VmRSS for {pid}")


def _request_rows(port: int) -> list[dict[str, str]]:
    """The label sets of ``meshserve_requests_total`` at http://127.0.0.1:<port>/metrics."""
    url = f"http://127.0.0.1:{port}/metrics"
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return [
        dict(s.labels)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "meshserve_requests_total"
    ]


def _direct_address(admin: AdminClient) -> str:
    """The direct address of the mesh's node, once it has reported one."""

    def found() -> str:
        return next((n.direct_address for n in admin.list_nodes() if n.direct_address), "")

    return str(wait_until(found, 30, what="the node's direct address"))


def _hostile(i: int, x: np.ndarray) -> inference_pb2.ModelInferRequest:
    """Query ``i``: an unknown model (even i) or the known ``mlp`` at an unknown version (odd
    i), each name unique and :data:`LABEL_BYTES` long."""
    tag = f"{i:06d}"
    long = (tag * (LABEL_BYTES // len(tag) + 1))[:LABEL_BYTES]
    model = f"m{long}"[:LABEL_BYTES] if i % 2 == 0 else "mlp"
    request = build_request(model, {"x": x})
    request.model_version = f"v{long}"[:LABEL_BYTES]
    return request


async def _send_hostile(target: str, x: np.ndarray) -> dict[grpc.StatusCode, int]:
    """Send :data:`HOSTILE` hostile queries to ``target``, :data:`CONCURRENCY` at a time;
    the status codes they got (each must fail)."""
    codes: dict[grpc.StatusCode, int] = {}
    async with aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        queue = iter(range(HOSTILE))

        async def worker() -> None:
            for i in queue:
                try:
                    await stub.ModelInfer(_hostile(i, x), timeout=30)
                except aio.AioRpcError as exc:
                    codes[exc.code()] = codes.get(exc.code(), 0) + 1
                else:
                    raise AssertionError(f"hostile query {i} was answered")

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return codes


def test_failed_queries_with_unique_long_names_leave_memory_bounded(tmp_path: Path) -> None:
    cp_metrics, node_metrics = free_port(), free_port()
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=["--metrics-listen", f"127.0.0.1:{cp_metrics}"])
        node = mesh.start_node(
            "n1",
            [cp.address],
            direct=True,
            extra=["--metrics-listen", f"127.0.0.1:{node_metrics}"],
        )
        with AdminClient(cp.address) as admin:
            register_file(admin, "mlp", make_mlp(tmp_path / "mlp.onnx"))
            wait_copies(admin, "mlp", 1)
            direct = _direct_address(admin)
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        # Warm both paths (channels, first-call allocations) before measuring.
        asyncio.run(_send_warmup([cp.address, direct], x))
        before = {"gateway": _rss(cp.pid), "node": _rss(node.pid)}
        for target in (cp.address, direct):
            codes = asyncio.run(_send_hostile(target, x))
            assert sum(codes.values()) == HOSTILE, codes
            # precise, and short enough for a client's default 8 KiB trailer limit
            assert set(codes) == {grpc.StatusCode.NOT_FOUND}, codes
        after = {"gateway": _rss(cp.pid), "node": _rss(node.pid)}
        cp_rows, node_rows = _request_rows(cp_metrics), _request_rows(node_metrics)
        assert cp.alive() and node.alive()

    growth_mib = {k: (after[k] - before[k]) >> 20 for k in before}
    assert max(growth_mib.values()) < RSS_BOUND >> 20, f"RSS growth (MiB): {growth_mib}"
    # Plain numbers and short texts only below: the rows would hold 64 KiB labels on failure.
    sizes = (len(cp_rows), len(node_rows))
    assert max(sizes) <= ROWS_BOUND, f"label sets (gateway, node): {sizes}"
    longest = max(len(v) for row in (*cp_rows, *node_rows) for v in row.values())
    assert longest <= 64, f"a label {longest} characters long: a client's string"
    models = {r["model"] for r in (*cp_rows, *node_rows) if r["hop"] in ("gateway", "node")}
    assert models <= {"mlp", "(unknown)"}, sorted(m[:20] for m in models)


async def _send_warmup(targets: list[str], x: np.ndarray) -> None:
    """A few failed queries to each target, so first-use allocations are not counted."""
    for target in targets:
        async with aio.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            for name in ("no-such-model", "mlp"):
                request = build_request(name, {"x": x})
                request.model_version = "no-such-version"
                try:
                    await stub.ModelInfer(request, timeout=30)
                except aio.AioRpcError:
                    pass


BIG_ELEMENTS = 10_000_000  # two-byte BYTES elements: 57 MiB of raw contents
LIVE_DEADLINE_S = 5.0  # each ServerLive probe's deadline (two queued requests froze it ~12 s)


def _big_bytes_request() -> inference_pb2.ModelInferRequest:
    """10 M BYTES elements shaped like ``mlp``'s FP32 input ([-1, 64]): only the datatype is
    wrong, and only decoding the contents would find anything else."""
    request = inference_pb2.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="x", datatype="BYTES")
    tensor.shape.extend([BIG_ELEMENTS // 64, 64])
    request.raw_input_contents.append((struct.pack("<I", 2) + b"ab") * BIG_ELEMENTS)
    return request


PREFER_NAMES = 11_000_000  # "ab," x 11 M: a 32 MiB meshserve_prefer parameter


def _prefer_bomb() -> inference_pb2.ModelInferRequest:
    """A valid query for ``mlp`` whose ``meshserve_prefer`` names 11 M variants."""
    request = build_request("mlp", {"x": np.zeros((1, 64), np.float32)})
    request.parameters["meshserve_prefer"].string_param = "ab," * PREFER_NAMES
    return request


async def _hostile_while_probing(
    targets: list[str], requests: list[inference_pb2.ModelInferRequest], node_address: str
) -> list[str]:
    """Send each of ``requests`` to each of ``targets`` (twice, all at once) while probing the
    node's ServerLive until they are all answered; returns how each went (status names, in
    the order target, request, repeat)."""
    options = [("grpc.max_send_message_length", 128 << 20)]
    outcomes: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        stubs = []
        for target in targets:
            channel = await stack.enter_async_context(aio.insecure_channel(target, options))
            stubs.append(inference_pb2_grpc.GRPCInferenceServiceStub(channel))
        probe_channel = await stack.enter_async_context(aio.insecure_channel(node_address))
        probe = inference_pb2_grpc.GRPCInferenceServiceStub(probe_channel)
        await probe.ServerLive(inference_pb2.ServerLiveRequest(), timeout=LIVE_DEADLINE_S)

        async def hostile(
            stub: inference_pb2_grpc.GRPCInferenceServiceStub,
            request: inference_pb2.ModelInferRequest,
        ) -> str:
            try:
                await stub.ModelInfer(request, timeout=120)
            except aio.AioRpcError as exc:
                return f"{exc.code().name}: {(exc.details() or '')[:120]}"
            return "OK"

        calls = [
            asyncio.ensure_future(hostile(stub, request))
            for stub in stubs
            for request in requests
            for _ in range(2)
        ]
        probes = 0
        while not all(call.done() for call in calls) and probes < 600:  # bounded: ~10 min
            live = await probe.ServerLive(
                inference_pb2.ServerLiveRequest(), timeout=LIVE_DEADLINE_S
            )
            assert live.live
            probes += 1
            await asyncio.sleep(0.05)
        outcomes = list(await asyncio.gather(*calls))
    return outcomes


def test_huge_requests_do_not_stall_the_node(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        node = mesh.start_node("n1", [cp.address], direct=True)
        with AdminClient(cp.address) as admin:
            register_file(admin, "mlp", make_mlp(tmp_path / "mlp.onnx"))
            wait_copies(admin, "mlp", 1)
            direct = _direct_address(admin)
        requests = [_big_bytes_request(), _prefer_bomb()]
        outcomes = asyncio.run(_hostile_while_probing([direct, cp.address], requests, direct))
        x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
        with grpc.insecure_channel(direct) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(build_request("mlp", {"x": x}), timeout=30)  # still serving
        assert node.alive()

    assert len(outcomes) == 8
    for big in outcomes[0:2] + outcomes[4:6]:
        assert big.startswith("INVALID_ARGUMENT: input 'x' has datatype BYTES"), big
    assert outcomes[2:4] + outcomes[6:8] == ["OK"] * 4, "a long prefer list is simply ignored"


PER_CLIENT = 2  # the gateway's --max-in-flight-per-client in the tenant test
HELD_MS = 3000  # the node's --fault-delay-ms: queries stay in flight while the others arrive


async def _rotating_ids(address: str, key: str, count: int) -> list[str]:
    """``count`` queries at once with API key ``key``, each with its own ``x-client-id``; the
    status name each got."""
    x = np.zeros((1, 64), np.float32)

    async def one(stub: inference_pb2_grpc.GRPCInferenceServiceStub, i: int) -> str:
        metadata = (("x-api-key", key), ("x-client-id", f"rotated-{i}"))
        try:
            await stub.ModelInfer(build_request("mlp", {"x": x}), metadata=metadata, timeout=60)
        except aio.AioRpcError as exc:
            return exc.code().name
        return "OK"

    async with aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        return list(await asyncio.gather(*(one(stub, i) for i in range(count))))


def test_rotating_client_ids_does_not_evade_the_per_tenant_limit(tmp_path: Path) -> None:
    key = "k-" + "7" * 40
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"tenants:\n  - {{name: acme, keys: [{key}], models: [mlp]}}\n")
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane(
            "cp-1",
            extra=[
                "--api-keys-file",
                str(keys),
                "--max-in-flight-per-client",
                str(PER_CLIENT),
            ],
        )
        mesh.start_node("n1", [cp.address], extra=["--fault-delay-ms", str(HELD_MS)])
        with AdminClient(cp.address) as admin:
            register_file(admin, "mlp", make_mlp(tmp_path / "mlp.onnx"))
            wait_copies(admin, "mlp", 1)
        outcomes = asyncio.run(_rotating_ids(cp.address, key, 3 * PER_CLIENT))

    assert outcomes.count("RESOURCE_EXHAUSTED") >= PER_CLIENT, outcomes
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
