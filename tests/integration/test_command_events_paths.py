"""Three browser-stream paths end to end, seen by a browser on ``/api/ws`` (the `websockets` client): real
`warlock-api` processes, nats-server, gateway, agent, SSH workers and sshd.

- A late reply: the REST caller of an exec was answered ``timed_out`` / ``disconnected`` (its gateway went
  silent: SIGSTOPped), then the gateway resumes and the agent's result arrives on the runner's own request
  (`Runner._listen_late`): ``finished timed_out`` then one ``finished succeeded``, nothing more.
- Cancels: on the agent path one ``finished cancelled``; over SSH when another worker of the queue group took
  the cancel (the running worker's result says only "killed by SIGKILL"), the runner knows it sent that
  cancel (`Runner.ssh_cancels`) and records ``cancelled``: one ``finished cancelled``, nothing more, and the
  REST caller of the exec gets the same ``cancelled`` row as the cancel.
- The database cannot check a ticket (PostgreSQL refuses connections to the API's database): the socket is
  closed 1013, ``/healthz`` answers 503 naming the database, no traceback is logged; once the database is
  back a new ticket opens a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from shared import subjects
from tests.integration.test_browser_ws import closed_with, next_event, request, ticket, ws_url
from tests.integration.test_cancel import pids_with, unique_sleep, wait_running
from tests.integration.test_fallback_exec import StartWorker, sshd, start_worker
from tests.support.db import create_pg_database, drop_pg_database, pg_admin, pg_url
from tests.support.sshd import Sshd
from tests.support.stack import Api, Gateway, Stack

__all__ = ["sshd", "start_worker"]  # fixtures of test_fallback_exec.py

pytestmark = pytest.mark.e2e

SILENCE_S = 1.5  # the API's gateway_silence: a SIGSTOPped gateway is given up on after this
QUIET_S = 1.5  # how long "nothing more" is watched for
EVENT_FIELDS = ("event", "command_id", "status", "via", "exit_code")


@dataclass
class Panel:
    """An API on SQLite with one gateway (heartbeats every 0.3 s) and host `box` (no agent yet)."""

    stack: Stack
    api: Api
    gateway: Gateway
    http: httpx.AsyncClient

    @contextlib.asynccontextmanager
    async def browser(self, host: str) -> AsyncIterator[ClientConnection]:
        """A browser subscribed to the command events of `host`."""
        async with connect(ws_url(self.api, await ticket(self.http))) as ws:
            assert (await request(ws, type="subscribe", topic="commands", host=host, id=1))["type"] == "ack"
            yield ws

    async def pending_id(self, host: str) -> str:
        for _ in range(200):
            runs = (await self.http.get(f"/api/hosts/{host}/commands")).json()
            pending = [r["command_id"] for r in runs if r["status"] == "pending"]
            if pending:
                assert len(pending) == 1, runs
                return str(pending[0])
            await asyncio.sleep(0.05)
        raise AssertionError("no pending run")

    def exec_in_background(self, host: str, command: str) -> asyncio.Task[httpx.Response]:
        body = {"command": command, "timeout": 60}
        return asyncio.create_task(self.http.post(f"/api/hosts/{host}/exec", json=body, timeout=90))


@pytest.fixture
async def panel(stack: Stack, tmp_path: Path) -> AsyncIterator[Panel]:
    api = stack.start_api(f"sqlite+aiosqlite:///{tmp_path / 'api.db'}", gateway_silence=str(SILENCE_S))
    gateway = stack.start_gateway("gw1", heartbeat_interval="0.3")
    async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=30) as http:
        added = await http.post("/api/hosts", json={"id": "box", "address": "10.0.0.1", "ssh_check": False})
        assert added.status_code == 201, added.text
        yield Panel(stack, api, gateway, http)


async def finished_events(ws: ClientConnection, command_id: str, last: str) -> list[dict[str, Any]]:
    """The ``finished`` events of `command_id` until one says `last`, then whatever else comes within
    `QUIET_S` (which should be nothing); each as ``data`` restricted to `EVENT_FIELDS`."""
    got: list[dict[str, Any]] = []
    while not got or got[-1]["status"] != last:
        frame = await next_event(ws, "commands", timeout=20)
        if frame["data"]["command_id"] == command_id and frame["data"]["event"] == "finished":
            got.append({k: frame["data"][k] for k in EVENT_FIELDS})
    deadline = time.monotonic() + QUIET_S
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = await next_event(ws, "commands", timeout=left)
        except TimeoutError:
            break
        if frame["data"]["command_id"] == command_id:
            got.append({k: frame["data"][k] for k in EVENT_FIELDS})
    return got


def finished(command_id: str, status: str, via: str | None, exit_code: int | None) -> dict[str, Any]:
    return {
        "event": "finished",
        "command_id": command_id,
        "status": status,
        "via": via,
        "exit_code": exit_code,
    }


async def test_a_reply_after_the_caller_gave_up_settles_the_run_and_is_announced_once(
    panel: Panel, tmp_path: Path
) -> None:
    """The gateway is SIGSTOPped while the command runs: after the silence bound the REST caller gets
    ``timed_out`` / ``disconnected``; SIGCONT, and the agent's result reaches the runner's request, which
    is still listening: the row says succeeded and the browser got that ``finished`` once."""
    await panel.stack.start_known_agent(panel.api, "box-agent", "box", [panel.gateway.url])
    for _ in range(100):
        agent = (await panel.http.get("/api/agents/box")).json()
        if agent["connected"] and agent["gateway_id"] == "gw1":
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"the agent never read connected through gw1: {agent}")
    started = tmp_path / "started"
    async with panel.browser("box") as ws:
        caller = panel.exec_in_background("box", f"touch {started}; sleep 1; echo late")
        for _ in range(200):
            if started.exists():
                break
            assert not caller.done(), caller.result().text
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the command never started on the host")
        panel.gateway.proc.signal(signal.SIGSTOP)
        try:
            answer = await asyncio.wait_for(caller, SILENCE_S + 10)
        finally:
            panel.gateway.proc.signal(signal.SIGCONT)
        assert answer.status_code == 200, answer.text
        run = answer.json()
        assert (run["status"], run["via"], run["error_code"]) == ("timed_out", "agent", "disconnected"), run
        command_id = run["command_id"]
        events = await finished_events(ws, command_id, "succeeded")
    assert events == [
        finished(command_id, "timed_out", "agent", None),  # the runner's own outcome
        finished(command_id, "succeeded", "agent", 0),  # the late reply (`Runner._listen_late`)
    ]
    stored = (await panel.http.get(f"/api/commands/{command_id}")).json()
    assert (stored["status"], stored["via"], stored["stdout"]) == ("succeeded", "agent", "late\n")
    log = panel.api.proc.log()
    assert f"late reply for command {command_id} recorded" in log  # on the request, not warlock.result
    assert "Traceback" not in log


async def test_a_cancel_on_the_agent_path_is_announced_once(panel: Panel) -> None:
    await panel.stack.start_known_agent(panel.api, "box-agent", "box", [panel.gateway.url])
    marker = unique_sleep()
    async with panel.browser("box") as ws:
        caller = panel.exec_in_background("box", f"sleep {marker}")
        await wait_running(marker, at_least=1)
        command_id = await panel.pending_id("box")
        answer = await panel.http.post(f"/api/commands/{command_id}/cancel", timeout=60)
        assert answer.status_code == 200, answer.text
        assert (answer.json()["status"], answer.json()["via"]) == ("cancelled", "agent")
        assert (await asyncio.wait_for(caller, 30)).json()["status"] == "cancelled"
        events = await finished_events(ws, command_id, "cancelled")
    assert events == [finished(command_id, "cancelled", "agent", None)]
    assert pids_with(marker) == []


@dataclass
class OtherWorkerCancel:
    """What a cancel taken by another SSH worker than the one running the command left behind."""

    command_id: str
    cancel_answer: dict[str, Any]  # the body of POST /api/commands/{id}/cancel
    exec_answer: dict[str, Any]  # the body the REST caller of the exec got
    events: list[dict[str, Any]]  # the browser's finished events of the run
    stored: dict[str, Any]  # GET /api/commands/{id} afterwards
    marker: str  # in the argv of the command's processes


async def cancel_taken_by_another_worker(
    panel: Panel, sshd: Sshd, start_worker: StartWorker
) -> OtherWorkerCancel:
    """Worker `runs-it` runs ``sleep <marker>`` over SSH on host `far`; the cancel reaches worker
    `cancels-it` (`runs-it` dropped its cancel subscription: the queue group's cancels go to the other
    worker, as they may with any two workers), which kills the remote processes."""
    trusted = [panel.stack.signer.public_key]
    runs_it = await start_worker(trusted_keys=trusted, worker_id="runs-it")
    host = {"id": "far", "address": "127.0.0.1", "ssh_port": sshd.port, "ssh_user": sshd.username}
    added = await panel.http.post("/api/hosts", json=host)  # probed through runs-it: the host key pinned
    assert added.status_code == 201, added.text
    (cancels,) = [s for s in runs_it._subs if s.subject == subjects.ssh_cancel_wildcard()]
    await cancels.unsubscribe()
    await runs_it.nc.flush()
    marker = unique_sleep()
    async with panel.browser("far") as ws:
        caller = panel.exec_in_background("far", f"sleep {marker}")
        await wait_running(marker, at_least=1)
        command_id = await panel.pending_id("far")
        await start_worker(trusted_keys=trusted, worker_id="cancels-it")
        answer = await panel.http.post(f"/api/commands/{command_id}/cancel", timeout=60)
        assert answer.status_code == 200, answer.text
        exec_answer = await asyncio.wait_for(caller, 30)
        assert exec_answer.status_code == 200, exec_answer.text
        events = await finished_events(ws, command_id, "cancelled")
    stored = (await panel.http.get(f"/api/commands/{command_id}")).json()
    return OtherWorkerCancel(command_id, answer.json(), exec_answer.json(), events, stored, marker)


async def test_a_cancel_taken_by_another_ssh_worker_is_announced_cancelled_once(
    panel: Panel, sshd: Sshd, start_worker: StartWorker
) -> None:
    """`runs-it`'s result says only "killed by SIGKILL"; the runner sent the cancel, so it records
    ``cancelled`` (not ``failed``): the browser gets one ``finished cancelled``, the REST caller of the
    exec and the cancel get the same row, and nothing of the command survives. Before the fix the caller
    got ``failed`` and the browser ``failed`` then ``cancelled``."""
    done = await cancel_taken_by_another_worker(panel, sshd, start_worker)
    command_id = done.command_id
    run = done.cancel_answer
    assert (run["status"], run["via"], run["signal"]) == ("cancelled", "ssh", 9), run
    assert done.exec_answer["status"] == "cancelled", done.exec_answer
    assert done.exec_answer["signal"] == 9
    assert done.events == [finished(command_id, "cancelled", "ssh", None)]
    assert (done.stored["status"], done.stored["signal"]) == ("cancelled", 9)
    assert pids_with(done.marker) == []


async def _database_down(name: str) -> None:
    """No new connection to database `name` (superusers included), and its open ones ended."""
    await pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    await pg_admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")


async def _database_up(name: str) -> None:
    await pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


async def test_a_ticket_the_database_cannot_check_closes_1013_and_the_api_keeps_serving(
    stack: Stack,
) -> None:
    """The API's own PostgreSQL database refuses connections (``ALLOW_CONNECTIONS false``, its backends
    terminated): a ticket presented then closes its socket 1013; ``/healthz`` answers 503 naming the
    database; a ticket request is a 503 JSON answer; the key check of open sockets fails and keeps them
    open (an open socket still answers pings); no traceback is logged. The database back, a new ticket
    opens a socket."""
    name = await create_pg_database()  # this test's own database: only its API loses it
    try:
        api = stack.start_api(pg_url(name), auth_cache_ttl="1")  # keys of open sockets checked every 0.5 s
        async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=30) as http:
            assert (await http.get("/healthz")).status_code == 200
            waiting = await ticket(http)
            async with connect(ws_url(api, await ticket(http))) as steady:
                assert (await request(steady, type="ping", id=1))["type"] == "pong"
                await _database_down(name)
                try:
                    began = time.monotonic()
                    code, reason = await closed_with(ws_url(api, waiting))
                    took = time.monotonic() - began
                    assert (code, reason) == (1013, "database unavailable: retry with a new ticket")
                    health = await http.get("/healthz")
                    assert health.status_code == 503, health.text
                    assert health.json()["database"].startswith("error"), health.json()
                    assert health.json()["nats"] == "ok"
                    refused = await http.post("/api/ws-tickets")  # no ticket without the database
                    assert refused.status_code == 503, refused.text
                    assert "database" in refused.json()["detail"], refused.json()
                    for _ in range(100):  # the periodic key check meets the outage ...
                        if "keys of open connections not checked" in api.proc.log():
                            break
                        await asyncio.sleep(0.05)
                    else:
                        raise AssertionError("the key check never met the outage")
                    assert (await request(steady, type="ping", id=2))["type"] == "pong"  # ... and keeps it
                finally:
                    await _database_up(name)
                print(f"1013 {took * 1000:.0f} ms after the socket was opened")
                for _ in range(100):
                    if (await http.get("/healthz")).status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("the API never read the database again")
                async with connect(ws_url(api, await ticket(http))) as ws:  # a new ticket works again
                    assert (await request(ws, type="ping", id=1))["type"] == "pong"
                assert (await request(steady, type="ping", id=3))["type"] == "pong"
        log = api.proc.log()
        assert "browser stream ticket not checked: database unavailable" in log
        assert "Traceback" not in log
        assert waiting not in log
    finally:
        stack.close()  # the API lets go of the database before it is dropped
        await drop_pg_database(name)
