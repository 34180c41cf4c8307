"""The Open Inference Protocol (v2) over HTTP/REST, as pure conversions.

KServe, Triton and MLServer serve the same paths and bodies; this module turns them into the
protos the gRPC endpoint already serves, and back, so a REST query takes the same path as a gRPC
one (:mod:`meshserve.common.rest_server` serves them):

* :func:`parse_infer`: an infer body, JSON (``inputs``: name, shape, datatype, data flat or
  nested, parameters; ``outputs``: name, parameters) or Triton's binary-data extension (the
  ``Inference-Header-Content-Length`` header: that many bytes of JSON, then each input whose
  ``binary_data_size`` parameter is set, raw, in order) → a ``ModelInferRequest`` (every input as
  raw contents) and what the answer should look like (:class:`InferCall`).
* :func:`render_infer`: a ``ModelInferResponse`` → the JSON body (``data`` flat, row-major), or
  with the outputs asked as ``binary_data`` (or ``binary_data_output`` for all) the JSON header
  followed by their raw bytes.
* :func:`config_json`, :func:`parse_index_request`, :func:`index_json`: Triton's model
  configuration (``GET .../config``) and repository index (``POST /v2/repository/index``)
  extensions as REST bodies.
* :func:`http_status` and :func:`error_body`: a gRPC status as HTTP (INVALID_ARGUMENT 400,
  UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, RESOURCE_EXHAUSTED 429,
  UNAVAILABLE 503, DEADLINE_EXCEEDED 504, any other 500) and ``{"error": "..."}``.

Anything a body gets wrong is an :class:`~meshserve.common.errors.InvalidArgument` naming what;
nothing else escapes :func:`parse_infer` (a hypothesis test holds it to that).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from meshserve.common.codec import (
    MAX_DIMS,
    MAX_ELEMENTS,
    decode_tensor,
    get_parameter,
    set_parameter,
)
from meshserve.common.datatypes import TABLE
from meshserve.common.errors import InvalidArgument
from meshserve.protos import inference_pb2

__all__ = [
    "HEADER_LENGTH",
    "InferCall",
    "error_body",
    "http_status",
    "metadata_json",
    "parse_infer",
    "render_infer",
    "retry_after_header",
]

#: Triton's binary-data extension: the length of the JSON part of a body (request or answer).
HEADER_LENGTH: Final = "Inference-Header-Content-Length"

_LEN: Final = struct.Struct("<I")

_STATUS: Final = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status of a gRPC status code (500 for those without a closer one)."""
    return _STATUS.get(code, 500)


def error_body(message: str) -> bytes:
    """The JSON body of an error answer: ``{"error": message}``."""
    return json.dumps({"error": message}).encode()


def retry_after_header(milliseconds: str) -> str | None:
    """``Retry-After`` (whole seconds, at least 1) from a retry hint in milliseconds (the
    ``retry-after-ms`` trailer a refusal carries); None when the hint does not parse."""
    try:
        ms = float(milliseconds)
    except ValueError:
        return None
    if not math.isfinite(ms) or ms < 0:
        return None
    return str(max(1, math.ceil(ms / 1000)))


@dataclass(slots=True)
class InferCall:
    """A parsed infer body: the request proto and how its answer is rendered."""

    request: inference_pb2.ModelInferRequest
    #: output name -> whether it is answered as raw bytes (outputs named in the body)
    binary: dict[str, bool] = field(default_factory=dict)
    #: for outputs not named: ``binary_data_output`` of the body's parameters
    binary_default: bool = False
    #: the body's ``timeout`` parameter (Triton's, microseconds) in seconds; None: none given
    timeout_s: float | None = None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parameters(where: str, raw: object) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where}: 'parameters' must be a JSON object")
    for key, value in raw.items():
        if not isinstance(value, bool | int | float | str):
            raise InvalidArgument(f"{where}: parameter {key!r} must be a boolean, number or string")
    return raw


