"""docs/bring-your-own-model.md, run as written: every titled block, in order, on a real mesh;
and every meshserve command line the user docs show is one the real CLIs accept.

The walkthrough's fenced blocks whose info string carries ``title=`` are the steps a user types:
Python blocks are saved under their title and run with the test's interpreter, shell blocks run
with bash (``set -euo pipefail``), all in one directory, with ``MESHSERVE_TARGET`` set to the
control plane of a real :class:`~meshserve.devtools.local.LocalMesh` (etcd, a control-plane
process, a node process) and the virtualenv's ``meshctl`` / ``python`` first on ``PATH``. That
directory is the mesh's workdir, one of its nodes' ``--artifact-root`` directories, as under
``meshctl up --workdir``. Untitled blocks (starting the mesh, curl) are not run.

The command lines of docs/operations.md and docs/bring-your-own-model.md that start a
``meshserve-*`` process or call ``meshctl`` are parsed by the real argument parsers (argparse for
the servers, click through typer for ``meshctl``) without running them: a renamed flag or
command breaks the test, not a reader.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from meshserve.client.cli.app import build
from meshserve.controlplane.__main__ import _parser as controlplane_parser
from meshserve.controlplane.dataplane.standalone import _parser as gateway_parser
from meshserve.devtools.local import LocalMesh
from meshserve.node.__main__ import _parser as node_parser

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "bring-your-own-model.md"
BLOCK = re.compile(r'^```(\w+) title="([^"]+)"\n(.*?)^```$', re.MULTILINE | re.DOTALL)
SHELL_BLOCK = re.compile(r"^ *```(?:sh|bash)[^\n]*\n(.*?)^ *```$", re.MULTILINE | re.DOTALL)
CHECKED_DOCS = ["operations.md", "bring-your-own-model.md"]
SERVERS = {
    "meshserve-controlplane": controlplane_parser,
    "meshserve-node": node_parser,
    "meshserve-gateway": gateway_parser,
}


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


def command_lines(text: str) -> list[list[str]]:
    """The argv of every meshserve command in the doc's shell blocks (continuations joined,
    comments dropped)."""
    found = []
    for block in SHELL_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            first = line.split()[:1]
            if first and (first[0] == "meshctl" or first[0] in SERVERS):
                found.append(shlex.split(line, comments=True))
    return found


def parse_meshctl(argv: list[str]) -> None:
    """Resolve the subcommand path and parse its options as ``meshctl`` would, without running
    it (typer's click raises a usage error for an unknown command or option, a bad value or a
    missing argument)."""
    command: Any = typer.main.get_command(build())
    context = command.make_context(argv[0], argv[1:])
    while hasattr(command, "resolve_command"):  # a group: the next word names a subcommand
        # what the group's own invoke resolves: the words it kept back, then the rest
        words = [*getattr(context, "_protected_args", ()), *context.args]
        name, command, rest = command.resolve_command(context, words)
        context = command.make_context(name, rest, parent=context)


@pytest.mark.parametrize("doc", CHECKED_DOCS)
def test_every_command_line_shown_is_accepted_by_the_real_cli(doc: str) -> None:
    lines = command_lines((DOC.parent / doc).read_text())
    assert lines, f"{doc} shows no meshserve command"
    for argv in lines:
        if argv[0] == "meshctl":
            parse_meshctl(argv)
        else:
            SERVERS[argv[0]]().parse_args(argv[1:])
