"""docs/bring-your-own-model.md, run as written: every titled block, in order, on a real mesh.

The walkthrough's fenced blocks whose info string carries ``title=`` are the steps a user types:
Python blocks are saved under their title and run with the test's interpreter, shell blocks run
with bash (``set -euo pipefail``), all in one directory, with ``MESHSERVE_TARGET`` set to the
control plane of a real :class:`~meshserve.devtools.local.LocalMesh` (etcd, a control-plane
process, a node process) and the virtualenv's ``meshctl`` / ``python`` first on ``PATH``. That
directory is the mesh's workdir, one of its nodes' ``--artifact-root`` directories, as under
``meshctl up --workdir``. Untitled blocks (starting the mesh, curl) are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshserve.devtools.local import LocalMesh

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "bring-your-own-model.md"
BLOCK = re.compile(r'^```(\w+) title="([^"]+)"\n(.*?)^```$', re.MULTILINE | re.DOTALL)


def titled_blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, title, body) of every titled fenced block, in document order."""
    return [(m[1], m[2], m[3]) for m in BLOCK.finditer(text)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    work = tmp_path_factory.mktemp("walkthrough")
    with LocalMesh(work) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        mesh.start_node("node-1", [cp.address])
        bin_dir = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            "MESHSERVE_TARGET": cp.address,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
        yield work, env


def test_the_walkthrough_has_the_steps_it_promises() -> None:
    titles = [title for _, title, _ in titled_blocks(DOC.read_text())]
    assert titles == [
        "export_digits.py",
        "register-v1",
        "query_sdk.py",
        "query_triton.py",
        "profile-v1",
        "rollout-v2",
    ]


def test_every_titled_block_runs_against_a_real_mesh(workdir: tuple[Path, dict[str, str]]) -> None:
    work, env = workdir
    outputs: dict[str, str] = {}
    for language, title, body in titled_blocks(DOC.read_text()):
        if language == "python":
            (work / title).write_text(body)
            argv = [sys.executable, title]
        else:
            assert language == "sh", f"block {title!r}: unexpected language {language!r}"
            argv = ["bash", "-euo", "pipefail", "-c", body]
        done = subprocess.run(
            argv, cwd=work, env=env, capture_output=True, text=True, timeout=180, check=False
        )
        outputs[title] = done.stdout
        assert done.returncode == 0, (
            f"block {title!r} exited {done.returncode}\n--- stdout\n{done.stdout}"
            f"\n--- stderr\n{done.stderr}"
        )
    assert "variant v1" in outputs["query_sdk.py"]
    assert re.search(r"labels \[\d, \d, \d, \d\]", outputs["query_triton.py"])
    # the last line of the rollout block queries again: live now resolves to v2
    assert "variant v2" in outputs["rollout-v2"].splitlines()[-1]
