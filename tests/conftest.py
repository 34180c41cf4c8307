"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.etcd import EtcdServer


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    """A started single-member etcd on free loopback ports; stopped and removed after."""
    server = EtcdServer()
    server.start()
    try:
        yield server
    finally:
        server.close()
