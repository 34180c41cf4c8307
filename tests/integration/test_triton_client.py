"""An unmodified tritonclient talks to the gateway; answers equal in-process onnxruntime's.

Real etcd, a real control-plane process and two real node processes on loopback: ``edge-1`` has
no inbound port (its queries are tunneled down its own stream), ``core-1`` serves OIP directly.
Node selectors pin each model to one of them so both paths are exercised deterministically.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from meshserve.client._admin import AdminClient
from meshserve.devtools.demo_models import make_int_model, make_mlp, reference_outputs
from meshserve.devtools.local import LocalMesh, ManagedProcess
from tests.support.mesh import register_file, wait_copies

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, ManagedProcess]]:
    work = tmp_path_factory.mktemp("mesh")
    with LocalMesh(work) as local:
        local.start_etcd()
        cp = local.start_controlplane("cp-1")
        local.start_node("edge-1", [cp.address], labels={"tier": "edge", "zone": "b"})
        local.start_node("core-1", [cp.address], labels={"tier": "core", "zone": "a"}, direct=True)
        models = work / "models"
        with AdminClient(cp.address) as admin:
            for tier in ("edge", "core"):
                register_file(
                    admin, f"mlp-{tier}", make_mlp(models / "mlp.onnx"), selector={"tier": tier}
                )
                register_file(
                    admin,
                    f"int-{tier}",
                    make_int_model(models / "int.onnx"),
                    selector={"tier": tier},
                )
            for name in ("mlp-edge", "mlp-core", "int-edge", "int-core"):
                wait_copies(admin, name, 1)
        yield local, cp


def _probe(
    target: str, model: str, inputs: dict[str, np.ndarray], tmp: Path, *, stream: bool = False
) -> tuple[dict, dict]:
    np.savez(tmp / "in.npz", **inputs)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.triton_probe",
            *(["--stream"] if stream else []),
            target,
            model,
            str(tmp / "in.npz"),
            str(tmp / "out.npz"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, dict(np.load(tmp / "out.npz"))


@pytest.mark.parametrize(
    ("tier", "node"),
    [("edge", "edge-1"), ("core", "core-1")],
    ids=["tunnel-to-edge-node", "direct-to-core-node"],
)
def test_tritonclient_fp32_mlp(
    mesh: tuple[LocalMesh, ManagedProcess], tmp_path: Path, tier: str, node: str
) -> None:
    _, cp = mesh
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    report, outputs = _probe(cp.address, f"mlp-{tier}", {"x": x}, tmp_path)
    assert report["live"] is True
    assert report["ready"] is True
    assert report["repository_index"] == "StatusCode.UNIMPLEMENTED"
    meta = report["metadata"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert meta["outputs"][0]["name"] == "y"
    assert report["parameters"]["meshserve_node"] == node
    expected = reference_outputs(mesh[0].workdir / "models" / "mlp.onnx", {"x": x})
    np.testing.assert_allclose(outputs["y"], expected["y"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("tier", "node"),
    [("edge", "edge-1"), ("core", "core-1")],
    ids=["tunnel-to-edge-node", "direct-to-core-node"],
)
def test_tritonclient_int64_model(
    mesh: tuple[LocalMesh, ManagedProcess], tmp_path: Path, tier: str, node: str
) -> None:
    _, cp = mesh
    k = np.array([[1, -2, 3, 2**40], [0, 7, -9, 11]], dtype=np.int64)
    report, outputs = _probe(cp.address, f"int-{tier}", {"k": k}, tmp_path)
    assert report["parameters"]["meshserve_node"] == node
    assert {o["datatype"] for o in report["metadata"]["outputs"]} == {"INT64", "FP32"}
    np.testing.assert_array_equal(outputs["doubled"], k * 2 + 1)
    np.testing.assert_array_equal(outputs["as_float"], k.astype(np.float32) * 0.5)
    expected = reference_outputs(mesh[0].workdir / "models" / "int.onnx", {"k": k})
    np.testing.assert_array_equal(outputs["doubled"], expected["doubled"])


@pytest.mark.parametrize(
    ("tier", "node"),
    [("edge", "edge-1"), ("core", "core-1")],
    ids=["tunnel-to-edge-node", "direct-to-core-node"],
)
def test_tritonclient_streaming_returns_every_answer_with_its_id(
    mesh: tuple[LocalMesh, ManagedProcess], tmp_path: Path, tier: str, node: str
) -> None:
    _, cp = mesh
    x = np.random.default_rng(5).standard_normal((12, 64)).astype(np.float32)
    report, outputs = _probe(cp.address, f"mlp-{tier}", {"x": x}, tmp_path, stream=True)
    assert report["errors"] == []
    assert sorted(report["order"]) == sorted(f"row-{i}" for i in range(12))
    expected = reference_outputs(mesh[0].workdir / "models" / "mlp.onnx", {"x": x})["y"]
    for i in range(12):
        np.testing.assert_allclose(outputs[f"row-{i}/y"], expected[i : i + 1], rtol=1e-5, atol=1e-5)
