"""End to end through the REST API: real API, gateway, agent, SSH worker, sshd, PostgreSQL and NATS."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.api.settings import ApiSettings
from services.ctl import admin
from services.dev.procs import Proc
from shared import signing
from tests.support.db import fresh_database
from tests.support.sshd import Sshd
from tests.support.stack import Api, Stack

pytestmark = pytest.mark.e2e
FINAL = {"succeeded", "failed", "timed_out", "undeliverable"}


@dataclass
class Fleet:
    """One host `box` reachable both by agent and by SSH, behind a real API."""

    stack: Stack
    api: Api
    http: httpx.AsyncClient
    sshd: Sshd
    agent: Proc
    gateway_url: str

    async def exec(self, command: str, timeout: float = 10.0) -> dict[str, Any]:
        """POST /api/hosts/box/exec and return the JSON answer (asserting 200)."""
        answer = await self.http.post("/api/hosts/box/exec", json={"command": command, "timeout": timeout})
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    async def wait_agent(self, connected: bool) -> None:
        """Wait until the API's AgentConnection for `box` says `connected`."""
        for _ in range(100):
            answer = await self.http.get("/api/agents/box")
            if answer.status_code == 200 and answer.json()["connected"] is connected:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"agent never became connected={connected}: {answer.text}")


@pytest.fixture
async def fleet(stack: Stack, tmp_path: Path) -> AsyncIterator[Fleet]:
    """API on a fresh PostgreSQL database, SSH worker, gateway, sshd and an agent for host `box`."""
    sshd = Sshd(tmp_path / "sshd")
    try:
        async with fresh_database("postgresql", tmp_path) as db_url:
            api = stack.start_api(db_url)
            stack.start_fallback(sshd.client_key_path)
            gw = stack.start_gateway()
            async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=60) as http:
                added = await http.post(
                    "/api/hosts",
                    json={
                        "id": "box",
                        "address": "127.0.0.1",
                        "ssh_port": sshd.port,
                        "ssh_user": sshd.username,
                    },
                )
                assert added.status_code == 201, added.text
                assert added.json()["host_key"].split()[:2] == sshd.host_key_line.split()[:2]
                assert added.json()["host_key_fingerprint"] == sshd.fingerprint()
                token = stack.agent_token(api, "box")
                # the agent's own key, registered with the API as an install would: its hello and
                # results count only if they verify with it
                identity = tmp_path / "box-agent.key"
                agent_key, _ = signing.ensure_private(identity)
                settings = ApiSettings(database_url=db_url, api_key_file=tmp_path / "unused-api-key")
                await admin.register_agent_key(settings, "box", signing.public_text(agent_key))
                agent = stack.start_agent(
                    "box-agent", "box", token, [gw.url], identity_key_file=str(identity)
                )
                fleet = Fleet(stack, api, http, sshd, agent, gw.url)
                await fleet.wait_agent(True)
                yield fleet
                stack.close()
    finally:
        sshd.stop()


async def test_agent_first_then_ssh_when_the_agent_is_gone(fleet: Fleet) -> None:
    """With an agent the answer says via agent; with the agent stopped the same call runs over SSH."""
    first = await fleet.exec("echo hello; exit 4")
    assert (first["via"], first["status"], first["exit_code"], first["stdout"]) == (
        "agent",
        "failed",
        4,
        "hello\n",
    )

    assert fleet.agent.stop() == 0
    await fleet.wait_agent(False)
    logins = fleet.sshd.accepted_logins()
    second = await fleet.exec("echo over-ssh; echo e >&2")
    assert (second["via"], second["status"], second["exit_code"]) == ("ssh", "succeeded", 0)
    assert (second["stdout"], second["stderr"]) == ("over-ssh\n", "e\n")
    assert fleet.sshd.accepted_logins() == logins + 1
    recorded = (await fleet.http.get(f"/api/commands/{second['command_id']}")).json()
    assert (recorded["via"], recorded["status"]) == ("ssh", "succeeded")
    third = await fleet.exec("echo again")
    assert third["via"] == "ssh"
    assert fleet.sshd.accepted_logins() == logins + 1  # the pooled connection was reused


