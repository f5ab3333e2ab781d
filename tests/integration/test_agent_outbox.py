"""Un-acked results survive an agent restart: real agent processes, SIGKILLed, against a gateway that does
not ack (a WebSocket server in the test) and then against the real gateway on a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import VerifyKey
from websockets.asyncio.server import ServerConnection, serve

from services.dev.procs import BIN, Proc
from shared import signing, subjects
from shared.ids import CommandId, SessionId, new_command_id
from shared.protocol import (
    Ack,
    Exec,
    ExecError,
    ExecResult,
    Hello,
    Ping,
    Pong,
    Welcome,
    decode_agent_frame,
    decode_exec_reply,
    encode,
)
from tests.support.natsserver import NatsServer
from tests.support.stack import Stack

HOST = "web-1"


@dataclass
class Session:
    """One agent session on the test's gateway: what the agent sent, and a way to talk to it."""

    ws: ServerConnection
    results: list[ExecResult | ExecError] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    pongs: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    async def send(self, frame: Any) -> None:
        """Send a frame to the agent."""
        await self.ws.send(encode(frame), text=True)

    async def result(self, index: int = 0) -> ExecResult | ExecError:
        """The `index`-th result of this session, waiting for it."""
        async with asyncio.timeout(15):
            while len(self.results) <= index:
                self.arrived.clear()
                await self.arrived.wait()
        return self.results[index]

    async def settled(self) -> list[ExecResult | ExecError]:
        """Every result the agent sent before answering a ping sent now: it re-sends its outbox right
        after the welcome, before it reads anything, so this is exactly what it re-sent."""
        probe = f"probe-{len(self.pongs)}"
        self.pongs[probe] = asyncio.get_running_loop().create_future()
        await self.send(Ping(id=probe))
        async with asyncio.timeout(15):
            await self.pongs[probe]
        return list(self.results)


@dataclass
class NoAckGateway:
    """Speaks the gateway protocol to any token and never acks (unless the test sends an Ack)."""

    sessions: list[Session] = field(default_factory=list)
    new_session: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handler(self, ws: ServerConnection) -> None:
        """Welcome the agent, then record its results and answer its pings."""
        hello = decode_agent_frame(await ws.recv())
        assert isinstance(hello, Hello)
        welcome = Welcome(
            session_id=SessionId(f"s{len(self.sessions)}"),
            gateway_id="test",
            ping_interval=20,
            max_result_bytes=64 * 1024,
        )
        await ws.send(encode(welcome), text=True)
        session = Session(ws)
        self.sessions.append(session)
        self.new_session.set()
        with contextlib.suppress(Exception):
            async for data in ws:
                frame = decode_agent_frame(data)
                if isinstance(frame, Ping):
                    await session.send(Pong(id=frame.id))
                elif isinstance(frame, Pong) and frame.id in session.pongs:
                    session.pongs[frame.id].set_result(None)
                elif isinstance(frame, ExecResult | ExecError):
                    session.results.append(frame)
                    session.arrived.set()

    async def session(self, index: int) -> Session:
        """The `index`-th session, waiting for it."""
        async with asyncio.timeout(20):
            while len(self.sessions) <= index:
                self.new_session.clear()
                await self.new_session.wait()
        return self.sessions[index]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Stack]:
    """A stack used only to write agent configs and own agent processes (no NATS needed)."""
    stack = Stack(tmp_path, "nats://127.0.0.1:1")
    yield stack
    stack.close()


