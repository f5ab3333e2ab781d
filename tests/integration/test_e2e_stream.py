"""Output as it happens, end to end: real API (two instances on one PostgreSQL), gateway, agent, SSH worker,
sshd and NATS; ``GET /api/commands/{id}/stream`` read as Server-Sent Events by an httpx client."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.msg import Msg

from services.api.settings import ApiSettings
from services.ctl import admin
from shared import signing, subjects
from shared.stream import COMMAND_BUDGET_BYTES
from tests.support.db import fresh_database
from tests.support.natsserver import NatsServer
from tests.support.sshd import Sshd
from tests.support.stack import Api, Stack

pytestmark = pytest.mark.e2e


@dataclass
class Event:
    """One SSE event as the client saw it, and when (monotonic)."""

    id: str | None
    event: str
    data: dict[str, Any]
    at: float


@dataclass
class Fleet:
    """Host `box` reachable by agent and by SSH, behind two API instances on one database."""

    stack: Stack
    api: Api
    api2: Api
    http: httpx.AsyncClient
    http2: httpx.AsyncClient
    sshd: Sshd
    agent_name: str = "box-agent"
    runs: set[str] = field(default_factory=set)

    def start(self, command: str, timeout: float = 30.0) -> asyncio.Task[httpx.Response]:
        """POST the exec in a task (it answers when the command ends)."""
        body = {"command": command, "timeout": timeout}
        return asyncio.create_task(self.http.post("/api/hosts/box/exec", json=body))

    async def running_id(self, command: str) -> str:
        """The id of the newest run of `command` once its row exists (written before anything is sent)."""
        for _ in range(500):
            rows = (await self.http.get("/api/hosts/box/commands", params={"limit": 20})).json()
            for row in rows:
                if row["command"] == command and row["command_id"] not in self.runs:
                    self.runs.add(row["command_id"])
                    return str(row["command_id"])
            await asyncio.sleep(0.005)
        raise AssertionError(f"no run of {command!r}")


async def read_events(
    http: httpx.AsyncClient,
    command_id: str,
    last_event_id: str | None = None,
    stop_after: int | None = None,
    into: list[Event] | None = None,
) -> list[Event]:
    """Read the stream to its end (or until `stop_after` output events, then hang up), into `into`."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    events: list[Event] = [] if into is None else into
    async with http.stream("GET", f"/api/commands/{command_id}/stream", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line.startswith((":", "retry:")):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if "event" in fields:
                events.append(
                    Event(fields.get("id"), fields["event"], json.loads(fields["data"]), time.monotonic())
                )
                if stop_after is not None and sum(e.event == "output" for e in events) >= stop_after:
                    break
            fields = {}
    return events


def chunks(events: list[Event], stream: str = "stdout") -> str:
    return "".join(e.data["data"] for e in events if e.event == "output" and e.data["stream"] == stream)


@pytest.fixture
async def fleet(stack: Stack, tmp_path: Path) -> AsyncIterator[Fleet]:
    sshd = Sshd(tmp_path / "sshd")
    try:
        async with fresh_database("postgresql", tmp_path) as db_url:
            api = stack.start_api(db_url)
            api2 = stack.start_api(db_url, name="api2")
            stack.start_fallback(sshd.client_key_path)
            gw = stack.start_gateway()
            async with (
                httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=60) as http,
                httpx.AsyncClient(base_url=api2.url, headers=api.auth, timeout=60) as http2,
            ):
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
                token = stack.agent_token(api, "box")
                identity = tmp_path / "box-agent.key"
                agent_key, _ = signing.ensure_private(identity)
                settings = ApiSettings(database_url=db_url, api_key_file=tmp_path / "unused-api-key")
                await admin.register_agent_key(settings, "box", signing.public_text(agent_key))
                fleet = Fleet(stack, api, api2, http, http2, sshd)
                stack.start_agent("box-agent", "box", token, [gw.url], identity_key_file=str(identity))
                for _ in range(100):
                    answer = await http.get("/api/agents/box")
                    if answer.status_code == 200 and answer.json()["connected"]:
                        break
                    await asyncio.sleep(0.1)
                yield fleet
                stack.close()
    finally:
        sshd.stop()


