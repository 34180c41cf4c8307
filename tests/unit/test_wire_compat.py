"""protos/inference.proto must be wire-compatible with Triton's grpc_service.proto, and must
live beside it in one process.

Our OIP messages are declared in the private proto package ``meshserve.inference``, so they never
clash with tritonclient's ``inference.*`` in protobuf's default descriptor pool, and both
generated modules are imported here, in the test process. The protobuf wire format carries field
numbers and types, never package names; a gRPC call carries the method path, which our generated
gRPC module keeps at the standard ``/inference.GRPCInferenceService/<Method>``.

Rules: every message defined in our file (nested messages and map entries included), read with
``meshserve.inference.X`` taken as ``inference.X``, exists in Triton's with the same fields
(number, name, type, repeated-ness, message/enum type, oneof); Triton may have extra fields and
messages. Triton's model configuration messages (``ModelConfig``, ``ModelInput``, ``DataType``...)
live in its model_config.proto, in the same ``inference`` package, so they are looked up in the
same pool. Every enum of ours has Triton's values (name and number).

Every method of our service exists in Triton's with the same request/response types and
streaming flags, and our stubs and servicer registration use the standard method paths.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import (  # type: ignore[import-untyped]
    Descriptor,
    FieldDescriptor,
    FileDescriptor,
    ServiceDescriptor,
)

# A dev dependency: imported, not skipped, since living beside it is what is tested here.
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.grpc import service_pb2_grpc as triton_pb2_grpc

from meshserve.protos import inference_pb2, inference_pb2_grpc, mesh_pb2
from tests.support.fresh import run_fresh

OUR_PACKAGE = "meshserve.inference."
WIRE_PACKAGE = "inference."
SERVICE = "GRPCInferenceService"
WIRE_SERVICE = "inference.GRPCInferenceService"
MUST_COMPARE = {
    "inference.ModelInferRequest",
    "inference.ModelInferResponse",
    "inference.InferTensorContents",
    "inference.InferParameter",
    "inference.ModelMetadataResponse",
    "inference.ModelConfigRequest",
    "inference.ModelConfigResponse",
    "inference.ModelConfig",
    "inference.ModelInput",
    "inference.ModelOutput",
    "inference.RepositoryIndexRequest",
    "inference.RepositoryIndexResponse",
    "inference.RepositoryIndexResponse.ModelIndex",
}
#: Triton's files our messages stand for (the OIP service; the model configuration).
TRITON_FILES = {"grpc_service.proto", "model_config.proto"}
# Field attributes that change the wire format or the generated API. ("packed" is left out:
# parsers accept packed and unpacked repeated scalars alike.)
FIELD_KEYS = ("name", "type", "repeated", "required", "message_type", "enum_type", "oneof")

_TYPE_NAMES: dict[int, str] = {
    getattr(FieldDescriptor, n): n for n in dir(FieldDescriptor) if n.startswith("TYPE_")
}

Described = dict[str, Any]


# -- descriptors as plain data -------------------------------------------------------------------


def _wire_name(full_name: str) -> str:
    """Our ``meshserve.inference.X`` as Triton names it (``inference.X``); others unchanged."""
    if full_name.startswith(OUR_PACKAGE):
        return WIRE_PACKAGE + full_name[len(OUR_PACKAGE) :]
    return full_name


def _walk_file(fd: FileDescriptor) -> list[Descriptor]:
    """Every message defined in ``fd``, nested ones (map entries included) too."""
    out: list[Descriptor] = []

    def visit(d: Descriptor) -> None:
        out.append(d)
        for n in d.nested_types:
            visit(n)

    for d in fd.message_types_by_name.values():
        visit(d)
    return out


def _field(f: FieldDescriptor) -> Described:
    return {
        "name": f.name,
        "number": f.number,
        "type": _TYPE_NAMES.get(f.type, str(f.type)),
        "repeated": bool(f.is_repeated),
        "required": bool(f.is_required),
        "message_type": _wire_name(f.message_type.full_name) if f.message_type else None,
        "enum_type": _wire_name(f.enum_type.full_name) if f.enum_type else None,
        "oneof": f.containing_oneof.name if f.containing_oneof is not None else None,
    }


def _message(d: Descriptor) -> Described:
    return {
        "map_entry": bool(d.GetOptions().map_entry),
        "fields": [_field(f) for f in sorted(d.fields, key=lambda f: f.number)],
    }


def _messages(pool: Any, names: list[str]) -> tuple[dict[str, Described], list[str]]:
    """``names`` (wire names) and, recursively, their nested and field message types, looked up
    in Triton's pool; returns (described by wire name, names the pool does not know)."""
    found: dict[str, Described] = {}
    missing: list[str] = []
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in found or name in missing:
            continue
        try:
            d = pool.FindMessageTypeByName(name)
        except KeyError:
            missing.append(name)
            continue
        found[name] = _message(d)
        todo.extend(n.full_name for n in d.nested_types)
        todo.extend(f.message_type.full_name for f in d.fields if f.message_type is not None)
    return found, sorted(missing)


