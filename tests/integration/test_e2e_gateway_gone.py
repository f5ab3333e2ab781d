"""A caller waiting on an agent whose gateway was SIGKILLed stops waiting within the silence bound.

Real `warlock-api` (SQLite), two gateways and an agent process on a real nats-server with the permission
matrix. The command keeps running on the host (only the gateway dies); the REST caller gets a may-have-run
row (`timed_out` / `disconnected`) within `gateway_silence` + 1 s + slack instead of the command's timeout;
nothing is re-sent (the host ran it once), and the result the agent re-sends through the second gateway
settles the row.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.api.settings import ApiSettings
from services.ctl import admin
from shared import signing
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e
SILENCE_S = 3.0
SLACK_S = 2.0  # this machine's 2 shared cores


async def _agent(http: httpx.AsyncClient) -> dict[str, Any]:
    answer = await http.get("/api/agents/box")
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()
    return data


async def test_caller_of_a_killed_gateway_returns_within_the_silence_bound(
    stack: Stack, tmp_path: Path
) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'api.db'}"
    api = stack.start_api(db_url, gateway_silence=str(SILENCE_S))
    gw1 = stack.start_gateway("gw1", heartbeat_interval="0.5")
    gw2 = stack.start_gateway("gw2", heartbeat_interval="0.5")
    ran = tmp_path / "ran.txt"
    async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=60) as http:
        added = await http.post("/api/hosts", json={"id": "box", "address": "127.0.0.1", "ssh_check": False})
        assert added.status_code == 201, added.text
        token = await asyncio.to_thread(stack.agent_token, api, "box")
        identity = tmp_path / "box-agent.key"
        key, _ = signing.ensure_private(identity)
        settings = ApiSettings(database_url=db_url, api_key_file=tmp_path / "unused-api-key")
        await admin.register_agent_key(settings, "box", signing.public_text(key))
        agent = await asyncio.to_thread(
            stack.start_agent, "box-agent", "box", token, [gw1.url, gw2.url], identity_key_file=str(identity)
        )
        deadline = time.monotonic() + 10
        while not ((row := await _agent(http))["connected"] and row["gateway_id"] == "gw1"):
            assert time.monotonic() < deadline, f"the agent never read connected through gw1: {row}"
            await asyncio.sleep(0.1)

        command = f"echo ran >> {ran}; sleep 10; echo finished"
        caller = asyncio.create_task(
            http.post("/api/hosts/box/exec", json={"command": command, "timeout": 30})
        )
        deadline = time.monotonic() + 10
        while not ran.exists():
            assert time.monotonic() < deadline, "the command never started on the host"
            assert not caller.done(), caller.result().text
            await asyncio.sleep(0.05)
        gw1.proc.signal(signal.SIGKILL)
        killed = time.monotonic()
        answer = await asyncio.wait_for(caller, timeout=SILENCE_S + 1 + SLACK_S + 5)
        waited = time.monotonic() - killed
        print(f"caller answered {waited:.2f}s after the gateway SIGKILL (silence {SILENCE_S}s)")
        assert answer.status_code == 200, answer.text
        run = answer.json()
        assert (run["status"], run["via"], run["error_code"]) == ("timed_out", "agent", "disconnected"), run
        assert "may have run" in run["error_description"]
        assert "gw1" in run["error_description"]
        assert waited <= SILENCE_S + 1 + SLACK_S, f"the caller waited {waited:.1f}s after the gateway died"
        assert "caller(s) stop waiting" in api.proc.log()

        # the agent is back through gw2; the result it re-sends from its outbox settles the row
        deadline = time.monotonic() + 20
        while (stored := (await http.get(f"/api/commands/{run['command_id']}")).json())[
            "status"
        ] != "succeeded":
            assert time.monotonic() < deadline, f"the late result never settled the row: {stored}"
            await asyncio.sleep(0.2)
        assert (stored["via"], stored["exit_code"], stored["stdout"]) == ("agent", 0, "finished\n")
        assert (await _agent(http))["gateway_id"] == "gw2"
        assert ran.read_text() == "ran\n"  # ran once: never re-sent, not over SSH, not through gw2
        assert agent.count(r"replay") == 0