def _flatten(where: str, data: object) -> list[Any]:
    """The leaves of ``data`` (a value or nested lists) in row-major order."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _shape(where: str, raw: object) -> list[int]:
    if not isinstance(raw, list) or not all(_is_int(d) for d in raw):
        raise InvalidArgument(f"{where}: 'shape' must be a list of integers")
    if len(raw) > MAX_DIMS:
        raise InvalidArgument(f"{where}: {len(raw)} dimensions (at most {MAX_DIMS})")
    if any(d < 0 for d in raw):
        raise InvalidArgument(f"{where}: negative dimension in shape {raw}")
    count = 1
    for d in raw:
        count *= max(d, 1)
        if count > MAX_ELEMENTS:
            raise InvalidArgument(f"{where}: shape {raw} holds too many elements")
    return list(raw)


def _json_raw(where: str, datatype: str, shape: list[int], data: object) -> bytes:
    """Raw contents (little-endian; BYTES length-prefixed) of an input's JSON ``data``."""
    leaves = _flatten(where, data)
    count = math.prod(shape)
    if len(leaves) != count:
        raise InvalidArgument(
            f"{where}: shape {shape} holds {count} elements, 'data' has {len(leaves)}"
        )
    if datatype == "BYTES":
        parts: list[bytes] = []
        for leaf in leaves:
            if not isinstance(leaf, str):
                raise InvalidArgument(f"{where}: BYTES data must be strings")
            encoded = leaf.encode("utf-8", errors="surrogatepass")
            parts += (_LEN.pack(len(encoded)), encoded)
        return b"".join(parts)
    kind = TABLE[datatype].dtype.kind
    if kind == "b":
        ok = all(isinstance(leaf, bool) for leaf in leaves)
    elif kind in "iu":
        info = np.iinfo(TABLE[datatype].dtype)
        ok = all(_is_int(leaf) and info.min <= leaf <= info.max for leaf in leaves)
    else:
        ok = all(isinstance(leaf, int | float) and not isinstance(leaf, bool) for leaf in leaves)
    if not ok:
        wanted = {"b": "booleans", "i": "integers in range", "u": "integers in range"}.get(
            kind, "numbers"
        )
        raise InvalidArgument(f"{where}: {datatype} data must be {wanted}")
    dtype = TABLE[datatype].dtype.newbyteorder("<")
    try:
        with np.errstate(over="raise"):
            return np.asarray(leaves, dtype=dtype).tobytes()
    except (OverflowError, FloatingPointError, ValueError):
        raise InvalidArgument(f"{where}: a value does not fit in {datatype}") from None


