"""Regenerate the committed *_pb2.py / *_pb2_grpc.py / *.pyi from protos/*.proto.

Usage: ``python -m meshserve.protos.generate``. ``--check`` regenerates into a temporary folder
and exits 1 if anything differs from what is committed (CI runs this).

The protos are compiled as ``meshserve/protos/*.proto`` (through the ``meshserve/protos`` link at
the repository root), so the generated modules import each other as ``meshserve.protos.*``.

One rewrite follows protoc: the OIP service is declared in the private proto package
``meshserve.inference`` (so its messages never clash with tritonclient's ``inference.*`` in the
default descriptor pool), but on the wire it must answer at the standard method paths
``/inference.GRPCInferenceService/<Method>``. The rewrite replaces the service's full name in the
generated gRPC module only (stubs, servicer registration); the wire format of the messages carries
no package names, so they are compatible as they are.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent  # the repository root (protos/ is a top folder)
_PROTOS = ("meshserve/protos/inference.proto", "meshserve/protos/mesh.proto")
_PRIVATE_SERVICE = "meshserve.inference.GRPCInferenceService"
WIRE_SERVICE = "inference.GRPCInferenceService"


def _generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency; imported only when generating

    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(_ROOT / p for p in _PROTOS),
    ]
    if protoc.main([str(a) for a in args]) != 0:
        raise SystemExit("protoc failed")
    generated = sorted((out / "meshserve" / "protos").glob("*_pb2*"))
    for path in generated:
        if path.name.endswith("_pb2_grpc.py"):
            text = path.read_text()
            path.write_text(text.replace(_PRIVATE_SERVICE, WIRE_SERVICE))
    return generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if regenerating changes files")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = _generate(Path(tmp))
        stale = []
        for path in generated:
            target = _ROOT / "protos" / path.name
            if ns.check:
                if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                    stale.append(path.name)
            else:
                shutil.copyfile(path, target)
        if stale:
            print(
                f"generated protos are stale: {', '.join(stale)}; "
                "run python -m meshserve.protos.generate"
            )
            return 1
    print("protos up to date" if ns.check else f"generated {len(generated)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
