"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from meshserve.controlplane.etcd import connect
from tests.support.etcd import EtcdServer

# Fixtures shared by several test packages: ``webhook`` (a receiver on loopback).
pytest_plugins = ["tests.support.webhook"]


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    """A started single-member etcd on free loopback ports; stopped and removed after."""
    server = EtcdServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def client(etcd: EtcdServer) -> AsyncIterator[Any]:
    """An etcd client (our ``connect``) on the test's etcd; closed after."""
    c = await connect(etcd.url)
    try:
        yield c
    finally:
        await c.close()
