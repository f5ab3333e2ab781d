"""The browser stream, end to end: real `warlock-api` processes on PostgreSQL, nats-server, gateway and agent
processes; browsers played by the `websockets` client. Tickets work once, on any instance of the database,
and expire; presence, metrics and output reach subscribers; a browser that does not read is dropped (4408)
while another keeps receiving; a scoped key's browser gets nothing of hosts outside its scope; bad frames
close with their codes; a ping is answered; a revoked or expired key's sockets close (4403) while others
stay; outcomes settled by the reconciler or a late result are announced once."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client as NATS
from sqlalchemy import text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from services.api.store import crud
from services.api.store.db import make_engine, sessionmaker
from services.api.store.models import CommandRun, CommandStatus, Via, utcnow
from shared import subjects
from shared.ids import new_command_id
from shared.protocol import OutputChunk, encode
from tests.integration.test_metrics_history import sample
from tests.support.db import fresh_database
from tests.support.fakeagent import AgentKey
from tests.support.natsserver import NatsServer
from tests.support.stack import Api, Gateway, Stack

pytestmark = pytest.mark.e2e

HOSTS = {"web1": {"role": "web"}, "db1": {"role": "db"}}


@dataclass
class Env:
    stack: Stack
    db_url: str
    gateway: Gateway
    gw_nats: NATS
    clients: list[httpx.AsyncClient]
    sockets: list[socket.socket]

    async def api(self, **settings: str) -> tuple[Api, httpx.AsyncClient]:
        """Start an API with `settings` (WARLOCK_API_<NAME>); add the hosts on the first one."""
        api = self.stack.start_api(
            self.db_url, f"api{len(self.stack.procs)}", port=0, nats_url=None, **settings
        )
        http = httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=30)
        self.clients.append(http)  # closed by the fixture
        for n, (host, labels) in enumerate(HOSTS.items()):
            body = {"id": host, "address": f"10.0.0.{n + 1}", "ssh_check": False, "labels": labels}
            added = await http.post("/api/hosts", json=body)
            assert added.status_code in (201, 409), added.text
        return api, http


@pytest.fixture
async def env(stack: Stack, nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Env]:
    async with fresh_database("postgresql", tmp_path) as db_url:
        gateway = stack.start_gateway()
        gw_nats = await nats_server.connect("gateway")  # publishes as a gateway does
        try:
            yield (made := Env(stack, db_url, gateway, gw_nats, [], []))
        finally:
            for client in made.clients:
                await client.aclose()
            for sock in made.sockets:
                sock.close()
            await gw_nats.drain()
            stack.close()


async def ticket(http: httpx.AsyncClient, headers: dict[str, str] | None = None) -> str:
    got = await http.post("/api/ws-tickets", headers=headers)
    assert got.status_code == 201, got.text
    assert got.json()["expires_in"] > 0
    return str(got.json()["ticket"])


def ws_url(api: Api, ticket_value: str | None) -> str:
    url = api.url.replace("http://", "ws://") + "/api/ws"
    return url if ticket_value is None else f"{url}?ticket={ticket_value}"


async def closed_with(url: str, send: str | bytes | None = None) -> tuple[int, str]:
    """Connect, send `send` (if any), and return the close code and reason the server sent."""
    async with connect(url) as ws:
        if send is not None:
            await ws.send(send)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    rcvd = closed.value.rcvd
    assert rcvd is not None
    return rcvd.code, rcvd.reason


SKIPPED: dict[int, list[dict[str, Any]]] = {}  # events read while waiting for something else, per socket


async def request(ws: ClientConnection, **frame: Any) -> dict[str, Any]:
    """Send a subscribe/unsubscribe/ping and return the server's answer (ack, pong or error); events read
    meanwhile are kept for `next_event`."""
    await ws.send(json.dumps(frame))
    while True:
        answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if answer["type"] in ("ack", "pong", "error"):
            return dict(answer)
        SKIPPED.setdefault(id(ws), []).append(answer)


async def next_event(ws: ClientConnection, topic: str, timeout: float = 15) -> dict[str, Any]:
    """The next event of `topic` (events of other topics are kept for later calls)."""
    kept = SKIPPED.setdefault(id(ws), [])
    for n, frame in enumerate(kept):
        if frame["topic"] == topic:
            return kept.pop(n)
    deadline = time.monotonic() + timeout
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic())))
        if frame["type"] == "event" and frame["topic"] == topic:
            return dict(frame)
        kept.append(frame)


async def raw_browser(url: str) -> socket.socket:
    """A WebSocket client on a plain socket with a small receive buffer, which reads only the handshake."""
    loop = asyncio.get_running_loop()
    host, _, rest = url.removeprefix("ws://").partition(":")
    port, _, path = rest.partition("/")
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await loop.sock_connect(raw, (host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    hello = (
        f"GET /{path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(raw, hello.encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += await loop.sock_recv(raw, 1)  # byte by byte: nothing past the handshake is read
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return raw


async def raw_send(raw: socket.socket, text: str) -> None:
    """Send one masked text frame (a client's frames are masked; a zero mask keeps the bytes as they are)."""
    data = text.encode()
    assert len(data) < 126
    await asyncio.get_running_loop().sock_sendall(raw, bytes([0x81, 0x80 | len(data)]) + b"\0\0\0\0" + data)


async def raw_read_all(raw: socket.socket, timeout: float = 20) -> tuple[list[tuple[int, bytes]], bool]:
    """Read until EOF: the server's (unmasked) frames as (opcode, payload), and whether EOF came."""
    loop = asyncio.get_running_loop()
    buffer = b""
    eof = False
    try:
        while True:
            got = await asyncio.wait_for(loop.sock_recv(raw, 1 << 20), timeout)
            if not got:
                eof = True
                break
            buffer += got
    except (TimeoutError, ConnectionResetError):
        eof = False
    frames: list[tuple[int, bytes]] = []
    at = 0
    while at + 2 <= len(buffer):
        opcode, size = buffer[at] & 0x0F, buffer[at + 1] & 0x7F
        at += 2
        if size == 126:
            size, at = int.from_bytes(buffer[at : at + 2], "big"), at + 2
        elif size == 127:
            size, at = int.from_bytes(buffer[at : at + 8], "big"), at + 8
        frames.append((opcode, buffer[at : at + size]))
        at += size
    return frames, eof


async def test_tickets_work_once_expire_and_are_required(env: Env) -> None:
    api, http = await env.api(ws_ticket_ttl="1")
    assert (await http.post("/api/ws-tickets", headers={"Authorization": "Bearer nope"})).status_code == 401
    assert await closed_with(ws_url(api, None)) == (4401, "no valid ticket: POST /api/ws-tickets for one")
    assert (await closed_with(ws_url(api, "made-up")))[0] == 4401
    assert (await closed_with(ws_url(api, "x" * 5000)))[0] == 4401
    good = await ticket(http)
    async with connect(ws_url(api, good)) as ws:
        assert await request(ws, type="subscribe", topic="presence", id=1) == {"type": "ack", "id": 1}
    assert (await closed_with(ws_url(api, good)))[0] == 4401  # used
    late = await ticket(http)
    await asyncio.sleep(1.3)
    assert (await closed_with(ws_url(api, late)))[0] == 4401  # expired
    log = api.proc.log_path.read_text()
    assert "GET /api/ws" in log or "POST /api/ws-tickets" in log  # the access log ran
    assert good not in log  # the tickets did not
    assert late not in log


async def test_bad_frames_close_or_answer_with_specific_codes(env: Env) -> None:
    api, http = await env.api(ws_max_subscriptions="2", ws_max_frame_bytes="512")
    assert (await closed_with(ws_url(api, await ticket(http)), "{not json"))[0] == 1007
    assert (await closed_with(ws_url(api, await ticket(http)), b"\x00\x01"))[0] == 1003
    assert (await closed_with(ws_url(api, await ticket(http)), "x" * 600))[0] == 1009
    assert (await closed_with(ws_url(api, await ticket(http)), '{"type":"hello"}'))[0] == 1008
    assert (await closed_with(ws_url(api, await ticket(http)), "[1]"))[0] == 1008
    async with connect(ws_url(api, await ticket(http))) as ws:
        bad = [
            ({"topic": "weather"}, "unknown_topic"),
            ({"topic": "metrics", "host": "Bad Host!"}, "bad_host"),
            ({"topic": "output"}, "bad_command_id"),
            ({"topic": "output", "command_id": "../x"}, "bad_command_id"),
            ({"topic": "presence", "command_id": "x"}, "bad_command_id"),
        ]
        for n, (frame, code) in enumerate(bad):
            answer = await request(ws, type="subscribe", id=n, **frame)
            assert (answer["type"], answer["id"], answer["code"]) == ("error", n, code), answer
        assert (await request(ws, type="subscribe", topic="presence", id="a"))["type"] == "ack"
        assert (await request(ws, type="subscribe", topic="metrics", id="b"))["type"] == "ack"
        third = await request(ws, type="subscribe", topic="metrics", host="web1", id="c")
        assert third["code"] == "too_many_subscriptions"
        assert (await request(ws, type="unsubscribe", topic="metrics", id="d"))["type"] == "ack"
        assert (await request(ws, type="subscribe", topic="metrics", host="web1", id="e"))["type"] == "ack"


async def test_presence_metrics_and_output_reach_the_browser(env: Env) -> None:
    api, http = await env.api()
    async with connect(ws_url(api, await ticket(http))) as ws:
        assert (await request(ws, type="subscribe", topic="presence", id=1))["type"] == "ack"
        assert (await request(ws, type="subscribe", topic="metrics", host="web1", id=2))["type"] == "ack"
        assert (await request(ws, type="subscribe", topic="commands", host="web1", id=4))["type"] == "ack"
        agent = await env.stack.start_known_agent(api, "web1-agent", "web1", [env.gateway.url])
        up = await next_event(ws, "presence")
        assert (up["host"], up["data"]["state"]) == ("web1", "connected")
        assert "signature" not in up["data"]
        assert "session_id" not in up["data"]

        await env.gw_nats.publish(subjects.metrics("db1"), sample("db1", time.time(), cpu=99.0))  # not asked
        await env.gw_nats.publish(subjects.metrics("web1"), sample("web1", time.time(), cpu=42.5))
        got = await next_event(ws, "metrics")
        assert (got["host"], got["data"]["cpu_percent"]) == ("web1", 42.5)

        call = asyncio.create_task(
            http.post(
                "/api/hosts/web1/exec", json={"command": "sleep 1; echo a; sleep 0.3; echo b", "timeout": 20}
            )
        )
        command_id = ""
        for _ in range(400):
            rows = (await http.get("/api/hosts/web1/commands", params={"limit": 5})).json()
            if rows:
                command_id = rows[0]["command_id"]
                break
            await asyncio.sleep(0.005)
        assert command_id
        sub = {"type": "subscribe", "topic": "output", "host": "web1", "command_id": command_id, "id": 3}
        assert (await request(ws, **sub))["type"] == "ack"
        text = ""
        while text != "a\nb\n":
            chunk = await next_event(ws, "output")
            assert chunk["data"]["command_id"] == command_id
            text += chunk["data"]["data"]
        assert (await call).json()["stdout"] == "a\nb\n"
        recorded = await next_event(ws, "commands")
        finished = await next_event(ws, "commands")
        assert (recorded["host"], recorded["data"]["event"], recorded["data"]["command_id"]) == (
            "web1",
            "recorded",
            command_id,
        )
        assert {k: finished["data"][k] for k in ("event", "command_id", "status", "via", "exit_code")} == {
            "event": "finished",
            "command_id": command_id,
            "status": "succeeded",
            "via": "agent",
            "exit_code": 0,
        }
        assert "command" not in finished["data"]  # no command text on NATS

        agent.stop(timeout=5)
        down = await next_event(ws, "presence")
        assert (down["host"], down["data"]["state"]) == ("web1", "disconnected")


async def test_a_scoped_keys_browser_gets_only_its_hosts(env: Env) -> None:
    api, http = await env.api()
    made = await http.post("/api/keys", json={"name": "web-read", "role": "read", "scope": {"role": "web"}})
    assert made.status_code == 201, made.text
    web = {"Authorization": f"Bearer {made.json()['key']}"}
    async with (
        connect(ws_url(api, await ticket(http, web))) as scoped,
        connect(ws_url(api, await ticket(http))) as admin,
    ):
        out = await request(scoped, type="subscribe", topic="metrics", host="db1", id=1)
        assert (out["type"], out["code"]) == ("error", "out_of_scope")
        assert (await request(scoped, type="subscribe", topic="metrics", id=2))["type"] == "ack"
        assert (await request(admin, type="subscribe", topic="metrics", id=2))["type"] == "ack"
        for host in ("db1", "web1", "db1", "web1"):
            await env.gw_nats.publish(subjects.metrics(host), sample(host, time.time()))
        seen_admin = [(await next_event(admin, "metrics"))["host"] for _ in range(4)]
        assert seen_admin == ["db1", "web1", "db1", "web1"]
        seen_scoped = [(await next_event(scoped, "metrics"))["host"] for _ in range(2)]
        assert seen_scoped == ["web1", "web1"]
        with pytest.raises(TimeoutError):
            await next_event(scoped, "metrics", timeout=0.5)


async def test_a_browser_that_does_not_read_is_dropped_and_another_keeps_receiving(env: Env) -> None:
    api, http = await env.api(ws_send_queue_frames="100")
    raw = await raw_browser(ws_url(api, await ticket(http)))  # subscribes, then never reads
    env.sockets.append(raw)
    async with connect(ws_url(api, await ticket(http))) as fast:
        command_id = new_command_id()
        sub = {"type": "subscribe", "topic": "output", "host": "web1", "command_id": command_id, "id": 1}
        assert (await request(fast, **sub))["type"] == "ack"
        await raw_send(raw, json.dumps(sub))
        await asyncio.sleep(0.2)  # its ack waits in the socket: it never reads
        count = 2000  # chunks of 8 KiB: 16 MiB, more than the kernel buffers between the API and the client
        received = 0

        async def read_fast() -> None:
            nonlocal received
            while received < count:
                await next_event(fast, "output")
                received += 1

        reading = asyncio.create_task(read_fast())
        began = time.monotonic()
        data = "x" * 8192
        for n in range(count):
            chunk = OutputChunk(command_id=command_id, seq=n + 1, stream="stdout", data=data)
            await env.gw_nats.publish(subjects.output("web1", command_id), encode(chunk))
            if n % 20 == 19:  # ~2,000 chunks/s: a pace a reading browser keeps up with
                await env.gw_nats.flush()
                await asyncio.sleep(0.01)
        await asyncio.wait_for(reading, 30)
        print(f"fast browser: {received} samples in {time.monotonic() - began:.2f} s")
    dropped = 'warlock_browser_dropped_total{reason="slow"} 1.0'
    assert dropped in (await http.get("/metrics")).text
    assert "dropped: too slow" in api.proc.log_path.read_text()
    frames, eof = await raw_read_all(raw)  # now it reads: what was queued, then the server's close
    assert eof
    print(f"the slow browser had {len(frames)} frames waiting; last: {frames[-1][:1]}")
    if frames and frames[-1][0] == 0x8:  # a close frame made it out before the connection was closed
        assert int.from_bytes(frames[-1][1][:2], "big") == 4408


async def test_a_browser_on_another_instance_sees_the_runs_of_the_first(env: Env) -> None:
    """Two APIs on one database: a run through api1 (no agent, no SSH worker: it ends at once) reaches the
    browser connected to api2 as ``recorded`` then ``finished`` (warlock.events.command.<host>)."""
    _api1, http1 = await env.api()
    api2, http2 = await env.api()
    async with connect(ws_url(api2, await ticket(http2))) as ws:
        assert (await request(ws, type="subscribe", topic="commands", id=1))["type"] == "ack"
        answer = await http1.post("/api/hosts/db1/exec", json={"command": "true", "timeout": 5})
        run = answer.json()
        assert run["status"] != "pending", run
        recorded, finished = await next_event(ws, "commands"), await next_event(ws, "commands")
        assert [recorded["data"]["event"], finished["data"]["event"]] == ["recorded", "finished"]
        assert {recorded["host"], finished["host"]} == {"db1"}
        assert finished["data"]["command_id"] == run["command_id"]
        assert (finished["data"]["status"], finished["data"]["via"]) == (run["status"], run["via"])


async def test_a_ticket_from_one_instance_opens_a_socket_on_another_once_and_pings_are_answered(
    env: Env,
) -> None:
    """No sticky sessions: a ticket issued by api1 opens a socket on api2, once (a second use on either
    instance is 4401), and expires (4401). Pings are answered with pongs carrying the request's id."""
    api1, http1 = await env.api(ws_ticket_ttl="1")
    api2, _http2 = await env.api(ws_ticket_ttl="1")
    good = await ticket(http1)
    async with connect(ws_url(api2, good)) as ws:
        before = time.time()
        assert await request(ws, type="ping", id=7) == {
            "type": "pong",
            "id": 7,
            "at": pytest.approx(before, abs=5),
        }
        assert (await request(ws, type="ping", id="p-1"))["id"] == "p-1"
        assert (await request(ws, type="ping"))["id"] is None
        bad = await request(ws, type="ping", id=[1])
        assert (bad["type"], bad["code"]) == ("error", "bad_id")
        assert await request(ws, type="subscribe", topic="presence", id=8) == {"type": "ack", "id": 8}
    assert (await closed_with(ws_url(api2, good)))[0] == 4401  # used, on the instance it was used on
    assert (await closed_with(ws_url(api1, good)))[0] == 4401  # and on the one that issued it
    late = await ticket(http1)
    await asyncio.sleep(1.3)
    assert (await closed_with(ws_url(api2, late)))[0] == 4401  # expired
    for api in (api1, api2):
        log = api.proc.log_path.read_text()
        assert good not in log
        assert late not in log


async def test_a_revoked_or_expired_keys_sockets_close_on_every_instance_and_others_stay(env: Env) -> None:
    """A key revoked through api1 closes its socket on api2 with 4403 "API key revoked" within the auth
    cache TTL (5 s); a key that expires closes with "API key expired"; the admin key's socket stays open and
    answers; a ticket issued before the revocation is refused at connect."""
    _api1, http1 = await env.api()
    api2, http2 = await env.api()
    keys = {}
    for name, extra in (("doomed", {}), ("brief", {"expires_in": 3})):
        made = await http1.post("/api/keys", json={"name": name, "role": "read", **extra})
        assert made.status_code == 201, made.text
        keys[name] = {"Authorization": f"Bearer {made.json()['key']}"}
    spare = await ticket(http1, keys["doomed"])  # used after the revocation
    async with (
        connect(ws_url(api2, await ticket(http1, keys["doomed"]))) as doomed,
        connect(ws_url(api2, await ticket(http1, keys["brief"]))) as brief,
        connect(ws_url(api2, await ticket(http1))) as admin,
    ):
        for ws in (doomed, brief, admin):
            assert (await request(ws, type="ping", id=1))["type"] == "pong"
        assert (await http1.delete("/api/keys/doomed")).status_code == 200
        revoked_at = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(doomed.recv(), 10)
        took = time.monotonic() - revoked_at
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4403, "API key revoked")
        assert took < 5.0, took
        print(f"revoked key's socket closed {took:.2f} s after the revocation")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(brief.recv(), 10)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4403, "API key expired")
        assert (await request(admin, type="ping", id=2))["type"] == "pong"  # still open
    assert await closed_with(ws_url(api2, spare)) == (4403, "API key revoked")
    assert 'warlock_browser_dropped_total{reason="key"} 2.0' in (await http2.get("/metrics")).text