def _service(sd: ServiceDescriptor) -> dict[str, Described]:
    return {
        m.name: {
            "input_type": _wire_name(m.input_type.full_name),
            "output_type": _wire_name(m.output_type.full_name),
            "client_streaming": bool(m.client_streaming),
            "server_streaming": bool(m.server_streaming),
        }
        for m in sd.methods
    }


def _ours() -> Described:
    fd: FileDescriptor = inference_pb2.DESCRIPTOR
    return {
        "messages": {_wire_name(d.full_name): _message(d) for d in _walk_file(fd)},
        "service": _service(fd.services_by_name[SERVICE]),
    }


def _theirs(names: list[str]) -> Described:
    fd: FileDescriptor = triton_pb2.DESCRIPTOR
    messages, missing = _messages(fd.pool, names)
    return {
        "messages": messages,
        "missing": missing,
        "service": _service(fd.services_by_name[SERVICE]),
    }


@pytest.fixture(scope="module")
def described() -> tuple[Described, Described]:
    ours = _ours()
    return ours, _theirs(sorted(ours["messages"]))


def _compare_messages(ours: Described, theirs: Described) -> tuple[list[str], set[str]]:
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


def _compare_services(ours: Described, theirs: Described) -> list[str]:
    problems: list[str] = []
    for name, m in sorted(ours["service"].items()):
        t = theirs["service"].get(name)
        if t is None:
            problems.append(f"rpc {name}: not defined by Triton")
            continue
        for key in ("input_type", "output_type", "client_streaming", "server_streaming"):
            if m[key] != t[key]:
                problems.append(f"rpc {name}: {key} ours={m[key]!r} triton={t[key]!r}")
    return problems


# -- the descriptors -----------------------------------------------------------------------------


def test_both_files_share_the_default_pool() -> None:
    """The point of the private package: both are in the one default pool, side by side."""
    pool = descriptor_pool.Default()
    assert inference_pb2.DESCRIPTOR.pool is pool
    assert triton_pb2.DESCRIPTOR.pool is pool
    assert inference_pb2.DESCRIPTOR.package == "meshserve.inference"
    assert triton_pb2.DESCRIPTOR.package == "inference"
    ours = pool.FindMessageTypeByName("meshserve.inference.ModelInferRequest")
    theirs = pool.FindMessageTypeByName("inference.ModelInferRequest")
    assert ours.file.name == "meshserve/protos/inference.proto"
    assert theirs.file.name == "grpc_service.proto"


def test_no_symbol_of_ours_uses_tritons_package() -> None:
    """Nothing of ours (messages, nested ones, enums, services of both our files) is registered
    under a full name in ``inference.``, where it would clash with tritonclient's."""
    names: list[str] = []
    for fd in (inference_pb2.DESCRIPTOR, mesh_pb2.DESCRIPTOR):
        assert fd.package.startswith("meshserve."), fd.name
        names += [d.full_name for d in _walk_file(fd)]
        names += [e.full_name for e in fd.enum_types_by_name.values()]
        names += [e.full_name for d in _walk_file(fd) for e in d.enum_types]
        names += [s.full_name for s in fd.services_by_name.values()]
    assert len(names) > 50  # the walk really covered both files
    clashing = [n for n in names if n.startswith(WIRE_PACKAGE)]
    assert not clashing, f"registered in Triton's package: {clashing}"
    # And each `inference.X` our messages stand for resolves to Triton's definition.
    pool = descriptor_pool.Default()
    for d in _walk_file(inference_pb2.DESCRIPTOR):
        assert pool.FindMessageTypeByName(_wire_name(d.full_name)).file.name in TRITON_FILES
    for e in inference_pb2.DESCRIPTOR.enum_types_by_name.values():
        assert pool.FindEnumTypeByName(_wire_name(e.full_name)).file.name in TRITON_FILES


