"""The client deployable's boundary (DESIGN.md): ``meshserve.client`` imports nothing from the
control plane or devtools, except ``meshctl up`` and ``certs init``, lazily, in their functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CLIENT = Path(__file__).parents[2] / "client"
FORBIDDEN = ("meshserve.controlplane", "meshserve.devtools", "controlplane", "devtools")
# Files allowed a function-level import of devtools (and the functions it may sit in).
LAZY_DEVTOOLS = {"cli/up.py": {"up", "certs_init"}}


def _imports(tree: ast.AST) -> list[tuple[str, str | None]]:
    """(imported module, enclosing function or None) for every import in ``tree``."""
    found: list[tuple[str, str | None]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, function or child.name)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.module, function))
            visit(child, function)

    visit(tree, None)
    return found


def test_no_client_module_imports_controlplane_or_devtools() -> None:
    files = sorted(CLIENT.rglob("*.py"))
    assert len(files) > 10  # the SDK and every meshctl module were found
    offending = []
    for path in files:
        rel = path.relative_to(CLIENT).as_posix()
        for module, function in _imports(ast.parse(path.read_text(), str(path))):
            if not module.startswith(FORBIDDEN):
                continue
            lazy_ok = function in LAZY_DEVTOOLS.get(rel, set())
            if not (lazy_ok and module.startswith("meshserve.devtools.")):
                offending.append(f"{rel}: {module} (in {function or 'module scope'})")
    assert offending == []


def test_building_meshctl_loads_no_server_or_devtools_module() -> None:
    code = (
        "import sys\n"
        "from meshserve.client.cli.app import build\n"
        "build()\n"
        "print(sorted(m for m in sys.modules if m.startswith("
        "('meshserve.controlplane', 'meshserve.devtools', 'meshserve.node'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
