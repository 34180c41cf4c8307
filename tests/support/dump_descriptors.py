"""Dump protobuf message and service descriptors of one generated module as JSON.

Run in a subprocess, one module per process::

    python -m tests.support.dump_descriptors MODULE [--messages A,B,...] [--service NAME]

Our ``meshserve.protos.inference_pb2`` and Triton's ``tritonclient.grpc.service_pb2`` both define
symbols in package ``inference``; protobuf's default descriptor pool refuses duplicates, so the
two can never be imported into the same process. tests/unit/test_wire_compat.py runs this
script once per module and compares the JSON.

Without ``--messages`` every message defined in MODULE's own file is dumped. Each dumped message
pulls in, recursively, its nested messages (map entries included) and the message types of its
fields. Output (stdout)::

    {"module": ..., "file": ..., "messages": {full_name: {...}}, "missing": [...],
     "service": {"name": ..., "methods": {...}} | null}

If MODULE (or something it needs) cannot be imported, the output is
``{"module": ..., "import_error": "..."}`` and the exit status is 0, so the caller can decide
between skipping and failing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from google.protobuf.descriptor import (  # type: ignore[import-untyped]
    Descriptor,
    FieldDescriptor,
    FileDescriptor,
)

_TYPE_NAMES: dict[int, str] = {
    getattr(FieldDescriptor, n): n for n in dir(FieldDescriptor) if n.startswith("TYPE_")
}


def _walk_file(fd: FileDescriptor) -> list[str]:
    """Full names of every message defined in ``fd``, nested ones included."""
    out: list[str] = []

    def visit(d: Descriptor) -> None:
        out.append(d.full_name)
        for n in d.nested_types:
            visit(n)

    for d in fd.message_types_by_name.values():
        visit(d)
    return out


def _field(f: FieldDescriptor) -> dict[str, Any]:
    return {
        "name": f.name,
        "number": f.number,
        "type": _TYPE_NAMES.get(f.type, str(f.type)),
        "repeated": bool(f.is_repeated),
        "required": bool(f.is_required),
        "message_type": f.message_type.full_name if f.message_type is not None else None,
        "enum_type": f.enum_type.full_name if f.enum_type is not None else None,
        "oneof": f.containing_oneof.name if f.containing_oneof is not None else None,
        "packed": bool(f.is_packed),
    }


def _message(d: Descriptor) -> dict[str, Any]:
    return {
        "full_name": d.full_name,
        "file": d.file.name,
        "map_entry": bool(d.GetOptions().map_entry),
        "fields": [_field(f) for f in sorted(d.fields, key=lambda f: f.number)],
        "nested": [n.full_name for n in d.nested_types],
        "oneofs": [o.name for o in d.oneofs],
    }


def dump(module_name: str, messages: list[str] | None, service: str | None) -> dict[str, Any]:
    """Import ``module_name`` and describe the requested messages and service."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return {"module": module_name, "import_error": f"{type(exc).__name__}: {exc}"}
    fd: FileDescriptor = module.DESCRIPTOR
    pool = fd.pool
    wanted = messages if messages is not None else _walk_file(fd)

    found: dict[str, Any] = {}
    missing: list[str] = []
    todo = list(wanted)
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

    svc: dict[str, Any] | None = None
    if service is not None:
        try:
            sd = pool.FindServiceByName(service)
        except KeyError:
            svc = None
        else:
            svc = {
                "name": sd.full_name,
                "file": sd.file.name,
                "methods": {
                    m.name: {
                        "input_type": m.input_type.full_name,
                        "output_type": m.output_type.full_name,
                        "client_streaming": bool(m.client_streaming),
                        "server_streaming": bool(m.server_streaming),
                    }
                    for m in sd.methods
                },
            }

    return {
        "module": module_name,
        "file": fd.name,
        "defined": _walk_file(fd),
        "messages": dict(sorted(found.items())),
        "missing": sorted(missing),
        "service": svc,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: print the dump of one module as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("module", help="generated *_pb2 module to import")
    parser.add_argument("--messages", help="comma-separated message full names")
    parser.add_argument("--service", help="service full name, e.g. inference.GRPCInferenceService")
    args = parser.parse_args(argv)
    names = [n for n in args.messages.split(",") if n] if args.messages is not None else None
    json.dump(dump(args.module, names, args.service), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