def test_description_covers_our_file(described: tuple[Described, Described]) -> None:
    ours, theirs = described
    defined = {_wire_name(d.full_name) for d in _walk_file(inference_pb2.DESCRIPTOR)}
    assert set(ours["messages"]) == defined
    assert MUST_COMPARE <= defined
    assert ours["service"]
    assert not theirs["missing"], f"not defined by Triton: {theirs['missing']}"


def test_messages_wire_compatible(described: tuple[Described, Described]) -> None:
    ours, theirs = described
    problems, compared = _compare_messages(ours, theirs)
    assert not problems, "incompatible with Triton's grpc_service.proto:\n" + "\n".join(problems)
    assert compared == set(ours["messages"])
    missing = MUST_COMPARE - compared
    assert not missing, f"not compared: {sorted(missing)}"
    # Map entries came along (parameters maps), so nested types really were walked.
    assert "inference.ModelInferRequest.InferInputTensor.ParametersEntry" in compared


def _enum_values(e: Any) -> dict[str, int]:
    return {v.name: v.number for v in e.values}


def test_enums_wire_compatible() -> None:
    """Every enum of our file (top-level and nested) has Triton's values, name for number."""
    pool = descriptor_pool.Default()
    fd: FileDescriptor = inference_pb2.DESCRIPTOR
    enums = list(fd.enum_types_by_name.values())
    enums += [e for d in _walk_file(fd) for e in d.enum_types]
    assert "meshserve.inference.DataType" in {e.full_name for e in enums}
    for e in enums:
        theirs = pool.FindEnumTypeByName(_wire_name(e.full_name))
        assert _enum_values(e) == _enum_values(theirs), e.full_name


def test_service_wire_compatible(described: tuple[Described, Described]) -> None:
    ours, theirs = described
    problems = _compare_services(ours, theirs)
    assert not problems, "incompatible with Triton's service:\n" + "\n".join(problems)
    assert {"ModelInfer", "ModelMetadata", "ModelStreamInfer"} <= set(ours["service"])
    assert {"ModelConfig", "RepositoryIndex"} <= set(ours["service"])


def test_comparison_detects_differences(described: tuple[Described, Described]) -> None:
    """The comparison itself flags a renumbered field, a changed type, a missing message, a
    field pointing at another message type, and an rpc with other types or streaming."""
    ours, theirs = described
    mutated = copy.deepcopy(ours)
    params = mutated["messages"]["inference.InferParameter"]["fields"]
    params[0]["number"] = 99
    params[1]["type"] = "TYPE_INT32"
    mutated["messages"]["inference.NotInTriton"] = {"map_entry": False, "fields": []}
    infer = mutated["messages"]["inference.ModelInferRequest"]["fields"]
    inputs = next(f for f in infer if f["name"] == "inputs")
    inputs["message_type"] = "inference.ModelInferRequest.InferRequestedOutputTensor"
    problems, _ = _compare_messages(mutated, theirs)
    text = "\n".join(problems)
    assert "InferParameter.bool_param (= 99)" in text
    assert "InferParameter.int64_param (= 2): type" in text
    assert "inference.NotInTriton: not defined by Triton" in text
    assert "ModelInferRequest.inputs (= 5): message_type" in text

    mutated["service"]["ModelInfer"]["server_streaming"] = True
    mutated["service"]["ModelMetadata"]["output_type"] = "inference.ModelInferResponse"
    mutated["service"]["NotInTriton"] = dict(mutated["service"]["ModelInfer"])
    text = "\n".join(_compare_services(mutated, theirs))
    assert "rpc ModelInfer: server_streaming" in text
    assert "rpc ModelMetadata: output_type" in text
    assert "rpc NotInTriton: not defined by Triton" in text


def test_wire_name_maps_only_our_package() -> None:
    assert _wire_name("meshserve.inference.InferParameter") == "inference.InferParameter"
    assert _wire_name("meshserve.v1.Frame") == "meshserve.v1.Frame"
    assert _wire_name("google.protobuf.Empty") == "google.protobuf.Empty"


# -- the method paths, over a real loopback gRPC server ------------------------------------------


