"""A client run *inside* a test network namespace (``ip netns exec NS python ns_client.py ...``).

Subcommands print one JSON object on stdout:

    register TARGET NAME MODEL_PATH            -> {"created": bool}
    nodes TARGET                               -> {"nodes": {node_id: {"copies": {model: state}}}}
    infer TARGET NAME MODEL_PATH COUNT         -> {"nodes": [...], "correct": n, "errors": [...]}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> None:
    from meshserve.client import MeshClient
    from meshserve.client._admin import AdminClient
    from meshserve.common.errors import StatusError
    from meshserve.devtools.demo_models import reference_outputs, sha256_file
    from meshserve.protos import mesh_pb2

    command, target = argv[0], argv[1]
    out: dict[str, object]
    if command == "register":
        name, path = argv[2], Path(argv[3])
        with AdminClient(target) as admin:
            created = admin.register_model(name, path.as_uri(), sha256_file(path)).created
        out = {"created": created}
    elif command == "nodes":
        with AdminClient(target, timeout=5) as admin:
            nodes = admin.list_nodes()
        out = {
            "nodes": {
                n.node_id: {"copies": {c.model: mesh_pb2.CopyState.Name(c.state) for c in n.copies}}
                for n in nodes
            }
        }
    elif command == "infer":
        name, path, count = argv[2], Path(argv[3]), int(argv[4])
        x = np.random.default_rng(11).standard_normal((2, 64)).astype(np.float32)
        expected = reference_outputs(path, {"x": x})["y"]
        answered: list[str] = []
        errors: list[str] = []
        correct = 0
        with MeshClient(target, timeout=5) as client:
            for _ in range(count):
                try:
                    result = client.infer(name, {"x": x})
                except StatusError as exc:
                    errors.append(f"{exc.code.name}: {exc.message}")
                    continue
                answered.append(result.node)
                correct += bool(np.allclose(result["y"], expected, rtol=1e-5, atol=1e-5))
        out = {"nodes": answered, "correct": correct, "errors": errors}
    else:
        raise SystemExit(f"unknown command {command!r}")
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1:])