async def test_hung_agent_times_out_and_never_runs_over_ssh(fleet: Fleet, tmp_path: Path) -> None:
    """An agent that holds its session but answers nothing: timed_out, and SSH never runs the command."""
    marker = tmp_path / "marker"
    logins = fleet.sshd.accepted_logins()
    fleet.agent.signal(signal.SIGSTOP)
    try:
        answer = await fleet.exec(f"echo ran >> {marker}", timeout=1)
    finally:
        fleet.agent.kill()  # never let the frozen agent run it late
    assert answer["status"] == "timed_out"
    assert answer["via"] in ("agent", None)
    assert not marker.exists()
    assert fleet.sshd.accepted_logins() == logins
    recorded = (await fleet.http.get(f"/api/commands/{answer['command_id']}")).json()
    assert recorded["status"] == "timed_out"


async def test_changed_host_key_is_refused_and_nothing_runs(fleet: Fleet, tmp_path: Path) -> None:
    """After the host's SSH key changes, the fallback refuses: typed error, the command never ran."""
    assert fleet.agent.stop() == 0
    await fleet.wait_agent(False)
    fleet.sshd.replace_host_key()
    marker = tmp_path / "marker"
    answer = await fleet.exec(f"touch {marker}")
    assert answer["status"] == "failed"
    assert answer["error_code"] == "host_key_mismatch"
    assert not marker.exists()


async def test_bad_requests_get_4xx_json(fleet: Fleet) -> None:
    """No key / wrong key → 401; unknown host → 404; bad bodies → 422; each with a JSON body."""
    async with httpx.AsyncClient(base_url=fleet.api.url, timeout=30) as anonymous:
        assert (await anonymous.get("/api/hosts")).status_code == 401
        wrong = await anonymous.get("/api/hosts", headers={"Authorization": "Bearer " + "f" * 43})
        assert wrong.status_code == 401
        assert "detail" in wrong.json()
    missing = await fleet.http.post("/api/hosts/nope/exec", json={"command": "true"})
    assert missing.status_code == 404
    for body in ({}, {"command": ""}, {"command": "x", "timeout": 0}, {"command": "x", "extra": 1}, [1]):
        bad = await fleet.http.post("/api/hosts/box/exec", json=body)
        assert bad.status_code == 422, (body, bad.text)
        assert "detail" in bad.json()
    by_address = await fleet.http.get("/api/hosts/127.0.0.1")
    assert by_address.json()["id"] == "box"


async def test_api_killed_mid_stream_loses_no_command(fleet: Fleet, tmp_path: Path) -> None:
    """Kill the API with commands in flight and restart it: every run is recorded, final or pending."""
    ran = tmp_path / "ran"
    calls = [
        asyncio.create_task(
            fleet.http.post("/api/hosts/box/exec", json={"command": f"echo {n} >> {ran}; sleep 2"})
        )
        for n in range(12)
    ]
    await asyncio.sleep(1.0)
    fleet.api.proc.kill()
    await asyncio.gather(*calls, return_exceptions=True)
    await asyncio.sleep(3)  # let every command that started finish on the host

    api = fleet.stack.start_api(fleet.api.database_url, name="api-restarted")
    async with httpx.AsyncClient(base_url=api.url, headers=fleet.api.auth, timeout=30) as http:
        rows = (await http.get("/api/hosts/box/commands", params={"limit": 100})).json()
    statuses = {row["status"] for row in rows}
    assert statuses <= FINAL | {"pending", "running"}
    commands = {row["command"] for row in rows}
    ran_numbers = ran.read_text().split() if ran.exists() else []
    assert ran_numbers, "no command started before the kill"
    for n in ran_numbers:
        assert f"echo {n} >> {ran}; sleep 2" in commands, f"command {n} ran but has no CommandRun row"
