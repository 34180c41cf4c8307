"""The user docs hold together (issue 17 item 8): the LICENSE is the license pyproject declares,
docs/index.md maps every doc, every relative link of the docs and the README leads to a file,
docs/policy-reference.md documents every field of the policy's ``monitoring`` section and its
``webhook`` (read from the pydantic models that parse them), and docs/monitoring.md says to
apply the policy holding those settings and how the profile's ``.npz`` is keyed.

The docs' command lines are parsed by the real CLIs in tests/integration/test_docs_walkthrough.py;
the walkthrough and the README's quick-start query run against real meshes there and in
tests/integration/test_meshctl.py."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from meshserve.common.policy.spec import MonitoringSpec, WebhookSpec

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
USER_DOCS = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_license_file_is_the_license_pyproject_declares() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    head = " ".join(text.split()[:4])
    assert head == "Apache License Version 2.0,", head
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_index_maps_every_doc() -> None:
    index = (DOCS / "index.md").read_text()
    mapped = set(re.findall(r"^- \[([\w.-]+)\]\(\1\)", index, re.MULTILINE))
    docs = {p.name for p in DOCS.glob("*.md")}
    assert docs <= mapped, f"not in the map of docs/index.md: {sorted(docs - mapped)}"


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:|#", target):  # a URL or an anchor on the page
            continue
        if not (doc.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert broken == []


def _documented_fields(section: str) -> set[str]:
    """The field names in the first column of the Markdown tables of ``section``."""
    return set(re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE))


@pytest.mark.parametrize("spec", [MonitoringSpec, WebhookSpec])
def test_the_policy_reference_documents_every_monitoring_field(spec: type[BaseModel]) -> None:
    text = (DOCS / "policy-reference.md").read_text()
    section = text[text.index("\n## Monitoring\n") :]
    section = section[: section.index("\n## ", 1)]
    missing = set(spec.model_fields) - _documented_fields(section)
    assert missing == set(), f"{spec.__name__}: {sorted(missing)}"


def test_the_monitoring_doc_says_to_apply_the_policy_and_how_the_npz_is_keyed() -> None:
    text = " ".join((DOCS / "monitoring.md").read_text().split())
    assert "meshctl policy apply" in text  # settings in a policy file do nothing until applied
    assert "policy-reference.md" in text  # where the fields are
    assert re.search(
        r"\.npz` holds the model's inputs only, each array under its input's name", text
    )


def test_the_monitoring_doc_states_the_trace_sampling_default() -> None:
    """What common/process.py's default_sampler does (tests/unit/test_process.py pins it): an
    exporter with no OTEL_TRACES_SAMPLER traces every query; a ratio is set explicitly."""
    text = " ".join((DOCS / "monitoring.md").read_text().split())
    assert (
        "**Sampling default.** With an exporter and no `OTEL_TRACES_SAMPLER`, every query" in text
    )
    assert "`parentbased_always_on`" in text and "parentbased_traceidratio" in text
