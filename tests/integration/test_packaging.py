"""The wheel: one top-level package, ``meshserve``, holding every source file of the repository's
top folders, and a working install beside tritonclient.

The source folders stay at the top of the repository and reach the distribution through the
links in ``meshserve/`` (DESIGN.md, "Repository layout"); a folder without ``__init__.py`` or a
data file outside ``package-data`` would silently be left out of the wheel, so every file is
checked. The wheel is built from a copy of the working tree, offline (``--no-build-isolation``:
the venv's setuptools), and installed with ``--no-deps`` into a folder of its own; the
dependencies come from this venv.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REPO_ROOT = Path(__file__).resolve().parents[2]
# What the wheel must carry from each source folder (tests, bench and docs are not shipped).
SHIPPED = ("*.py", "*.pyi", "*.proto", "py.typed", "static/*.html", "static/*.js", "static/*.css")
SCRIPTS = {
    "meshctl": "meshserve.client.cli:main",
    "meshserve-controlplane": "meshserve.controlplane.__main__:main",
    "meshserve-gateway": "meshserve.controlplane.dataplane.standalone:main",
    "meshserve-node": "meshserve.node.__main__:main",
}


# Run in the fresh interpreter: tritonclient first, then every module the wheel installed.
_IMPORT_ALL = """
import importlib, pkgutil, sys
import tritonclient.grpc
import meshserve
from meshserve.client import MeshClient
from meshserve.errors import NotFound
assert meshserve.__file__.startswith("TARGET"), meshserve.__file__
names = [m.name for m in pkgutil.walk_packages(meshserve.__path__, "meshserve.")]
for name in names:
    if not name.endswith("__main__"):
        importlib.import_module(name)
old = ("client", "common", "controlplane", "devtools", "node", "protos", "tests")
outside = [m for m in sys.modules if m.split(".")[0] in old]
assert not outside, outside
print(len(names))
"""


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, f"{args}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _copy_sources(dest: Path) -> list[str]:
    """Copy what a build reads (pyproject, README, meshserve/ with its links, and the folder
    behind each link) into ``dest``; return the files the wheel must hold, as wheel paths."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    shutil.copytree(REPO_ROOT / "meshserve", dest / "meshserve", symlinks=True, ignore=ignore)
    expected: list[str] = []
    for entry in sorted((REPO_ROOT / "meshserve").iterdir()):
        if entry.is_symlink():
            target = entry.resolve()
            assert target.parent == REPO_ROOT, f"{entry} must link to a top folder"
            shutil.copytree(target, dest / target.name, ignore=ignore)
            expected += [
                f"meshserve/{entry.name}/{p.relative_to(target).as_posix()}"
                for pattern in SHIPPED
                for p in target.rglob(pattern)
                if "__pycache__" not in p.parts
            ]
        elif entry.is_file() and any(entry.match(pattern) for pattern in SHIPPED):
            expected.append(f"meshserve/{entry.name}")
    return sorted(set(expected))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """(the wheel, the files it must hold)."""
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("wheel")
    expected = _copy_sources(src)
    pip = (sys.executable, "-m", "pip")
    _run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, src, cwd=src)
    (wheel,) = out.glob("meshserve-*.whl")
    return wheel, expected


def test_wheel_holds_only_the_meshserve_package(built: tuple[Path, list[str]]) -> None:
    wheel, _ = built
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert tops - dist_info == {"meshserve"}
    top_level = zipfile.ZipFile(wheel).read(f"{dist_info.pop()}/top_level.txt").decode()
    assert top_level.split() == ["meshserve"]


def test_wheel_holds_every_source_file(built: tuple[Path, list[str]]) -> None:
    wheel, expected = built
    names = set(zipfile.ZipFile(wheel).namelist())
    assert len(expected) > 80  # the walk really went through the linked folders
    missing = [n for n in expected if n not in names]
    assert not missing, f"left out of the wheel: {missing}"
    # The ones a user notices first when missing: contract, typing marker, plugins.
    for name in (
        "meshserve/py.typed",
        "meshserve/errors.py",
        "meshserve/protos/inference.proto",
        "meshserve/protos/mesh.proto",
        "meshserve/protos/inference_pb2.pyi",
        "meshserve/controlplane/placement/policies/plugins/__init__.py",
    ):
        assert name in names, name
    plugins = [
        n for n in names if n.startswith("meshserve/controlplane/placement/policies/plugins/")
    ]
    assert len(plugins) > 3, plugins


def test_wheel_declares_the_console_scripts(built: tuple[Path, list[str]]) -> None:
    wheel, _ = built
    with zipfile.ZipFile(wheel) as zf:
        (entry_points,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser()
        parser.read_string(zf.read(entry_points).decode())
    assert dict(parser["console_scripts"]) == SCRIPTS


def test_installed_wheel_imports_beside_tritonclient(
    built: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """Installed on its own (not the editable checkout), every module of the wheel imports, in
    one interpreter that imported tritonclient.grpc first."""
    wheel, _ = built
    target = tmp_path / "site"
    _run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "-q",
        "--target",
        target,
        wheel,
        cwd=tmp_path,
    )
    code = _IMPORT_ALL.replace("TARGET", str(target))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    out = _run(sys.executable, "-c", code, cwd=tmp_path, env=env)
    assert int(out.split()[-1]) > 80
