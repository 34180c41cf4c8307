"""Hostile model artifacts: random byte mutations of a real ONNX file (truncated, flipped,
spliced, replaced), a model with an op no runtime has, a wrong sha256, not ONNX at all. A copy
either goes FAILED with a clear reason and is never served, or (a mutation that is still a
valid model) loads and answers queries with OK or a precise status; the other copies keep
serving.

Real parts in process: the node's own :class:`ModelStore` (fetch + sha256), :class:`CopyManager`
(onnxruntime sessions on worker threads) and :class:`InferenceHandler`; one event loop per
example, every wait bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import itertools
from pathlib import Path

import grpc
import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from meshserve.common.codec import build_request
from meshserve.common.errors import StatusError
from meshserve.devtools.demo_models import make_mlp
from meshserve.node.copies import CopyManager
from meshserve.node.service import InferenceHandler
from meshserve.node.store import ModelStore
from meshserve.protos import mesh_pb2
from tests.fuzz._support import FUZZ

CLEAR_REASONS = ("not a loadable ONNX model", "sha256 mismatch", "which meshserve cannot serve")
_names = itertools.count(1)


@st.composite
def mutations(draw: st.DrawFn) -> list[tuple[str, int, bytes]]:
    """Edits of the artifact: (how, where in [0, 1) x 2**20, bytes)."""
    how = st.sampled_from(["truncate", "flip", "splice", "replace"])
    at = st.integers(0, 2**20 - 1)
    return draw(
        st.lists(st.tuples(how, at, st.binary(min_size=1, max_size=16)), min_size=1, max_size=3)
    )


def _mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for how, where, blob in edits:
        at = where * len(out) >> 20 if out else 0
        if how == "truncate":
            del out[at:]
        elif how == "flip" and out:
            for i, b in enumerate(blob):
                out[(at + i) % len(out)] ^= b or 1
        elif how == "splice":
            out[at:at] = blob
        else:
            out = bytearray(blob * 64)
    return bytes(out)


def _unsupported_op_model(path: Path) -> Path:
    node = helper.make_node("FuzzOp", ["x"], ["y"], domain="meshserve.fuzz")
    graph = helper.make_graph(
        [node],
        "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("meshserve.fuzz", 1)],
    )
    onnx.save(model, str(path))
    return path


class _Node:
    """The serving parts of one node, without its links: store, copies, handler."""

    def __init__(self, root: Path) -> None:
        self.executor = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="fuzz-ort")
        self.copies = CopyManager(ModelStore(root / "cache"), self.executor)
        self.handler = InferenceHandler("fuzz-node", self.copies)

    async def load(self, name: str, path: Path, sha256: str) -> mesh_pb2.CopyStatus:
        self.copies.load(
            mesh_pb2.LoadModel(model=name, variant="v", artifact_uri=path.as_uri(), sha256=sha256)
        )
        for _ in range(600):  # 60 s at most
            for entry in self.copies.entries():
                if entry.model == name and entry.state in (mesh_pb2.READY, mesh_pb2.FAILED):
                    return entry.status()
            await asyncio.sleep(0.1)
        raise AssertionError(f"{name} neither READY nor FAILED after 60 s")

    async def ask(self, name: str) -> grpc.StatusCode:
        request = build_request(name, {"x": np.zeros((2, 64), np.float32)})
        try:
            await asyncio.wait_for(self.handler.infer(request, None, hop="fuzz"), 30)
        except StatusError as exc:
            assert exc.message, exc
            return exc.code
        return grpc.StatusCode.OK

    async def close(self) -> None:
        await self.copies.close()
        self.executor.shutdown(wait=True)


async def _check(node: _Node, path: Path, sha256: str, *, must_fail: bool) -> str:
    """Load ``path`` as a new model; check the outcome; return its state name."""
    name = f"art-{next(_names)}"
    status = await node.load(name, path, sha256)
    code = await node.ask(name)
    if status.state == mesh_pb2.FAILED:
        assert any(r in status.reason for r in CLEAR_REASONS), status.reason
        assert code == grpc.StatusCode.UNAVAILABLE, code  # never served
    else:
        assert not must_fail, f"{name} loaded: {status}"
        assert code in PRECISE, code
    await node.copies.unload(name, "v")
    return str(mesh_pb2.CopyState.Name(status.state))


PRECISE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE}


def test_mutated_artifacts_fail_clearly_or_serve_soundly(tmp_path: Path) -> None:
    original = make_mlp(tmp_path / "mlp.onnx", hidden=(16,)).read_bytes()
    outcomes: list[str] = []

    @settings(FUZZ, max_examples=25)
    @given(edits=mutations())
    def check(edits: list[tuple[str, int, bytes]]) -> None:
        data = _mutate(original, edits)
        digest = hashlib.sha256(data).hexdigest()
        path = tmp_path / f"mutant-{digest[:12]}.onnx"
        path.write_bytes(data)

        async def run() -> None:
            node = _Node(tmp_path / digest[:12])
            try:  # its own sha256: the bytes reach onnxruntime
                outcomes.append(await _check(node, path, digest, must_fail=False))
            finally:
                await node.close()

        asyncio.run(run())

    check()
    assert "FAILED" in outcomes, outcomes  # the mutations did reach the loader


def test_unsupported_op_wrong_sha256_and_not_onnx_fail_with_a_reason(tmp_path: Path) -> None:
    model = make_mlp(tmp_path / "mlp.onnx", hidden=(16,))
    custom = _unsupported_op_model(tmp_path / "custom-op.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model" * 100)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model.read_bytes()[: model.stat().st_size // 2])

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    async def run() -> None:
        node = _Node(tmp_path / "node")
        try:
            for path, digest in (
                (custom, sha(custom)),
                (model, "0" * 64),
                (junk, sha(junk)),
                (truncated, sha(truncated)),
            ):
                assert await _check(node, path, digest, must_fail=True) == "FAILED"
            assert await _check(node, model, sha(model), must_fail=False) == "READY"
        finally:
            await node.close()

    asyncio.run(run())
