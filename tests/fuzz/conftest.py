"""Fixtures of the fuzz tests: one live mesh per module (see ``_support``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fuzz._support import LiveMesh, live_mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveMesh]:
    """Real etcd, a control plane and two nodes: ``edge`` (tunnel only) and ``core`` (also
    serves OIP directly); model ``mlp`` READY on both (so the gateway uses both paths)."""
    with live_mesh(tmp_path_factory.mktemp("mesh"), [("edge", False), ("core", True)]) as m:
        m.register_mlp("mlp", copies=2)
        m.baseline_rss = m.rss()
        yield m
