"""Fixtures: a real nats-server per test and the real Warlock processes around it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from tests.support.natsserver import NatsServer
from tests.support.stack import Stack


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server on a free port enforcing the permission matrix, stopped after the test."""
    server = NatsServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A nats-py client connected to the test's nats-server as the ``api`` role (plays the API)."""
    client = await nats_server.connect("api", max_reconnect_attempts=2)
    yield client
    await client.drain()


@pytest.fixture
def stack(tmp_path: Path, nats_server: NatsServer) -> Iterator[Stack]:
    """Starts real authority, gateway and agent processes; stops them after the test."""
    s = Stack(tmp_path, nats_server.url)
    yield s
    s.close()