async def test_first_chunk_reaches_the_client_within_half_a_second(fleet: Fleet) -> None:
    """Agent path: ``a`` arrives while the command still sleeps, ``b`` after, then the recorded outcome;
    the first chunk within 0.5 s of the exec request (which answers only when the command ends)."""
    command = "echo a; sleep 2; echo b"
    began = time.monotonic()
    call = fleet.start(command)
    command_id = await fleet.running_id(command)
    events = await read_events(fleet.http, command_id)
    first = events[0]
    latency = first.at - began
    print(f"first chunk {latency * 1000:.0f} ms after the exec request was sent")
    assert (first.id, first.event, first.data["data"]) == ("1", "output", "a\n")
    assert latency < 0.5
    assert [e.event for e in events][-1] == "end"
    assert chunks(events) == "a\nb\n"
    assert events[-2].at - first.at > 1.5  # b came about 2 s after a: streamed, not replayed at the end
    end = events[-1]
    assert end.id == "end"
    assert (end.data["status"], end.data["exit_code"], end.data["via"]) == ("succeeded", 0, "agent")
    answer = (await call).json()
    assert (answer["command_id"], answer["stdout"], answer["via"]) == (command_id, "a\nb\n", "agent")


async def test_a_resumed_stream_has_no_gap_and_no_duplicate(fleet: Fleet) -> None:
    """Hang up after 5 chunks, reconnect (to the other API instance) with Last-Event-ID: every chunk once,
    in order, and the output equals the recorded stdout."""
    command = "for i in $(seq 1 30); do echo line$i; sleep 0.05; done; echo err >&2"
    call = fleet.start(command)
    command_id = await fleet.running_id(command)
    head = await read_events(fleet.http, command_id, stop_after=5)
    assert [e.id for e in head] == ["1", "2", "3", "4", "5"]
    tail = await read_events(fleet.http2, command_id, last_event_id=head[-1].id)
    events = head + tail
    seqs = [int(e.id) for e in events if e.event == "output" and e.id is not None]
    assert seqs == list(range(1, len(seqs) + 1))
    answer = (await call).json()
    assert chunks(events) == answer["stdout"] == "".join(f"line{i}\n" for i in range(1, 31))
    assert chunks(events, "stderr") == "err\n"
    assert events[-1].event == "end"
    assert events[-1].data["status"] == "succeeded"
    # the end event's id stops a reconnecting client; a bad id is a 400 JSON
    done = await fleet.http.get(f"/api/commands/{command_id}/stream", headers={"Last-Event-ID": "end"})
    assert done.status_code == 204
    bad = await fleet.http.get(f"/api/commands/{command_id}/stream", headers={"Last-Event-ID": "x1"})
    assert bad.status_code == 400
    assert bad.json()["code"] == "bad_last_event_id"


async def test_a_finished_command_replays_fully_on_any_instance_and_ends(fleet: Fleet) -> None:
    answer = (
        await fleet.http.post("/api/hosts/box/exec", json={"command": "seq 1 2000; echo bye >&2"})
    ).json()
    assert answer["status"] == "succeeded"
    await asyncio.sleep(0.5)  # the chunk writer's batch
    for http in (fleet.http, fleet.http2):
        async with asyncio.timeout(5):
            events = await read_events(http, answer["command_id"])
        assert chunks(events) == answer["stdout"]
        assert chunks(events, "stderr") == "bye\n"
        assert events[-1].event == "end"
        assert events[-1].data["exit_code"] == 0
        resumed = await read_events(http, answer["command_id"], last_event_id="1")
        assert [e.id for e in resumed] == [e.id for e in events[1:]]


