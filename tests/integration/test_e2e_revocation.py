"""End to end: deleting a host and `warlock agent-token` close the live agent session (4003) for good.

Real `warlock-api` (SQLite), gateway and agent processes on a real nats-server; the token is issued with
the real `warlock agent-token` command.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats.errors
import pytest
from nats.aio.client import Client as NATS

from services.dev.procs import Proc
from shared import subjects
from shared.protocol import ExecRequest, ExecResult, decode_exec_reply
from tests.support.stack import Api, Gateway, Stack

pytestmark = pytest.mark.e2e

REVOKED = r"closed the session: token revoked"
REFUSED = r"token rejected by \S+ \(HTTP 401\)"


@dataclass
class Box:
    """Host `box` registered in a real API, its agent connected through a real gateway."""

    stack: Stack
    api: Api
    gateway: Gateway
    http: httpx.AsyncClient
    agent: Proc
    token: str


@pytest.fixture
async def box(stack: Stack, tmp_path: Path) -> AsyncIterator[Box]:
    """API, gateway, host `box` (no SSH check) with a token from `warlock agent-token`, agent connected."""
    api = stack.start_api(f"sqlite+aiosqlite:///{tmp_path / 'api.db'}")
    gateway = stack.start_gateway()
    async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=30) as http:
        added = await http.post("/api/hosts", json={"id": "box", "address": "127.0.0.1", "ssh_check": False})
        assert added.status_code == 201, added.text
        token = await asyncio.to_thread(stack.agent_token, api, "box")
        agent = await asyncio.to_thread(stack.start_agent, "box-agent", "box", token, [gateway.url])
        yield Box(stack, api, gateway, http, agent, token)


async def exec_on_nats(nc: NATS, stack: Stack) -> ExecResult | None:
    """`echo hi` on warlock.agent.box.exec, signed with the stack's API key: the result, or None on no
    responders (no session anywhere)."""
    body = stack.signer.exec_body("box", ExecRequest(command="echo hi"))
    try:
        msg = await nc.request(subjects.agent_exec("box"), body, timeout=5)
    except nats.errors.NoRespondersError:
        return None
    reply = decode_exec_reply(msg.data)
    assert isinstance(reply, ExecResult), reply
    return reply


async def stays_without_session(nc: NATS, stack: Stack, agent: Proc, seconds: float = 3.0) -> None:
    """For `seconds`, the agent keeps being refused (401) and no exec request finds a responder."""
    await asyncio.to_thread(agent.wait_for, REFUSED, 10)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert await exec_on_nats(nc, stack) is None
        await asyncio.sleep(0.2)
    assert agent.count(r"session \S+ established with") == 1


async def test_delete_host_closes_the_live_session(box: Box, nc: NATS) -> None:
    """DELETE /api/hosts/box: the gateway closes the agent's session with 4003, the agent cannot come
    back (401), and warlock.agent.box.exec has no responders."""
    before = await exec_on_nats(nc, box.stack)
    assert before is not None
    assert before.stdout == "hi\n"
    deleted = await box.http.delete("/api/hosts/box")
    assert deleted.status_code == 204
    await asyncio.to_thread(box.agent.wait_for, REVOKED, 5)
    assert "closing 4003: token revoked (every token)" in box.gateway.proc.log()
    await stays_without_session(nc, box.stack, box.agent)
    assert box.token not in box.api.proc.log() + box.gateway.proc.log()


async def test_agent_token_command_closes_the_old_session(box: Box, nc: NATS) -> None:
    """`warlock agent-token box` again: the session of the old token closes with 4003 and the old token is
    refused; an agent given the new token connects."""
    new = await asyncio.to_thread(box.stack.agent_token, box.api, "box")
    assert new != box.token
    await asyncio.to_thread(box.agent.wait_for, REVOKED, 5)
    await stays_without_session(nc, box.stack, box.agent)
    box.agent.stop()
    await asyncio.to_thread(box.stack.start_agent, "box-agent-new", "box", new, [box.gateway.url])
    after = await exec_on_nats(nc, box.stack)
    assert after is not None
    assert after.stdout == "hi\n"