async def test_outcomes_settled_by_the_reconciler_or_a_late_result_are_announced_once(env: Env) -> None:
    """Two APIs reconciling one database: a run left pending past its deadline is settled (timed_out,
    orphaned) and announced ``finished`` once; the agent's signed late result then settles it succeeded,
    announced once more, and the same result sent again changes nothing and announces nothing."""
    fast = {"reconcile_interval": "0.2", "reconcile_margin": "0", "exec_grace": "1", "ssh_grace": "1"}
    _api1, _http1 = await env.api(**fast)
    api2, http2 = await env.api(**fast)
    agent = AgentKey()
    engine = make_engine(env.db_url)
    try:
        async with sessionmaker(engine)() as session:
            await crud.set_agent_public_key(session, "web1", agent.public_key)
        async with connect(ws_url(api2, await ticket(http2))) as ws:
            assert (await request(ws, type="subscribe", topic="commands", host="web1", id=1))["type"] == "ack"
            command_id = new_command_id()
            async with sessionmaker(engine)() as session:
                session.add(
                    CommandRun(
                        command_id=command_id,
                        host_id="web1",
                        command="id",
                        timeout=5,
                        requested_by="api-key:test",
                        status=CommandStatus.PENDING,
                        created_at=utcnow() - timedelta(seconds=3600),
                    )
                )
                await session.commit()
            orphaned = await next_event(ws, "commands", timeout=10)
            assert orphaned["host"] == "web1"
            assert {
                k: orphaned["data"][k] for k in ("event", "command_id", "status", "via", "exit_code")
            } == {
                "event": "finished",
                "command_id": command_id,
                "status": "timed_out",
                "via": None,
                "exit_code": None,
            }
            with pytest.raises(TimeoutError):  # two reconcilers, one change: one event
                await next_event(ws, "commands", timeout=1.0)

            late = encode(agent.result("web1", command_id=command_id, stdout="it ran\n", exit_code=3))
            await env.gw_nats.publish(subjects.result("web1"), late)
            settled = await next_event(ws, "commands", timeout=10)
            assert {k: settled["data"][k] for k in ("event", "command_id", "status", "via", "exit_code")} == {
                "event": "finished",
                "command_id": command_id,
                "status": "failed",
                "via": "agent",
                "exit_code": 3,
            }
            assert "stdout" not in settled["data"]  # no output in command events
            await env.gw_nats.publish(subjects.result("web1"), late)  # again: the row no longer changes
            with pytest.raises(TimeoutError):
                await next_event(ws, "commands", timeout=1.0)
        run = (await http2.get(f"/api/commands/{command_id}")).json()
        assert (run["status"], run["exit_code"], run["stdout"]) == ("failed", 3, "it ran\n")
    finally:
        await engine.dispose()


