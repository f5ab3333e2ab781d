"""Stale presence: the agents of a gateway that stops sending heartbeats are marked disconnected within the
silence bound; those of a gateway that keeps beating stay connected. Real in-process API, real nats-server,
heartbeats and presence published with the gateway identity (as a SIGKILLed gateway leaves them)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from shared import subjects
from shared.protocol import GatewayHeartbeat, encode
from tests.support.db import RunningApi, api_settings, eventually, running_api
from tests.support.fakeagent import AgentKey, register_agent_key
from tests.support.natsserver import NatsServer

AGENTS = {"h1": AgentKey(), "h2": AgentKey()}
SILENCE_S = 1.5


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer, database: str) -> AsyncIterator[RunningApi]:
    """The API with a 1.5 s gateway silence bound; hosts h1 and h2 with their agent keys."""
    settings = api_settings(tmp_path, nats_server.url, database, gateway_silence=SILENCE_S)
    async with running_api(settings) as running:
        for n, host in enumerate(AGENTS):
            body = {"id": host, "address": f"10.0.0.{n + 1}", "ssh_check": False}
            assert (
                await running.client.post("/api/hosts", json=body, headers=running.auth)
            ).status_code == 201
            await register_agent_key(running, host, AGENTS[host].public_key)
        yield running


@pytest.fixture
async def gw(nats_server: NatsServer) -> AsyncIterator[NATS]:
    client = await nats_server.connect("gateway")
    yield client
    await client.close()


async def _beat(gw: NATS, gateway: str) -> None:
    beat = GatewayHeartbeat(gateway_id=gateway, sessions=1, interval=0.3, at=time.time())
    await gw.publish(subjects.gateway_heartbeat(gateway), encode(beat))


async def _connected(api: RunningApi, host: str) -> bool:
    answer = await api.client.get(f"/api/agents/{host}", headers=api.auth)
    return bool(answer.json()["connected"])


async def test_agents_of_a_silent_gateway_are_marked_disconnected(api: RunningApi, gw: NATS) -> None:
    """h1 on gw-dead (which stops beating), h2 on gw-live (which beats throughout): within the silence bound
    h1 reads disconnected, h2 stays connected; a heartbeat for another gateway's subject is ignored."""
    stop = asyncio.Event()

    async def keep_beating() -> None:
        while not stop.is_set():
            await _beat(gw, "gw-live")
            # a forged beat for gw-dead on gw-live's subject must not keep gw-dead alive
            forged = GatewayHeartbeat(gateway_id="gw-dead", sessions=1, interval=0.3, at=time.time())
            await gw.publish(subjects.gateway_heartbeat("gw-live"), encode(forged))
            await asyncio.sleep(0.3)

    beating = asyncio.create_task(keep_beating())
    try:
        await _beat(gw, "gw-dead")
        now = time.time()
        for host, gateway in (("h1", "gw-dead"), ("h2", "gw-live")):
            event = AGENTS[host].connected(host, f"s-{host}", now, gateway_id=gateway)
            await gw.publish(subjects.presence(host), encode(event))
        await gw.flush()
        await eventually(lambda: _connected(api, "h1"))
        await eventually(lambda: _connected(api, "h2"))
        silent_since = time.monotonic()  # gw-dead's last beat was before this

        async def h1_gone() -> bool:
            return not await _connected(api, "h1")

        await eventually(h1_gone, timeout=SILENCE_S + 5)
        took = time.monotonic() - silent_since
        assert took <= SILENCE_S + 2.5, took  # the bound: silence + the 1 s check period (+ slack)
        assert await _connected(api, "h2")
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