async def test_the_ssh_path_streams(fleet: Fleet) -> None:
    """With the agent gone, the SSH worker publishes chunks as output arrives from sshd."""
    fleet.stack.procs[-1].stop()  # the agent
    for _ in range(100):
        if not (await fleet.http.get("/api/agents/box")).json()["connected"]:
            break
        await asyncio.sleep(0.1)
    command = "echo a; sleep 2; echo b >&2"
    call = fleet.start(command)
    command_id = await fleet.running_id(command)
    events = await read_events(fleet.http, command_id)
    outputs = [e for e in events if e.event == "output"]
    assert outputs[0].data == {"seq": 1, "stream": "stdout", "data": "a\n", "truncated": False}
    assert events[-1].at - outputs[0].at > 1.5  # a arrived while the command still slept
    assert chunks(events, "stderr") == "b\n"
    assert (events[-1].data["via"], events[-1].data["status"]) == ("ssh", "succeeded")
    assert (await call).json()["via"] == "ssh"


async def test_a_chatty_command_is_bounded_and_its_result_recorded(
    fleet: Fleet, nats_server: NatsServer
) -> None:
    """``yes | head -c 50M``: the chunk bytes published on NATS stay within the per-command budget, the
    last chunk says truncated, and the final result is recorded (cut at its own cap)."""
    watcher = await nats_server.connect("operator")
    published = {"bytes": 0, "chunks": 0, "truncated": 0}

    async def count(msg: Msg) -> None:
        chunk = json.loads(msg.data)
        published["bytes"] += len(chunk["data"].encode())
        published["chunks"] += 1
        published["truncated"] += chunk["truncated"]

    await watcher.subscribe(subjects.ALL_OUTPUT, cb=count)
    await watcher.flush()
    try:
        answer = (
            await fleet.http.post("/api/hosts/box/exec", json={"command": "yes | head -c 50M", "timeout": 60})
        ).json()
        await asyncio.sleep(0.5)
    finally:
        await watcher.drain()
    print(f"chatty command: {published['chunks']} chunks, {published['bytes']} bytes published")
    assert answer["status"] == "succeeded"
    assert answer["truncated"] is True
    assert len(answer["stdout"]) > 0
    assert published["bytes"] <= COMMAND_BUDGET_BYTES
    assert published["truncated"] == 1
    events = await read_events(fleet.http, answer["command_id"])
    assert sum(len(e.data["data"]) for e in events if e.event == "output") <= COMMAND_BUDGET_BYTES
    assert [e for e in events if e.event == "output"][-1].data["truncated"] is True
    assert events[-1].data["status"] == "succeeded"


async def test_unknown_command_is_404_json_and_the_key_is_required(fleet: Fleet) -> None:
    missing = await fleet.http.get("/api/commands/nope/stream")
    assert missing.status_code == 404
    assert "detail" in missing.json()
    async with httpx.AsyncClient(base_url=fleet.api.url, timeout=10) as anonymous:
        refused = await anonymous.get("/api/commands/nope/stream")
        assert refused.status_code == 401
        assert "detail" in refused.json()


async def test_an_api_that_stops_ends_its_streams_and_the_client_resumes_on_another(fleet: Fleet) -> None:
    """SIGTERM the instance serving a stream: the stream ends at once without the end event (uvicorn would
    otherwise wait for it), the API exits 0, and the client resumes on the other instance: no gap, no dup."""
    command = "for i in $(seq 1 40); do echo n$i; sleep 0.05; done"
    call = fleet.start(command)
    command_id = await fleet.running_id(command)
    seen: list[Event] = []
    reading = asyncio.create_task(read_events(fleet.http2, command_id, into=seen))
    for _ in range(200):
        if len(seen) >= 3:
            break
        await asyncio.sleep(0.01)
    began = time.monotonic()
    fleet.api2.proc.signal(signal.SIGTERM)
    async with asyncio.timeout(3):
        await reading
    assert time.monotonic() - began < 2
    assert await asyncio.to_thread(fleet.api2.proc.popen.wait, 10) == 0
    assert len(seen) >= 3
    assert all(e.event == "output" for e in seen)  # no end event: the client resumes
    rest = await read_events(fleet.http, command_id, last_event_id=seen[-1].id)
    events = seen + rest
    seqs = [int(e.id) for e in events if e.event == "output" and e.id is not None]
    assert seqs == list(range(1, len(seqs) + 1))
    answer = (await call).json()
    assert chunks(events) == answer["stdout"] == "".join(f"n{i}\n" for i in range(1, 41))
    assert events[-1].event == "end"
