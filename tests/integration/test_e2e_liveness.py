"""Stale presence end to end: a live gateway's heartbeats keep its agent connected past the API's silence
bound; a SIGKILLed gateway (which publishes no disconnect) has its agent marked disconnected within it.

Real `warlock-api` (SQLite), gateway and agent processes on a real nats-server with the permission matrix.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest

from services.api.settings import ApiSettings
from services.ctl import admin
from shared import signing
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e
SILENCE_S = 2.0


async def _connected(http: httpx.AsyncClient) -> bool:
    return bool((await http.get("/api/agents/box")).json()["connected"])


async def test_heartbeats_keep_presence_and_a_killed_gateway_loses_it(stack: Stack, tmp_path: Path) -> None:
    """Connected for 3× the silence bound while the gateway beats every 0.5 s; after SIGKILL of the gateway,
    disconnected within silence + 1 s check + slack; the agent itself was never told anything."""
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'api.db'}"
    api = stack.start_api(db_url, gateway_silence=str(SILENCE_S))
    gateway = stack.start_gateway(heartbeat_interval="0.5")
    async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=30) as http:
        added = await http.post("/api/hosts", json={"id": "box", "address": "127.0.0.1", "ssh_check": False})
        assert added.status_code == 201, added.text
        token = await asyncio.to_thread(stack.agent_token, api, "box")
        identity = tmp_path / "box-agent.key"
        key, _ = signing.ensure_private(identity)
        settings = ApiSettings(database_url=db_url, api_key_file=tmp_path / "unused-api-key")
        await admin.register_agent_key(settings, "box", signing.public_text(key))
        await asyncio.to_thread(
            stack.start_agent, "box-agent", "box", token, [gateway.url], identity_key_file=str(identity)
        )
        deadline = time.monotonic() + 10
        while not await _connected(http):
            assert time.monotonic() < deadline, "the agent never read connected"
            await asyncio.sleep(0.1)
        held_until = time.monotonic() + 3 * SILENCE_S
        while time.monotonic() < held_until:  # heartbeats keep it
            assert await _connected(http)
            await asyncio.sleep(0.25)
        gateway.proc.signal(signal.SIGKILL)
        killed = time.monotonic()
        while await _connected(http):
            assert time.monotonic() - killed < SILENCE_S + 4, "still connected long after the gateway died"
            await asyncio.sleep(0.1)
        assert time.monotonic() - killed <= SILENCE_S + 1 + 2  # the stated bound, with slack for this machine
        assert "marked disconnected" in api.proc.log()
