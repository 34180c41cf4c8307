"""protos/inference.proto must be wire-compatible with Triton's grpc_service.proto.

Both files define package ``inference``, and protobuf's default descriptor pool refuses
duplicate symbols, so their descriptors cannot be loaded into one process (nor into this test
process, which other tests may share with ``meshserve.protos.inference_pb2``). Each side is
therefore
dumped to JSON by tests/support/dump_descriptors.py in its own subprocess and compared here.

Rules: every message defined in our file (nested messages and map entries included) exists in
Triton's with the same fields (number, name, type, repeated-ness, message/enum type, oneof);
Triton may have extra fields and messages. Every method of our service exists in Triton's with
the same request/response types and streaming flags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE = "inference.GRPCInferenceService"
OURS = "meshserve.protos.inference_pb2"
TRITON = "tritonclient.grpc.service_pb2"
MUST_COMPARE = {
    "inference.ModelInferRequest",
    "inference.ModelInferResponse",
    "inference.InferTensorContents",
    "inference.InferParameter",
    "inference.ModelMetadataResponse",
}
# Field attributes that change the wire format or the generated API. ("packed" is left out:
# parsers accept packed and unpacked repeated scalars alike.)
FIELD_KEYS = ("name", "type", "repeated", "required", "message_type", "enum_type", "oneof")


def _dump(module: str, messages: list[str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tests.support.dump_descriptors", module, "--service", SERVICE]
    if messages is not None:
        cmd += ["--messages", ",".join(messages)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"dumping {module} failed:\n{proc.stderr}"
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


@pytest.fixture(scope="module")
def dumps() -> tuple[dict[str, Any], dict[str, Any]]:
    ours = _dump(OURS)
    assert "import_error" not in ours, ours.get("import_error")
    theirs = _dump(TRITON, sorted(ours["messages"]))
    if "import_error" in theirs:
        pytest.skip(f"tritonclient is not importable: {theirs['import_error']}")
    return ours, theirs


def _compare_messages(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[list[str], set[str]]:
    problems: list[str] = []
    compared: set[str] = set()
    for name, mine in sorted(ours["messages"].items()):
        other = theirs["messages"].get(name)
        if other is None:
            problems.append(f"message {name}: not defined by Triton")
            continue
        if mine["map_entry"] != other["map_entry"]:
            problems.append(
                f"message {name}: map_entry {mine['map_entry']} != {other['map_entry']}"
            )
        by_number = {f["number"]: f for f in other["fields"]}
        by_name = {f["name"]: f for f in other["fields"]}
        for f in mine["fields"]:
            where = f"{name}.{f['name']} (= {f['number']})"
            tf = by_number.get(f["number"])
            if tf is None:
                hint = by_name.get(f["name"])
                extra = f"; Triton has {f['name']} = {hint['number']}" if hint else ""
                problems.append(f"field {where}: number not used by Triton{extra}")
                continue
            for key in FIELD_KEYS:
                if f[key] != tf[key]:
                    problems.append(f"field {where}: {key} ours={f[key]!r} triton={tf[key]!r}")
        compared.add(name)
    return problems, compared


def test_dumps_cover_our_file(dumps: tuple[dict[str, Any], dict[str, Any]]) -> None:
    ours, _ = dumps
    assert ours["file"] == "protos/inference.proto"
    assert not ours["missing"]
    assert set(ours["defined"]) <= set(ours["messages"])
    assert MUST_COMPARE <= set(ours["defined"])
    assert ours["service"] is not None and ours["service"]["methods"]


def test_messages_wire_compatible(dumps: tuple[dict[str, Any], dict[str, Any]]) -> None:
    ours, theirs = dumps
    problems, compared = _compare_messages(ours, theirs)
    assert not problems, "incompatible with Triton's grpc_service.proto:\n" + "\n".join(problems)
    assert compared >= set(ours["defined"])
    missing = MUST_COMPARE - compared
    assert not missing, f"not compared: {sorted(missing)}"
    # Map entries came along (parameters maps), so nested types really were walked.
    assert "inference.ModelInferRequest.InferInputTensor.ParametersEntry" in compared


def test_service_wire_compatible(dumps: tuple[dict[str, Any], dict[str, Any]]) -> None:
    ours, theirs = dumps
    assert ours["service"] is not None
    assert theirs["service"] is not None, f"Triton defines no {SERVICE}"
    problems: list[str] = []
    their_methods = theirs["service"]["methods"]
    for name, m in sorted(ours["service"]["methods"].items()):
        t = their_methods.get(name)
        if t is None:
            problems.append(f"rpc {name}: not defined by Triton")
            continue
        for key in ("input_type", "output_type", "client_streaming", "server_streaming"):
            if m[key] != t[key]:
                problems.append(f"rpc {name}: {key} ours={m[key]!r} triton={t[key]!r}")
    assert not problems, "incompatible with Triton's service:\n" + "\n".join(problems)
    assert {"ModelInfer", "ModelMetadata", "ModelStreamInfer"} <= set(ours["service"]["methods"])


def test_comparison_detects_differences(dumps: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """The comparison itself flags a renumbered field, a changed type and a missing message."""
    ours, theirs = dumps
    mutated = json.loads(json.dumps(ours))
    params = mutated["messages"]["inference.InferParameter"]["fields"]
    params[0]["number"] = 99
    params[1]["type"] = "TYPE_INT32"
    mutated["messages"]["inference.NotInTriton"] = {"map_entry": False, "fields": []}
    problems, _ = _compare_messages(mutated, theirs)
    text = "\n".join(problems)
    assert "InferParameter.bool_param (= 99)" in text
    assert "InferParameter.int64_param (= 2): type" in text
    assert "inference.NotInTriton: not defined by Triton" in text