async def test_an_output_subscription_with_after_replays_stored_chunks_then_live_then_the_outcome(
    env: Env,
) -> None:
    """``after``: chunks published before the browser subscribed come first (stored), then live ones, in
    order and once each, then the recorded outcome; asking again with the last seq gives only what
    followed; a live-only subscriber sees only the live chunks; bad requests get specific errors."""
    api, http = await env.api()
    engine = make_engine(env.db_url)
    command_id = new_command_id()
    try:
        async with sessionmaker(engine)() as session:
            session.add(
                CommandRun(
                    command_id=command_id,
                    host_id="web1",
                    command="for i in 1 2 3 4 5; do echo $i; done",
                    timeout=30,
                    requested_by="api-key:test",
                    status=CommandStatus.RUNNING,
                    created_at=utcnow(),
                )
            )
            await session.commit()

        async def publish(seq: int) -> None:
            chunk = OutputChunk(command_id=command_id, seq=seq, stream="stdout", data=f"line {seq}\n")
            await env.gw_nats.publish(subjects.output("web1", command_id), encode(chunk))
            await env.gw_nats.flush()

        for seq in (1, 2, 3):  # before any browser subscribed
            await publish(seq)
        count = text("SELECT count(*) FROM command_output WHERE command_id = :c")
        for _ in range(100):  # stored by the API's writer (batched)
            async with engine.connect() as conn:
                if (await conn.execute(count, {"c": command_id})).scalar_one() == 3:
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the chunks published before the subscription were never stored")
        async with (
            connect(ws_url(api, await ticket(http))) as ws,
            connect(ws_url(api, await ticket(http))) as live_only,
        ):
            sub = {"type": "subscribe", "topic": "output", "command_id": command_id}
            assert (await request(live_only, **sub, id=1))["type"] == "ack"
            assert (await request(ws, **sub, host="web1", after=0, id=1))["type"] == "ack"
            got = [(await next_event(ws, "output"))["data"] for _ in range(3)]
            assert [(d["seq"], d["data"]) for d in got] == [(1, "line 1\n"), (2, "line 2\n"), (3, "line 3\n")]
            await publish(4)
            await publish(5)
            live = [(await next_event(ws, "output"))["data"]["seq"] for _ in range(2)]
            assert live == [4, 5]
            assert [(await next_event(live_only, "output"))["data"]["seq"] for _ in range(2)] == [4, 5]
            async with sessionmaker(engine)() as session:
                run = await session.get(CommandRun, command_id)
                assert run is not None
                run.status, run.exit_code, run.via, run.finished_at = (
                    CommandStatus.SUCCEEDED,
                    0,
                    Via.AGENT,
                    utcnow(),
                )
                session.add(run)
                await session.commit()
            end = (await next_event(ws, "output"))["data"]
            assert end["command_id"] == command_id
            assert end["end"] is True
            assert (end["outcome"]["status"], end["outcome"]["exit_code"]) == ("succeeded", 0)

            # again from seq 3 (as after a reconnect): 4, 5, the end; nothing else
            assert (await request(ws, **sub, after=3, id=2))["type"] == "ack"
            again = [(await next_event(ws, "output"))["data"] for _ in range(3)]
            assert [d.get("seq") for d in again] == [4, 5, None]
            assert again[2]["end"] is True
            with pytest.raises(TimeoutError):
                await next_event(ws, "output", timeout=0.5)

            async def refused(**frame: Any) -> str:
                answer = await request(ws, type="subscribe", id=9, **frame)
                assert answer["type"] == "error", answer
                return str(answer["code"])

            assert await refused(topic="output", command_id=new_command_id(), after=0) == "unknown_command"
            assert await refused(topic="output", command_id=command_id, after=-1) == "bad_after"
            assert await refused(topic="output", command_id=command_id, after="0") == "bad_after"
            assert await refused(topic="output", command_id=command_id, after=True) == "bad_after"
            assert await refused(topic="metrics", host="web1", after=0) == "bad_after"
            assert await refused(topic="output", host="db1", command_id=command_id, after=0) == "bad_host"
    finally:
        await engine.dispose()