def _load_json(header: bytes) -> dict[str, Any]:
    try:
        body = json.loads(header)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidArgument(f"the body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    return body


def parse_infer(body: bytes, header_length: str | None, model: str, version: str = "") -> InferCall:
    """The ``ModelInferRequest`` of an infer ``body`` for ``model`` (``version``: the path's,
    "" for none); ``header_length``: the ``Inference-Header-Content-Length`` header (None: the
    body is all JSON). InvalidArgument names what the body gets wrong."""
    try:
        return _parse_infer(body, header_length, model, version)
    except (ValueError, TypeError, OverflowError) as exc:  # protobuf: a string not UTF-8
        raise InvalidArgument(f"the body does not make a request: {str(exc)[:200]}") from None


def _parse_infer(body: bytes, header_length: str | None, model: str, version: str) -> InferCall:
    if header_length is None:
        header, tail = body, b""
    else:
        text = header_length.strip()
        if not text.isdigit() or int(text) > len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH} {header_length[:40]!r} must be a length within the body "
                f"({len(body)} bytes)"
            )
        header, tail = body[: int(text)], body[int(text) :]
    doc = _load_json(header)
    request = inference_pb2.ModelInferRequest(model_name=model, model_version=version)
    call = InferCall(request)
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument("'id' must be a string")
    request.id = request_id
    for key, value in _parameters("request", doc.get("parameters")).items():
        if key == "binary_data_output":
            if not isinstance(value, bool):
                raise InvalidArgument("parameter 'binary_data_output' must be a boolean")
            call.binary_default = value
        elif key == "timeout":
            if not _is_int(value) or value <= 0:
                raise InvalidArgument("parameter 'timeout' must be a positive integer (us)")
            call.timeout_s = value / 1e6
        else:
            set_parameter(request.parameters, key, value)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("'inputs' must be a non-empty list")
    offset = 0
    seen: set[str] = set()
    for i, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise InvalidArgument(f"inputs[{i}] must be a JSON object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"inputs[{i}]: 'name' must be a non-empty string")
        where = f"input {name!r}"
        if name in seen:
            raise InvalidArgument(f"{where} is given twice")
        seen.add(name)
        datatype = item.get("datatype")
        if not isinstance(datatype, str) or datatype not in TABLE:
            raise InvalidArgument(
                f"{where}: unknown datatype {str(datatype)[:40]!r} (one of {', '.join(TABLE)})"
            )
        shape = _shape(where, item.get("shape"))
        params = _parameters(where, item.get("parameters"))
        size = params.pop("binary_data_size", None)
        if size is not None:
            if not _is_int(size) or size < 0:
                raise InvalidArgument(f"{where}: 'binary_data_size' must be an integer >= 0")
            if offset + size > len(tail):
                raise InvalidArgument(
                    f"{where}: binary_data_size {size} runs past the body's binary part "
                    f"({len(tail) - offset} bytes left)"
                )
            raw = tail[offset : offset + size]
            offset += size
        elif "data" in item:
            raw = _json_raw(where, datatype, shape, item["data"])
        else:
            raise InvalidArgument(f"{where}: neither 'data' nor 'binary_data_size'")
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        for key, value in params.items():
            set_parameter(tensor.parameters, key, value)
        request.raw_input_contents.append(raw)
    if offset != len(tail):
        raise InvalidArgument(
            f"the body's binary part has {len(tail) - offset} bytes no input's binary_data_size "
            "claims"
        )
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidArgument("'outputs' must be a list")
        for i, item in enumerate(outputs):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise InvalidArgument(f"outputs[{i}] must be an object with a string 'name'")
            name = item["name"]
            if name in call.binary:
                raise InvalidArgument(f"output {name!r} is asked twice")
            params = _parameters(f"output {name!r}", item.get("parameters"))
            binary = params.pop("binary_data", call.binary_default)
            if not isinstance(binary, bool):
                raise InvalidArgument(f"output {name!r}: 'binary_data' must be a boolean")
            if "classification" in params:
                raise InvalidArgument("the classification extension is not supported")
            call.binary[name] = binary
            request.outputs.add(name=name)
    return call


def _parameters_json(params: Any) -> dict[str, Any]:
    return {key: get_parameter(value) for key, value in params.items()}


def _json_data(array: np.ndarray[Any, Any], datatype: str) -> list[Any]:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [
            (v if isinstance(v, bytes) else bytes(v)).decode("utf-8", errors="replace")
            for v in flat.tolist()
        ]
    values: list[Any] = flat.tolist()
    return values


def _raw_of(array: np.ndarray[Any, Any], datatype: str) -> bytes:
    if datatype != "BYTES":
        return np.ascontiguousarray(array, dtype=TABLE[datatype].dtype.newbyteorder("<")).tobytes()
    parts: list[bytes] = []
    for v in array.reshape(-1).tolist():
        data = v if isinstance(v, bytes) else str(v).encode()
        parts += (_LEN.pack(len(data)), data)
    return b"".join(parts)


def render_infer(
    response: inference_pb2.ModelInferResponse, call: InferCall
) -> tuple[bytes, dict[str, str]]:
    """The answer's body and its headers (``Content-Type``; with binary outputs,
    ``Inference-Header-Content-Length``)."""
    raw = list(response.raw_output_contents)
    if raw and len(raw) != len(response.outputs):
        raise InvalidArgument(
            f"the answer has {len(raw)} raw contents for {len(response.outputs)} outputs"
        )
    doc: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version:
        doc["model_version"] = response.model_version
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = _parameters_json(response.parameters)
    outputs: list[dict[str, Any]] = []
    tail: list[bytes] = []
    for i, tensor in enumerate(response.outputs):
        out: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if tensor.parameters:
            out["parameters"] = _parameters_json(tensor.parameters)
        binary = call.binary.get(tensor.name, call.binary_default)
        if binary and raw:  # the node's bytes as they are (checked by whoever reads them)
            data = raw[i]
        else:
            array = decode_tensor(
                tensor.name,
                tensor.datatype,
                tensor.shape,
                raw=raw[i] if raw else None,
                contents=None if raw else tensor.contents,
                kind="output",
            )
            data = b""
            if binary:
                data = _raw_of(array, tensor.datatype)
            else:
                out["data"] = _json_data(array, tensor.datatype)
        if binary:
            out.setdefault("parameters", {})["binary_data_size"] = len(data)
            tail.append(data)
        outputs.append(out)
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not tail:
        return header, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return b"".join([header, *tail]), headers


def metadata_json(response: inference_pb2.ModelMetadataResponse) -> dict[str, Any]:
    """A ModelMetadata answer as the REST body (name, versions, platform, inputs, outputs)."""

    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": response.name,
        "versions": list(response.versions),
        "platform": response.platform,
        "inputs": tensors(response.inputs),
        "outputs": tensors(response.outputs),
    }


