"""The agent's connection loop against a real in-process WebSocket server playing a minimal gateway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from services.agent.client import Agent
from services.agent.config import AgentSettings
from services.agent.ledger import Ledger
from services.dev.swarm import run_swarm
from shared import signing
from shared.errors import CloseCode
from shared.ids import CommandId, HostId, SessionId
from shared.protocol import (
    Ack,
    AgentFrame,
    Exec,
    ExecResult,
    Hello,
    Ping,
    Pong,
    Welcome,
    decode_agent_frame,
    encode,
)
from shared.tokens import generate_token
from shared.version import __version__
from tests.support.agent_trust import agent_trust, signed_exec
from tests.support.trust import TestSigner

Behaviour = Callable[[ServerConnection, Hello], Awaitable[None]]


@dataclass
class FakeGateway:
    """Accepts one token; each new session runs the next scripted behaviour after its Welcome."""

    token: str
    signer: TestSigner
    behaviours: list[Behaviour] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    hellos: list[Hello] = field(default_factory=list)
    connected_at: list[float] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    server: Server | None = None

    def exec(self, command_id: str, command: str, timeout: float = 5) -> bytes:
        """An Exec frame for web-1 signed with the test's API key, encoded."""
        return encode(signed_exec(self.signer, command_id, command, timeout))

    @property
    def url(self) -> str:
        """The agent URL of this server."""
        assert self.server is not None
        port = next(iter(self.server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}/agent"

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """401 before upgrading unless the bearer token matches."""
        header = request.headers.get("Authorization")
        self.auth_headers.append(header)
        if header != f"Bearer {self.token}":
            return connection.respond(HTTPStatus.UNAUTHORIZED, "bad token\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        """Read the Hello, send the Welcome, run the session's behaviour."""
        index = len(self.hellos)
        hello = decode_agent_frame(await ws.recv())
        assert isinstance(hello, Hello)
        self.hellos.append(hello)
        self.connected_at.append(time.monotonic())
        welcome = Welcome(
            session_id=SessionId(f"s{index}"), gateway_id="gw1", ping_interval=20, max_result_bytes=64 * 1024
        )
        await ws.send(encode(welcome), text=True)
        behaviour = self.behaviours[index] if index < len(self.behaviours) else hold
        try:
            await behaviour(ws, hello)
        finally:
            self.close_codes.append(ws.close_code)


async def hold(ws: ServerConnection, hello: Hello) -> None:
    """Keep the session open, answering pings, until the agent leaves."""
    try:
        while True:
            await next_frame(ws)
    except ConnectionClosed:
        return


async def next_frame(ws: ServerConnection, kind: type[Any] | None = None) -> AgentFrame:
    """The next frame from the agent (of `kind` if given), answering its pings on the way."""
    while True:
        frame = decode_agent_frame(await ws.recv())
        if isinstance(frame, Ping):
            await ws.send(encode(Pong(id=frame.id)), text=True)
        if kind is None or isinstance(frame, kind):
            return frame


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[FakeGateway]:
    """A fake gateway on a free port (it forwards commands signed by the test's API key)."""
    gw = FakeGateway(token=generate_token(), signer=TestSigner(tmp_path))
    async with serve(gw.handler, "127.0.0.1", 0, process_request=gw.process_request) as server:
        gw.server = server
        yield gw


@dataclass
class Running:
    """An agent running in a task."""

    agent: Agent
    task: asyncio.Task[None]


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[Callable[..., Running]]:
    """Factory: start an in-process agent against some URLs; stops it (and closes its ledger) afterwards."""
    started: list[tuple[Running, Ledger]] = []

    def start(urls: list[str], token: str, **overrides: Any) -> Running:
        values: dict[str, Any] = {
            "host_id": "web-1",
            "token": token,
            "gateway_urls": urls,
            "trusted_keys": [TestSigner(tmp_path).public_key],
            "ledger_path": tmp_path / "ledger.jsonl",
            "metrics_interval": 3600,
            "backoff_initial": 0.05,
            "backoff_max": 0.2,
            "connect_timeout": 5,
        }
        values.update(overrides)
        settings = AgentSettings(**values)
        ledger = Ledger(settings.ledger_path)
        ledger.open()
        trust = agent_trust(tmp_path, signer=TestSigner(tmp_path))
        agent = Agent(settings, ledger, shutdown_grace=2, trust=trust)
        running = Running(agent, asyncio.create_task(agent.run()))
        started.append((running, ledger))
        return running

    yield start
    for running, ledger in started:
        running.agent.stop()
        await asyncio.wait_for(running.task, 10)
        ledger.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `predicate` until it holds, or fail."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_exec_round_trip_with_ack(
    gateway: FakeGateway, start_agent: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    """Bearer header and Hello are right; an Exec gets its result back; the Ack empties the outbox."""
    results: list[ExecResult] = []

    async def run_one(ws: ServerConnection, hello: Hello) -> None:
        await ws.send(gateway.exec("c1", "echo hi; exit 4"), text=True)
        result = await next_frame(ws, ExecResult)
        assert isinstance(result, ExecResult)
        results.append(result)
        await ws.send(encode(Ack(command_id=result.command_id)), text=True)
        await hold(ws, hello)

    gateway.behaviours = [run_one]
    caplog.set_level(logging.INFO, logger="services.agent")
    running = start_agent([gateway.url], gateway.token)
    await wait_until(lambda: bool(results) and len(running.agent.outbox) == 0)
    assert gateway.auth_headers[0] == f"Bearer {gateway.token}"
    hello = gateway.hellos[0]
    assert hello.host_id == "web-1"
    assert set(hello.capabilities) == {"exec", "metrics", "ledger", "result_query", "cancel", "output_stream"}
    assert hello.agent_version == __version__
    assert results[0].command_id == "c1"
    assert results[0].stdout == "hi\n"
    assert results[0].exit_code == 4
    public = signing.parse_public(running.agent.trust.public_key)
    assert signing.verify_result(public, "web-1", results[0])
    assert hello.signed_at is not None
    assert signing.verify_values(public, signing.HELLO_DOMAIN, signing.hello_values(hello), hello.signature)
    assert f"session s0 established with {gateway.url}" in caplog.text
    assert gateway.token not in caplog.text


async def test_bad_token_is_rejected_and_retried(
    gateway: FakeGateway, start_agent: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    """HTTP 401 at the upgrade logs "token rejected" (without the token) and the agent keeps retrying."""
    wrong = generate_token()
    start_agent([gateway.url], wrong)
    await wait_until(lambda: len(gateway.auth_headers) >= 3)
    assert not gateway.hellos
    assert "token rejected" in caplog.text
    assert wrong not in caplog.text
    assert any(r.levelno == logging.ERROR for r in caplog.records if "token rejected" in r.getMessage())


async def test_superseded_waits_before_reconnecting(
    gateway: FakeGateway, start_agent: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    """After close code 4000 the agent waits superseded_backoff, not the short backoff, then returns."""
    closed_at: list[float] = []

    async def supersede(ws: ServerConnection, hello: Hello) -> None:
        await ws.close(CloseCode.SUPERSEDED, "superseded")
        closed_at.append(time.monotonic())

    gateway.behaviours = [supersede]
    start_agent([gateway.url], gateway.token, superseded_backoff=1.5)
    await wait_until(lambda: len(gateway.hellos) == 2, timeout=8)
    waited = gateway.connected_at[1] - closed_at[0]
    assert waited >= 1.4, waited
    assert any(r.levelno == logging.WARNING and "superseded" in r.getMessage() for r in caplog.records)


async def test_result_resent_after_abrupt_close(
    gateway: FakeGateway, start_agent: Callable[..., Running], tmp_path: Path
) -> None:
    """A connection dropped mid-command does not cancel it; its result is re-sent in the next session."""
    counter = tmp_path / "runs"
    resent: list[ExecResult] = []

    async def drop_mid_command(ws: ServerConnection, hello: Hello) -> None:
        command = f"sleep 0.5; echo run >> {counter}; echo done"
        await ws.send(gateway.exec("c7", command, timeout=10), text=True)
        await asyncio.sleep(0.1)
        assert ws.transport is not None
        ws.transport.abort()

    async def expect_resend(ws: ServerConnection, hello: Hello) -> None:
        result = await asyncio.wait_for(next_frame(ws, ExecResult), 10)
        assert isinstance(result, ExecResult)
        resent.append(result)
        await ws.send(encode(Ack(command_id=result.command_id)), text=True)
        await hold(ws, hello)

    gateway.behaviours = [drop_mid_command, expect_resend]
    running = start_agent([gateway.url], gateway.token)
    await wait_until(lambda: bool(resent) and len(running.agent.outbox) == 0, timeout=10)
    assert resent[0].command_id == "c7"
    assert resent[0].stdout == "done\n"
    assert signing.verify_result(signing.parse_public(running.agent.trust.public_key), "web-1", resent[0])
    assert counter.read_text() == "run\n"


async def test_ping_answered_while_command_runs(
    gateway: FakeGateway, start_agent: Callable[..., Running]
) -> None:
    """A gateway Ping is answered with the same id at once, not behind a running command."""
    order: list[str] = []

    async def probe(ws: ServerConnection, hello: Hello) -> None:
        await ws.send(gateway.exec("slow", "sleep 1.5", timeout=10), text=True)
        await ws.send(encode(Ping(id="hc-1")), text=True)
        sent = time.monotonic()
        while len(order) < 2:
            frame = await next_frame(ws)
            if isinstance(frame, Pong) and frame.id == "hc-1":
                order.append(f"pong after {time.monotonic() - sent:.2f}s")
            elif isinstance(frame, ExecResult):
                order.append("result")
        await hold(ws, hello)

    gateway.behaviours = [probe]
    start_agent([gateway.url], gateway.token)
    await wait_until(lambda: len(order) == 2, timeout=8)
    assert order[0].startswith("pong")
    assert order[1] == "result"


async def test_protocol_error_closes_1007_and_reconnects(
    gateway: FakeGateway, start_agent: Callable[..., Running]
) -> None:
    """A frame that is not JSON makes the agent close with 1007 and come back."""

    async def garbage(ws: ServerConnection, hello: Hello) -> None:
        await ws.send(b"{not json", text=True)
        await ws.wait_closed()

    gateway.behaviours = [garbage]
    start_agent([gateway.url], gateway.token)
    await wait_until(lambda: len(gateway.hellos) == 2)
    assert gateway.close_codes[0] == CloseCode.INVALID_DATA


async def test_going_away_moves_to_the_next_url(
    gateway: FakeGateway, start_agent: Callable[..., Running]
) -> None:
    """Close code 1001 sends the agent promptly to the next gateway URL."""
    second = FakeGateway(token=gateway.token, signer=gateway.signer)

    async def go_away(ws: ServerConnection, hello: Hello) -> None:
        await ws.close(CloseCode.GOING_AWAY, "shutting down")

    gateway.behaviours = [go_away]
    async with serve(second.handler, "127.0.0.1", 0, process_request=second.process_request) as server:
        second.server = server
        start_agent([gateway.url, second.url], gateway.token, backoff_initial=0.2, backoff_max=5)
        await wait_until(lambda: len(second.hellos) == 1, timeout=3)
    assert len(gateway.hellos) == 1
    assert second.connected_at[0] - gateway.connected_at[0] < 1.0


async def test_swarm_holds_many_sessions(caplog: pytest.LogCaptureFixture) -> None:
    """Swarm mode establishes one session per token, answers Ping and Exec without spawning."""
    tokens = {HostId(f"sw-{i:03d}"): generate_token() for i in range(20)}
    answers: list[AgentFrame] = []
    hellos: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        hello = decode_agent_frame(await ws.recv())
        assert isinstance(hello, Hello)
        hellos.append(hello.host_id)
        welcome = Welcome(
            session_id=SessionId(hello.host_id), gateway_id="gw1", ping_interval=20, max_result_bytes=4096
        )
        await ws.send(encode(welcome), text=True)
        if len(hellos) == 1:
            await ws.send(encode(Ping(id="p1")), text=True)
            await ws.send(encode(Exec(command_id=CommandId("x1"), command="rm -rf /", timeout=5)), text=True)
            answers.extend([decode_agent_frame(await ws.recv()), decode_agent_frame(await ws.recv())])
        await ws.wait_closed()

    caplog.set_level(logging.INFO, logger="services.dev.swarm")
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        task = asyncio.create_task(run_swarm(f"ws://127.0.0.1:{port}/agent", tokens, concurrency=5))
        try:
            await wait_until(lambda: "swarm: 20 sessions established" in caplog.text and len(answers) == 2)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert sorted(hellos) == sorted(tokens)
    assert answers[0] == Pong(id="p1")
    assert isinstance(answers[1], ExecResult)
    assert answers[1].exit_code == 0
    assert answers[1].command_id == "x1"