@pytest.fixture
async def gateway() -> AsyncIterator[NoAckGateway]:
    """The test's never-acking gateway on a free loopback port."""
    gw = NoAckGateway()
    async with serve(gw.handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        gw.url = f"ws://127.0.0.1:{port}/agent"
        yield gw


def start_agent(stack: Stack, name: str, url: str, token: str = "ab" * 32, **cfg: Any) -> Proc:
    """A real `warlock-agent run` process named `name`; its config, identity key, ledger and outbox are
    always those of "agent" (the same host restarted)."""
    config = stack.write_agent_config("agent", HOST, token, [url], **cfg)
    return stack.start(name, [str(BIN / "warlock-agent"), "run", "--config", str(config)], {})


def exec_frame(stack: Stack, command: str, command_id: str | None = None) -> Exec:
    """A signed Exec frame for web-1."""
    frame = Exec(command_id=CommandId(command_id or new_command_id()), command=command, timeout=10)
    signed = stack.signer.sign("exec", frame, HOST)
    assert isinstance(signed, Exec)
    return signed


def agent_key(stack: Stack) -> VerifyKey:
    """The public key the agent made on its host."""
    return signing.parse_public(signing.public_text(signing.load_private(stack.root / "agent.key")))


def outbox(stack: Stack) -> Path:
    """The agent's outbox directory (the default: beside its ledger)."""
    return stack.root / "agent-ledger.outbox"


def kill(proc: Proc) -> None:
    """SIGKILL the agent: nothing runs on the way out."""
    proc.signal(signal.SIGKILL)
    proc.popen.wait(10)


async def test_an_unacked_result_is_resent_once_after_a_sigkill(
    rig: Stack, gateway: NoAckGateway, tmp_path: Path
) -> None:
    """The agent runs a command, sends its signed result, gets no ack, and is SIGKILLed. Restarted, it
    sends that same signed result once on its new session (the command did not run again). Acked, the
    result is gone from disk, and after another SIGKILL and restart nothing is re-sent."""
    counter = tmp_path / "count"
    agent = start_agent(rig, "agent", gateway.url)
    first = await gateway.session(0)
    request = exec_frame(rig, f"echo run >> {counter}; echo hello")
    await first.send(request)
    sent = await first.result()
    assert isinstance(sent, ExecResult)
    assert sent.stdout == "hello\n"
    entry = outbox(rig) / f"{request.command_id}.json"
    assert entry.is_file()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE(outbox(rig).stat().st_mode) == 0o700
    kill(agent)

    again = start_agent(rig, "agent-2", gateway.url)
    second = await gateway.session(1)
    resent = await second.settled()
    assert resent == [sent]  # once, the very result first sent: same output, same signature
    assert isinstance(resent[0], ExecResult)
    assert signing.verify_result(agent_key(rig), HOST, resent[0])
    assert counter.read_text() == "run\n"
    again.wait_for(r"outbox \S+: 1 un-acked result\(s\) kept from before")

    await second.send(Ack(command_id=request.command_id))
    async with asyncio.timeout(10):
        while entry.exists():
            await asyncio.sleep(0.02)
    kill(again)

    start_agent(rig, "agent-3", gateway.url)
    third = await gateway.session(2)
    assert await third.settled() == []
    assert list(outbox(rig).iterdir()) == []
    assert counter.read_text() == "run\n"


async def test_corrupt_outbox_entries_are_skipped(rig: Stack, gateway: NoAckGateway, tmp_path: Path) -> None:
    """Beside a real un-acked result, a garbage file and a torn copy in the outbox: the agent starts,
    logs one line for each, re-sends the real one, and serves new commands."""
    agent = start_agent(rig, "agent", gateway.url)
    first = await gateway.session(0)
    request = exec_frame(rig, "echo kept")
    await first.send(request)
    sent = await first.result()
    kill(agent)
    good = (outbox(rig) / f"{request.command_id}.json").read_bytes()
    (outbox(rig) / "garbage.json").write_bytes(b"\x00\x01{{{ not json")
    (outbox(rig) / "torn.json").write_bytes(good[: len(good) // 2])

    again = start_agent(rig, "agent-2", gateway.url)
    second = await gateway.session(1)
    assert await second.settled() == [sent]
    assert again.count(r"skipping corrupt entry garbage\.json") == 1
    assert again.count(r"skipping corrupt entry torn\.json") == 1
    assert again.count("Traceback") == 0
    await second.send(exec_frame(rig, "echo new"))
    fresh = await second.result(1)
    assert isinstance(fresh, ExecResult)
    assert fresh.stdout == "new\n"


async def test_the_outbox_bound_holds_across_a_restart(rig: Stack, gateway: NoAckGateway) -> None:
    """outbox_max_bytes = 5000 and three un-acked results of 3000 bytes each: on disk and when re-sent
    after a SIGKILL, the two oldest have lost their output (exit status kept, `truncated`, signed again
    by the agent), the newest has all of it."""
    agent = start_agent(rig, "agent", gateway.url, outbox_max_bytes=5000)
    first = await gateway.session(0)
    ids = []
    for code in range(3):
        request = exec_frame(rig, f"head -c 3000 /dev/zero | tr '\\0' x; exit {code}")
        ids.append(request.command_id)
        await first.send(request)
        await first.result(code)
    kill(agent)
    on_disk = sum(p.stat().st_size for p in outbox(rig).iterdir())
    assert on_disk < 5000 + 3 * 1024

    start_agent(rig, "agent-2", gateway.url, outbox_max_bytes=5000)
    second = await gateway.session(1)
    resent = await second.settled()
    assert [r.command_id for r in resent] == ids
    public = agent_key(rig)
    for code, result in enumerate(resent):
        assert isinstance(result, ExecResult)
        assert result.exit_code == code
        assert signing.verify_result(public, HOST, result)
    assert [len(r.stdout) for r in resent if isinstance(r, ExecResult)] == [0, 0, 3000]
    assert [r.truncated for r in resent if isinstance(r, ExecResult)] == [True, True, False]


async def test_the_gateway_publishes_a_result_resent_after_a_restart(
    nats_server: NatsServer, tmp_path: Path, gateway: NoAckGateway
) -> None:
    """End to end: the result that was never acked is re-sent by the restarted agent to the real gateway,
    which has no request waiting for it and publishes it on warlock.result.web-1, where it verifies
    against the agent's key; the gateway's ack empties the outbox on disk."""
    stack = Stack(tmp_path, nats_server.url)
    try:
        stack.start_authority()
        real = stack.start_gateway()
        token = stack.add_host(HOST)
        agent = start_agent(stack, "agent", gateway.url, token)
        first = await gateway.session(0)
        request = exec_frame(stack, "echo late")
        await first.send(request)
        sent = await first.result()
        kill(agent)

        nc = await nats_server.connect("api")
        try:
            published: asyncio.Queue[bytes] = asyncio.Queue()

            async def on_result(msg: Any) -> None:
                await published.put(msg.data)

            await nc.subscribe(subjects.result(HOST), cb=on_result)
            await nc.flush()
            start_agent(stack, "agent-2", real.url, token)
            async with asyncio.timeout(20):
                reply = decode_exec_reply(await published.get())
        finally:
            await nc.close()
        assert reply == sent
        assert isinstance(reply, ExecResult)
        assert reply.stdout == "late\n"
        assert signing.verify_result(agent_key(stack), HOST, reply)
        entry = outbox(stack) / f"{request.command_id}.json"
        async with asyncio.timeout(10):
            while entry.exists():
                await asyncio.sleep(0.02)
    finally:
        stack.close()