class _RecordPaths(grpc.GenericRpcHandler):
    """Records the path of every call it sees and lets gRPC answer UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> None:
        self.paths.append(handler_call_details.method)
        return None


class _LiveOnly(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def ServerLive(self, request: Any, context: Any) -> Any:
        return inference_pb2.ServerLiveResponse(live=True)


@pytest.fixture
def server() -> Iterator[tuple[grpc.Server, str]]:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = srv.add_insecure_port("127.0.0.1:0")
    try:
        yield srv, f"127.0.0.1:{port}"
    finally:
        srv.stop(grace=None)


_SHAPES = {
    (False, False): grpc.UnaryUnaryMultiCallable,
    (False, True): grpc.UnaryStreamMultiCallable,
    (True, False): grpc.StreamUnaryMultiCallable,
    (True, True): grpc.StreamStreamMultiCallable,
}


def _call(stub: Any, m: Any, request: Any) -> Any:
    """Call method ``m`` (a MethodDescriptor) on ``stub`` with one request; the answer, or the
    RpcError it failed with."""
    try:
        answer = getattr(stub, m.name)(
            iter([request]) if m.client_streaming else request, timeout=10
        )
        return list(answer) if m.server_streaming else answer
    except grpc.RpcError as exc:
        return exc


def test_our_stub_calls_the_standard_paths(server: tuple[grpc.Server, str]) -> None:
    """Every method of our generated stub is called at ``/inference.GRPCInferenceService/<M>``,
    with the streaming shape our descriptor declares."""
    srv, target = server
    recorder = _RecordPaths()
    srv.add_generic_rpc_handlers((recorder,))
    srv.start()
    service = inference_pb2.DESCRIPTOR.services_by_name[SERVICE]
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        for m in service.methods:
            shape = _SHAPES[m.client_streaming, m.server_streaming]
            assert isinstance(getattr(stub, m.name), shape), m.name
            answer = _call(stub, m, getattr(inference_pb2, m.input_type.name)())
            assert isinstance(answer, grpc.RpcError), m.name
            assert answer.code() == grpc.StatusCode.UNIMPLEMENTED, m.name
    assert recorder.paths == [f"/{WIRE_SERVICE}/{m.name}" for m in service.methods]
    assert len(recorder.paths) == 9


def test_our_servicer_answers_tritons_stub_at_every_method(
    server: tuple[grpc.Server, str],
) -> None:
    """Registered through our generated module, our servicer receives every call Triton's own
    stub makes for the methods we declare (an unregistered path would be answered "Method not
    found!" by gRPC, not by the servicer), and ServerLive's answer decodes as Triton's message."""
    srv, target = server
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_LiveOnly(), srv)
    srv.start()
    service = inference_pb2.DESCRIPTOR.services_by_name[SERVICE]
    with grpc.insecure_channel(target) as channel:
        stub = triton_pb2_grpc.GRPCInferenceServiceStub(channel)
        live = stub.ServerLive(triton_pb2.ServerLiveRequest(), timeout=10)
        assert isinstance(live, triton_pb2.ServerLiveResponse)
        assert live.live is True
        for m in service.methods:
            if m.name == "ServerLive":
                continue
            answer = _call(stub, m, getattr(triton_pb2, m.input_type.name)())
            assert isinstance(answer, grpc.RpcError), m.name
            assert answer.code() == grpc.StatusCode.UNIMPLEMENTED, m.name
            assert answer.details() == "Method not implemented!", (m.name, answer.details())
        # The control: a Triton method we do not declare never reaches the servicer.
        load = triton_pb2.DESCRIPTOR.services_by_name[SERVICE].methods_by_name[
            "RepositoryModelLoad"
        ]
        answer = _call(stub, load, triton_pb2.RepositoryModelLoadRequest())
        assert isinstance(answer, grpc.RpcError)
        assert answer.code() == grpc.StatusCode.UNIMPLEMENTED
        assert answer.details() != "Method not implemented!"


# -- import order --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statements",
    [
        "import tritonclient.grpc; import meshserve; from meshserve.client import MeshClient",
        "from meshserve.client import MeshClient; import tritonclient.grpc, tritonclient.grpc.aio",
        "import meshserve.protos.mesh_pb2; import tritonclient.grpc.service_pb2",
    ],
    ids=["tritonclient-first", "meshserve-first", "protos-first"],
)
def test_both_import_in_one_fresh_interpreter(statements: str) -> None:
    """Registration in the default pool is process-wide and happens once, at first import, so
    each order is tried in its own fresh interpreter."""
    code = f"{statements}; print('ok')"
    assert run_fresh(code).strip() == "ok"