_INT64_TYPES: Final = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _numbers_for_int64(message: Any, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (protobuf's JSON of ``message``, field names as in the proto) with every 64-bit
    integer a JSON number instead of protobuf's string, as Triton's HTTP endpoint answers a
    model configuration (``"dims": [64]``, not ``["64"]``)."""
    for fd, value in message.ListFields():
        key = fd.name
        if key not in doc:
            continue
        if fd.message_type is not None:  # (the config has no map fields)
            if isinstance(doc[key], list):  # a repeated field
                for item, part in zip(value, doc[key], strict=True):
                    _numbers_for_int64(item, part)
            else:
                _numbers_for_int64(value, doc[key])
        elif fd.type in _INT64_TYPES:
            part = doc[key]
            doc[key] = [int(v) for v in part] if isinstance(part, list) else int(part)
    return doc


def config_json(response: inference_pb2.ModelConfigResponse) -> dict[str, Any]:
    """A ModelConfig answer as Triton's REST body (``GET /v2/models/M/config``): the
    configuration itself, field names as in the proto, 64-bit integers as numbers."""
    doc = json_format.MessageToDict(response.config, preserving_proto_field_name=True)
    return _numbers_for_int64(response.config, doc)


def parse_index_request(body: bytes) -> inference_pb2.RepositoryIndexRequest:
    """``POST /v2/repository/index``'s body: empty (tritonclient.http sends none) or a JSON
    object with an optional boolean ``ready`` (only the ready models)."""
    if not body.strip():
        return inference_pb2.RepositoryIndexRequest()
    doc = _load_json(body)
    unknown = set(doc) - {"ready"}
    if unknown:
        raise InvalidArgument(f"repository index: unknown field(s) {sorted(unknown)}; want 'ready'")
    ready = doc.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidArgument("repository index: 'ready' must be true or false")
    return inference_pb2.RepositoryIndexRequest(ready=ready)


def index_json(response: inference_pb2.RepositoryIndexResponse) -> list[dict[str, str]]:
    """A RepositoryIndex answer as Triton's REST body: one object per model version (``name``,
    ``version``, ``state``, and ``reason`` when there is one)."""
    out = []
    for model in response.models:
        entry = {"name": model.name, "version": model.version, "state": model.state}
        if model.reason:
            entry["reason"] = model.reason
        out.append(entry)
    return out
