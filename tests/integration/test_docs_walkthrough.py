"""docs/bring-your-own-model.md, run as written: every titled block, in order, on a real mesh;
and every meshserve command line the user docs show is one the real CLIs accept.

The walkthrough's fenced blocks whose info string carries ``title=`` are the steps a user types:
Python blocks are saved under their title and run with the test's interpreter, shell blocks run
with bash (``set -euo pipefail``), all in one directory, with ``MESHSERVE_TARGET`` set to the
control plane of a real :class:`~meshserve.devtools.local.LocalMesh` (etcd, a control-plane
process, a node process) and the virtualenv's ``meshctl`` / ``python`` first on ``PATH``. That
directory is the mesh's workdir, one of its nodes' ``--artifact-root`` directories, as under
``meshctl up --workdir``. The control plane serves OIP over REST too (``--http-listen``); the
curl block's ``127.0.0.1:8000`` (what the doc's ``meshctl up --http-listen`` names) is replaced by
that listener's address, a free port. Untitled blocks (starting the mesh) are not run.

The command lines of every user doc (docs/*.md and the README) that start a ``meshserve-*``
process or call ``meshctl`` -- in ``sh``/``bash`` blocks and after the ``$`` prompt of ``console``
blocks, each command of a ``;``/``&&``/``|`` chain, redirections dropped -- are parsed by the real
argument parsers (argparse for the servers, click through typer for ``meshctl``) without running
them: a renamed flag or command breaks the test, not a reader. A line with a ``...`` placeholder
is prose, not a command, and is left out.
"""

from __future__ import annotations

import json
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
from meshserve.devtools.local import LocalMesh, free_port
from meshserve.node.__main__ import _parser as node_parser

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "bring-your-own-model.md"
BLOCK = re.compile(r'^```(\w+) title="([^"]+)"\n(.*?)^```$', re.MULTILINE | re.DOTALL)
SHELL_BLOCK = re.compile(r"^ *```(sh|bash|console)[^\n]*\n(.*?)^ *```$", re.MULTILINE | re.DOTALL)
CHECKED_DOCS = [*sorted(p.name for p in DOC.parent.glob("*.md")), "../README.md"]
#: shell words that end one command of a line (the next one, if any, starts after them)
SEPARATORS = {";", "&&", "||", "|"}
REDIRECTIONS = (">", ">>", "<")
#: options whose callback acts while parsing (prints and exits, or installs completion into
#: the user's shell): checked to exist, not parsed
EAGER = {"--version", "--help", "--install-completion", "--show-completion"}
PROGRAM = re.compile(r"\b(meshctl|meshserve-(controlplane|node|gateway))\b")
#: the docs that must show at least one command (the others may show none)
SHOW_COMMANDS = {
    "bring-your-own-model.md", "edge-deployment.md", "kubernetes.md", "meshctl.md",
    "monitoring.md", "operations.md", "rollout.md", "storage.md", "../README.md",
}  # fmt: skip
SERVERS = {
    "meshserve-controlplane": controlplane_parser,
    "meshserve-node": node_parser,
    "meshserve-gateway": gateway_parser,
}


def titled_blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, title, body) of every titled fenced block, in document order."""
    return [(m[1], m[2], m[3]) for m in BLOCK.finditer(text)]


DOC_REST = "127.0.0.1:8000"  # the REST address the walkthrough's `meshctl up` line gives


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    work = tmp_path_factory.mktemp("walkthrough")
    with LocalMesh(work) as mesh:
        mesh.start_etcd()
        rest = f"127.0.0.1:{free_port()}"
        cp = mesh.start_controlplane("cp-1", extra=["--http-listen", rest])
        mesh.start_node("node-1", [cp.address])
        bin_dir = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            "MESHSERVE_TARGET": cp.address,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            "WALKTHROUGH_REST": rest,
        }
        yield work, env


def test_the_walkthrough_has_the_steps_it_promises() -> None:
    titles = [title for _, title, _ in titled_blocks(DOC.read_text())]
    assert titles == [
        "export_digits.py",
        "register-v1",
        "query_sdk.py",
        "query_triton.py",
        "query-curl",
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
            if DOC_REST in body:  # curl: the test mesh's REST listener
                body = body.replace(DOC_REST, env["WALKTHROUGH_REST"])
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
    answer = json.loads(outputs["query-curl"])  # the OIP JSON answer curl printed
    assert answer["model_name"] == "digits"
    label = next(o for o in answer["outputs"] if o["name"] == "label")
    assert label["datatype"] == "INT64" and label["shape"] == [1]
    assert label["data"][0] in range(10)
    # the last line of the rollout block queries again: live now resolves to v2
    assert "variant v2" in outputs["rollout-v2"].splitlines()[-1]


def command_lines(text: str) -> list[list[str]]:
    """The argv of every meshserve command in the doc's shell blocks (continuations joined,
    comments dropped; in a ``console`` block only the lines after a ``$`` prompt; each command
    of a chain on its own, redirections dropped; a program path such as ``.venv/bin/meshctl``
    named by its file name)."""
    found = []
    for language, block in SHELL_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            if language == "console":
                if not line.startswith("$ "):
                    continue  # output, not a command
                line = line[2:]
            if not PROGRAM.search(line):
                continue  # (a multi-line quoted argument of another program is no shell line)
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            words = list(lexer)  # `list; meshctl` -> "list", ";", "meshctl"
            commands: list[list[str]] = [[]]
            for word in words:
                if word in SEPARATORS:
                    commands.append([])
                else:
                    commands[-1].append(word)
            for argv in commands:
                if not argv or "..." in argv:
                    continue
                program = Path(argv[0]).name
                if program != "meshctl" and program not in SERVERS:
                    continue
                while len(argv) > 1 and argv[-2] in REDIRECTIONS:  # `> policy.yaml`
                    argv = argv[:-2]
                found.append([program, *argv[1:]])
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
    assert lines or doc not in SHOW_COMMANDS, f"{doc} shows no meshserve command"
    for argv in lines:
        eager = EAGER & set(argv)
        if eager and argv[0] == "meshctl":
            root: Any = typer.main.get_command(build())
            assert eager <= {opt for param in root.params for opt in param.opts}, argv
        elif eager:
            assert eager <= set(SERVERS[argv[0]]()._option_string_actions), argv
        elif argv[0] == "meshctl":
            parse_meshctl(argv)
        else:
            SERVERS[argv[0]]().parse_args(argv[1:])
