"""``POST /api/commands/{id}/cancel`` end to end: real API (PostgreSQL), NATS, gateway, agent, SSH worker and
sshd. The command spawns a child (``sleep & sleep``); after the cancel no process of it exists on the
machine (the agent and sshd both run here, so /proc shows them), the run says ``cancelled`` and the REST
caller of the exec gets that row; a finished run keeps its result; a forged cancel on NATS kills nothing."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.api.settings import ApiSettings
from services.ctl import admin
from services.dev.procs import Proc
from shared import signing, subjects
from shared.errors import ErrorCode
from shared.ids import CommandId
from shared.protocol import CancelRequest, ErrorReply, decode_cancel_reply, encode
from tests.support.db import fresh_database
from tests.support.natsserver import NatsServer
from tests.support.sshd import Sshd
from tests.support.stack import Stack
from tests.support.trust import TestSigner

pytestmark = pytest.mark.e2e


@dataclass
class Fleet:
    """Host `box`, reachable by agent and by SSH, behind a real API."""

    stack: Stack
    http: httpx.AsyncClient
    agent: Proc

    async def wait_agent(self, connected: bool) -> None:
        for _ in range(100):
            answer = await self.http.get("/api/agents/box")
            if answer.status_code == 200 and answer.json()["connected"] is connected:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"agent never became connected={connected}")

    def exec_in_background(self, command: str, timeout: float = 90) -> asyncio.Task[httpx.Response]:
        body = {"command": command, "timeout": timeout}
        return asyncio.create_task(self.http.post("/api/hosts/box/exec", json=body, timeout=timeout + 30))

    async def pending_id(self) -> str:
        for _ in range(100):
            runs = (await self.http.get("/api/hosts/box/commands")).json()
            pending = [r["command_id"] for r in runs if r["status"] == "pending"]
            if pending:
                assert len(pending) == 1, runs
                return str(pending[0])
            await asyncio.sleep(0.05)
        raise AssertionError("no pending run")

    async def cancel(self, command_id: str) -> httpx.Response:
        return await self.http.post(f"/api/commands/{command_id}/cancel", timeout=60)


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
                host = {"id": "box", "address": "127.0.0.1", "ssh_port": sshd.port, "ssh_user": sshd.username}
                added = await http.post("/api/hosts", json=host)
                assert added.status_code == 201, added.text
                token = stack.agent_token(api, "box")
                identity = tmp_path / "box-agent.key"
                agent_key, _ = signing.ensure_private(identity)
                settings = ApiSettings(database_url=db_url, api_key_file=tmp_path / "unused-api-key")
                await admin.register_agent_key(settings, "box", signing.public_text(agent_key))
                agent = stack.start_agent(
                    "box-agent", "box", token, [gw.url], identity_key_file=str(identity)
                )
                fleet = Fleet(stack, http, agent)
                await fleet.wait_agent(True)
                yield fleet
                stack.close()
    finally:
        sshd.stop()


def unique_sleep() -> str:
    """A sleep length no other process has in its argv: the marker the test looks for in /proc."""
    return f"{random.randint(300, 399)}.{random.randint(100000, 999999)}"


def pids_with(marker: str) -> list[int]:
    """Live processes (a zombie's cmdline is empty) whose argv contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


async def wait_running(marker: str, at_least: int = 3, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while len(pids_with(marker)) < at_least:
        assert time.monotonic() < deadline, pids_with(marker)
        await asyncio.sleep(0.05)


async def cancel_and_check(fleet: Fleet, marker: str, via: str) -> None:
    """Run a command with a background child, cancel it; nothing of it survives; the run is cancelled."""
    running = fleet.exec_in_background(f"echo started; sleep {marker} & sleep {marker}; echo never")
    await wait_running(marker)
    command_id = await fleet.pending_id()
    started = time.monotonic()
    answer = await fleet.cancel(command_id)
    assert answer.status_code == 200, answer.text
    took = time.monotonic() - started
    run = answer.json()
    assert (run["command_id"], run["status"], run["via"], run["signal"]) == (command_id, "cancelled", via, 9)
    assert run["stdout"] == "started\n"  # the output produced before the kill is kept
    assert pids_with(marker) == []  # the shell, the background sleep and the foreground sleep are gone
    exec_answer = await asyncio.wait_for(running, 30)  # the REST caller of the exec gets the cancelled row
    assert exec_answer.status_code == 200, exec_answer.text
    assert (exec_answer.json()["status"], exec_answer.json()["stdout"]) == ("cancelled", "started\n")
    recorded = (await fleet.http.get(f"/api/commands/{command_id}")).json()
    assert recorded["status"] == "cancelled"
    again = await fleet.cancel(command_id)  # a final run keeps its result
    assert again.status_code == 409, again.text
    assert (again.json()["code"], again.json()["run"]["status"]) == ("finished", "cancelled")
    print(f"cancel via {via}: {took * 1000:.0f} ms from POST to the cancelled row")


async def test_cancel_on_the_agent_path_kills_the_process_tree(fleet: Fleet) -> None:
    await cancel_and_check(fleet, unique_sleep(), "agent")


async def test_cancel_over_ssh_kills_the_remote_process_tree(fleet: Fleet) -> None:
    assert fleet.agent.stop() == 0
    await fleet.wait_agent(False)
    await cancel_and_check(fleet, unique_sleep(), "ssh")


async def test_cancelling_a_job_kills_its_runs_in_flight(fleet: Fleet) -> None:
    """A job cancel stops further batches and kills what is running: the run ends `cancelled`, the
    process tree is gone, and the job reads cancelled."""
    marker = unique_sleep()
    body = {"command": f"sleep {marker} & sleep {marker}", "timeout": 90, "targets": {"hosts": ["box"]}}
    created = await fleet.http.post("/api/jobs", json=body)
    assert created.status_code == 202, created.text
    job_id = created.json()["job_id"]
    await wait_running(marker)
    cancelled = await fleet.http.post(f"/api/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled"
    deadline = time.monotonic() + 15
    while True:
        job = (await fleet.http.get(f"/api/jobs/{job_id}")).json()
        [outcome] = job["outcomes"]
        if outcome["status"] == "cancelled":
            break
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.1)
    assert (outcome["via"], outcome["signal"]) == ("agent", 9)
    assert pids_with(marker) == []


async def test_a_finished_command_keeps_its_result_and_an_unknown_id_is_404(fleet: Fleet) -> None:
    done = await fleet.http.post("/api/hosts/box/exec", json={"command": "echo done"})
    assert done.json()["status"] == "succeeded"
    answer = await fleet.cancel(done.json()["command_id"])
    assert answer.status_code == 409, answer.text
    body = answer.json()
    assert (body["code"], body["run"]["status"], body["run"]["stdout"]) == ("finished", "succeeded", "done\n")
    recorded = (await fleet.http.get(f"/api/commands/{done.json()['command_id']}")).json()
    assert recorded == done.json()
    missing = await fleet.cancel("no-such-command")
    assert missing.status_code == 404, missing.text


async def test_a_forged_or_unsigned_cancel_on_nats_is_refused_by_the_agent(
    fleet: Fleet, nats_server: NatsServer, tmp_path: Path
) -> None:
    """With the api's NATS credentials but without the API's key: unsigned, signed by another key, signed
    for another host, or expired, the agent refuses with the typed code and the command keeps running."""
    marker = unique_sleep()
    running = fleet.exec_in_background(f"sleep {marker} & sleep {marker}")
    await wait_running(marker, at_least=2)
    command_id = CommandId(await fleet.pending_id())
    plain = CancelRequest(command_id=command_id)
    stranger = TestSigner(tmp_path, name="stranger.key")
    api_signer = fleet.stack.signer
    expired = signing.sign_command(api_signer.key, "cancel", signing.signed_fields(plain), "box", 1.0, 1000.0)
    forged = [
        (plain, ErrorCode.UNSIGNED),
        (stranger.sign("cancel", plain, "box"), ErrorCode.UNKNOWN_KEY),
        (api_signer.sign("cancel", plain, "other"), ErrorCode.WRONG_HOST),
        (plain.model_copy(update={"signature": expired}), ErrorCode.EXPIRED),
        (api_signer.sign("exec", plain, "box"), ErrorCode.BAD_SIGNATURE),
    ]
    nc = await nats_server.connect("api")
    try:
        for request, code in forged:
            reply = await nc.request(subjects.agent_cancel("box"), encode(request), timeout=10)
            answer: Any = decode_cancel_reply(reply.data)
            assert isinstance(answer, ErrorReply), answer
            assert answer.code == code, answer
    finally:
        await nc.close()
    await asyncio.sleep(0.2)
    assert len(pids_with(marker)) >= 2  # nothing was killed
    assert (await fleet.http.get(f"/api/commands/{command_id}")).json()["status"] == "pending"
    answer = await fleet.cancel(command_id)  # the API's own cancel does it
    assert answer.status_code == 200, answer.text
    assert pids_with(marker) == []
    assert (await running).json()["status"] == "cancelled"
