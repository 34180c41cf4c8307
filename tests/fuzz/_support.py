"""Shared parts of the fuzz tests: a live mesh on its own event-loop thread, the property every
answer must meet, and the hypothesis settings (derandomized, no example database: CI replays
the same examples every run).

The mesh (real etcd, a real ControlPlane, real Nodes with real onnxruntime sessions, all on
loopback) runs on a background thread's event loop, so the hypothesis tests themselves are
plain synchronous functions calling it through ordinary blocking gRPC channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from hypothesis import HealthCheck, event, settings

from meshserve.client._admin import AdminClient
from meshserve.devtools.demo_models import make_mlp, sha256_file
from meshserve.node.runtime import resident_bytes
from tests.support.etcd import EtcdServer
from tests.support.inproc import InProcMesh, eventually, inproc_mesh

__all__ = ["FUZZ", "PRECISE", "LiveMesh", "answer", "live_mesh"]

settings.register_profile(
    "meshserve-fuzz",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=40,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: The settings of every fuzz test (a decorator; not loaded globally, so other tests keep theirs).
FUZZ = settings.get_profile("meshserve-fuzz")

#: The statuses a hostile request may get (besides OK); never INTERNAL or UNKNOWN.
PRECISE = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
CALL_TIMEOUT_S = 10.0  # every call's deadline
ANSWER_WITHIN_S = 5.0  # a hostile call must be answered this fast (no hang, no slow path)
MAX_MESSAGE = 1 << 20

T = TypeVar("T")


def answer(
    call: Callable[..., Any],
    request: Any,
    *,
    within_s: float = ANSWER_WITHIN_S,
    allowed: frozenset[grpc.StatusCode] = PRECISE,
    **kwargs: Any,
) -> tuple[grpc.StatusCode, Any]:
    """Make one blocking call with a deadline; assert the property: OK, or a precise status with
    a non-empty message, answered within ``within_s``. Returns (code, response or message)."""
    started = time.monotonic()
    try:
        result = call(request, timeout=CALL_TIMEOUT_S, **kwargs)
        code, out = grpc.StatusCode.OK, result
    except grpc.RpcError as exc:
        code, out = exc.code(), exc.details() or ""
        assert code in allowed, f"{code.name}: {out}"
        assert out.strip(), f"{code.name} with an empty message"
    elapsed = time.monotonic() - started
    with contextlib.suppress(Exception):  # outside a hypothesis test there is nothing to tell
        event(code.name)  # --hypothesis-show-statistics tells how often each status came back
    assert elapsed < within_s, f"answered after {elapsed:.1f}s ({code.name})"
    return code, out


class LiveMesh:
    """A real mesh (etcd + control plane + nodes) served from a background event loop."""

    def __init__(self, etcd: EtcdServer, loop: asyncio.AbstractEventLoop, mesh: InProcMesh) -> None:
        self.etcd = etcd
        self.loop = loop
        self.mesh = mesh
        self.model_path = Path()
        self.baseline_rss = 0

    @property
    def address(self) -> str:
        return self.mesh.address

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the mesh's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` on the mesh's loop (to read server state without racing it)."""

        async def call() -> T:
            return fn()

        return self.run(call())

    def wait_for(self, predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        return self.run(eventually(predicate, timeout=timeout, what=what), timeout + 5)

    def rss(self) -> int:
        return resident_bytes()

    def register_mlp(self, name: str, copies: int, **kwargs: Any) -> None:
        with AdminClient(self.address) as admin:
            admin.register_model(
                name,
                self.model_path.as_uri(),
                sha256_file(self.model_path),
                copies=copies,
                **kwargs,
            )
        self.wait_for(
            lambda: len(self.mesh.cp.snapshot().ready_nodes((name, "default"))) == copies,
            what=f"{name} ready on {copies} node(s)",
        )


@contextlib.contextmanager
def live_mesh(
    tmp: Path, nodes: Sequence[tuple[str, bool]], *, max_message_bytes: int = MAX_MESSAGE
) -> Iterator[LiveMesh]:
    """A started :class:`LiveMesh` with ``nodes`` ((node_id, direct) pairs) and the demo MLP
    artifact at ``.model_path`` (not registered); everything stopped and removed after."""
    etcd = EtcdServer()
    etcd.start()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-mesh", daemon=True)
    thread.start()
    context = inproc_mesh(etcd.url, tmp, nodes, max_message_bytes=max_message_bytes)
    try:
        mesh = asyncio.run_coroutine_threadsafe(context.__aenter__(), loop).result(60)
        try:
            live = LiveMesh(etcd, loop, mesh)
            live.model_path = make_mlp(tmp / "mlp.onnx")
            yield live
        finally:
            asyncio.run_coroutine_threadsafe(context.__aexit__(None, None, None), loop).result(60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        etcd.close()


def mlp_expected(model: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The demo MLP's answer for ``x``, computed here by onnxruntime directly."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out: np.ndarray[Any, Any] = session.run(["y"], {"x": x})[0]
    return out
