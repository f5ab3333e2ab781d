"""Failover behaviour of a real gateway process on a real nats-server: requests queued behind a session that
ends are answered `unavailable` (never forwarded), an agent that stops reading is closed within the send
timeout, and the listening socket's accept backlog is a validated setting."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shared import subjects
from shared.errors import CloseCode, ErrorCode
from shared.ids import new_command_id
from shared.protocol import (
    ErrorReply,
    Exec,
    ExecRequest,
    PresenceDisconnected,
    PresenceEvent,
    Welcome,
    decode_exec_reply,
    decode_gateway_frame,
    decode_presence,
    encode,
)
from tests.integration.gateway_fixtures import api_client, hello, nats_server, synced
from tests.support.stack import Gateway, Stack

SEND_TIMEOUT_CLOSE = CloseCode.SEND_TIMEOUT  # 4004, as the agent sees it
BIG_COMMAND = "echo " + "x" * 60_000  # near the 64 KiB command limit: a few make megabytes


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One nats-server (enforcing the permission matrix) for this module."""
    with nats_server(tmp_path_factory.mktemp("nats")) as url:
        yield url


@pytest.fixture
def stack(nats_url: str, tmp_path: Path) -> Iterator[Stack]:
    """The test's processes (a file-backed token authority to start with), stopped at the end."""
    procs = Stack(tmp_path, nats_url)
    try:
        procs.start_authority()
        yield procs
    finally:
        for proc in procs.procs:
            proc.signal(signal.SIGCONT)  # never leave a stopped gateway behind a failed test
        procs.close()


@pytest.fixture
async def api(nats_url: str) -> AsyncIterator[NATS]:
    """A NATS client playing the API."""
    nc = await api_client(nats_url)
    yield nc
    await nc.close()


async def open_session(
    gw: Gateway, host: str, token: str, sock: socket.socket | None = None, max_queue: int = 16
) -> ClientConnection:
    """Connect to `gw` as `host` (over `sock` if given), say hello and read the Welcome."""
    headers = {"Authorization": f"Bearer {token}"}
    ws = await connect(gw.url, additional_headers=headers, compression=None, max_queue=max_queue, sock=sock)
    await ws.send(encode(hello(host)), text=True)
    frame = decode_gateway_frame(await ws.recv())
    assert isinstance(frame, Welcome), frame
    return ws


def replies(requests: Mapping[str, asyncio.Future[Msg]]) -> dict[str, ErrorReply]:
    """Each request's reply (all are typed errors here), by command id."""
    answers: dict[str, ErrorReply] = {}
    for command_id, future in requests.items():
        reply = decode_exec_reply(future.result().data)
        assert isinstance(reply, ErrorReply), reply
        assert reply.command_id == command_id
        answers[command_id] = reply
    return answers


async def test_requests_queued_behind_an_ended_session_get_unavailable(stack: Stack, api: NATS) -> None:
    """Requests routed to a gateway whose session then ends get `unavailable` at once, never `timeout`;
    none of them reached the agent, and everything the agent received is answered `disconnected`.

    20 requests reach the agent and stay in flight. Then the gateway is stopped (SIGSTOP) while 150 requests
    of ~60 KB are routed to it and the agent sends a second hello (a protocol error that ends the session);
    on SIGCONT the gateway ends the session while most requests are still on their way from nats-server.
    nats-py's unsubscribe() would drop those (checked: all 150 then wait their whole timeout).
    """
    token = stack.add_host("web-1")
    gw = stack.start_gateway("gw-drain", max_in_flight="1000", ping_interval="120")
    ws = await open_session(gw, "web-1", token)
    received: list[str] = []

    async def record() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in ws:
                frame = decode_gateway_frame(data)
                if isinstance(frame, Exec):
                    received.append(frame.command_id)

    def send(command: str) -> tuple[str, asyncio.Future[Msg]]:
        command_id = new_command_id()
        body = stack.signer.exec_body("web-1", ExecRequest(command=command, command_id=command_id))
        return command_id, asyncio.ensure_future(api.request(subjects.agent_exec("web-1"), body, timeout=60))

    reader = asyncio.create_task(record())
    requests = dict(send("sleep 30") for _ in range(20))  # these reach the agent and stay in flight
    async with asyncio.timeout(10):
        while len(received) < 20:
            await asyncio.sleep(0.05)
    in_flight = set(received)
    gw.proc.signal(signal.SIGSTOP)
    try:
        requests.update(send(BIG_COMMAND) for _ in range(150))
        await synced(api)  # every request is at the server, routed to the stopped gateway
        await ws.send(encode(hello("web-1")), text=True)  # a second hello: the gateway closes with 1008
        await asyncio.sleep(0.2)
    finally:
        gw.proc.signal(signal.SIGCONT)
    started = time.monotonic()
    _, unanswered = await asyncio.wait(requests.values(), timeout=10)
    assert not unanswered, f"{len(unanswered)} of {len(requests)} requests unanswered after 10 s"
    took = time.monotonic() - started
    async with asyncio.timeout(10):
        await reader
    assert ws.close_code == CloseCode.POLICY_VIOLATION
    answers = replies(requests)
    unavailable = {cid for cid, reply in answers.items() if reply.code == ErrorCode.UNAVAILABLE}
    disconnected = {cid for cid, reply in answers.items() if reply.code == ErrorCode.DISCONNECTED}
    assert unavailable | disconnected == set(requests), {reply.code for reply in answers.values()}
    assert in_flight <= disconnected
    assert unavailable, "no request was still queued when the session ended: the test proves nothing"
    assert not unavailable & set(received), "a request the agent received was answered unavailable"
    assert set(received) <= disconnected
    assert len(received) == len(set(received))  # each forwarded once
    assert took < 10
    assert "Traceback" not in gw.proc.log()


async def test_requests_queued_when_the_gateway_stops_get_unavailable(stack: Stack, api: NATS) -> None:
    """SIGTERM with requests still on their way to the gateway: those get `unavailable` (nothing ran), the
    ones the agent received `disconnected` after the drain timeout, and the gateway exits 0."""
    token = stack.add_host("web-3")
    gw = stack.start_gateway("gw-stop", max_in_flight="1000", ping_interval="120", drain_timeout="1")
    ws = await open_session(gw, "web-3", token)
    received: list[str] = []

    async def record() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for data in ws:
                frame = decode_gateway_frame(data)
                if isinstance(frame, Exec):
                    received.append(frame.command_id)

    reader = asyncio.create_task(record())
    requests: dict[str, asyncio.Future[Msg]] = {}
    gw.proc.signal(signal.SIGSTOP)
    try:
        for _ in range(150):
            command_id = new_command_id()
            body = stack.signer.exec_body("web-3", ExecRequest(command=BIG_COMMAND, command_id=command_id))
            requests[command_id] = asyncio.ensure_future(
                api.request(subjects.agent_exec("web-3"), body, timeout=60)
            )
        await synced(api)
        gw.proc.signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
    finally:
        gw.proc.signal(signal.SIGCONT)
    _, unanswered = await asyncio.wait(requests.values(), timeout=10)
    assert not unanswered, f"{len(unanswered)} of {len(requests)} requests unanswered after 10 s"
    async with asyncio.timeout(10):
        await reader
    assert ws.close_code == CloseCode.GOING_AWAY
    answers = replies(requests)
    unavailable = {cid for cid, reply in answers.items() if reply.code == ErrorCode.UNAVAILABLE}
    assert unavailable, "no request was still queued when the gateway stopped: the test proves nothing"
    assert not unavailable & set(received)
    assert {reply.code for cid, reply in answers.items() if cid not in unavailable} <= {
        ErrorCode.DISCONNECTED
    }
    assert gw.proc.stop(timeout=10) == 0
    assert "Traceback" not in gw.proc.log()


async def test_agent_that_stops_reading_is_closed_within_the_send_timeout(stack: Stack, api: NATS) -> None:
    """An agent that reads nothing (its receive window shut) while commands flood in: the first send that
    cannot finish within WARLOCK_GATEWAY_SEND_TIMEOUT closes the session with 4004; every request is answered
    (`disconnected` or `unavailable`, never left to time out), presence says why, the TCP connection is
    aborted, and the gateway serves the host's next session and stops promptly."""
    token = stack.add_host("web-2")
    gw = stack.start_gateway(
        "gw-stuck", max_in_flight="1000", ping_interval="120", send_timeout="1", close_timeout="1"
    )
    presence = await api.subscribe(subjects.presence("web-2"))
    await synced(api)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, so the flood fills it
    sock.connect(("127.0.0.1", gw.port))
    sock.setblocking(False)
    ws = await open_session(gw, "web-2", token, sock=sock, max_queue=1)  # then never reads again
    local_port = sock.getsockname()[1]
    ids = [new_command_id() for _ in range(200)]
    body = {
        cid: stack.signer.exec_body("web-2", ExecRequest(command=BIG_COMMAND, command_id=cid)) for cid in ids
    }
    started = time.monotonic()
    requests: dict[str, asyncio.Future[Msg]] = {
        cid: asyncio.ensure_future(api.request(subjects.agent_exec("web-2"), data, timeout=60))
        for cid, data in body.items()
    }
    _, unanswered = await asyncio.wait(requests.values(), timeout=10)
    took = time.monotonic() - started
    assert not unanswered, f"{len(unanswered)} of {len(requests)} requests unanswered after 10 s"
    answers = replies(requests)
    codes = {reply.code for reply in answers.values()}
    assert codes <= {ErrorCode.DISCONNECTED, ErrorCode.UNAVAILABLE}, codes
    assert ErrorCode.DISCONNECTED in codes  # some frames went out before the window shut
    assert took < 6, took  # send timeout 1 s (+ the time to fill the buffers), not 35 s of command timeout

    events: list[PresenceEvent] = []
    async with asyncio.timeout(5):
        while not any(isinstance(event, PresenceDisconnected) for event in events):
            events.append(decode_presence((await presence.next_msg(timeout=5)).data))
    gone = events[-1]
    assert isinstance(gone, PresenceDisconnected)
    assert gone.close_code == SEND_TIMEOUT_CLOSE
    assert gone.reason.startswith("send timeout")
    gw.proc.wait_for(r"closing 4004: the agent took no frame for 1s")

    async with asyncio.timeout(5):  # the gateway aborts a connection whose closing handshake cannot finish
        while connections(gw.port, local_port):
            await asyncio.sleep(0.1)
    ws.transport.abort()

    fresh = await open_session(gw, "web-2", token)  # the host's next session is served
    request = asyncio.ensure_future(
        api.request(
            subjects.agent_exec("web-2"), stack.signer.exec_body("web-2", '{"command": "true"}'), timeout=10
        )
    )
    frame = decode_gateway_frame(await fresh.recv())
    assert isinstance(frame, Exec)
    await fresh.close()
    reply = decode_exec_reply((await request).data)
    assert isinstance(reply, ErrorReply)
    assert reply.code == ErrorCode.DISCONNECTED
    stopping = time.monotonic()
    assert gw.proc.stop(timeout=10) == 0
    assert time.monotonic() - stopping < 5
    assert "Traceback" not in gw.proc.log()


def connections(gateway_port: int, local_port: int) -> list[str]:
    """Established gateway-side TCP connections to `local_port` (from ``ss``)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{gateway_port} and dport = :{local_port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


def listen_backlog(port: int) -> int:
    """The accept backlog of the socket listening on `port` (``ss -ltn``'s Send-Q)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"( sport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    lines = [line.split() for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    return int(lines[0][2])  # State Recv-Q Send-Q ... (-H drops the header, "state" filter not used)


async def test_accept_backlog_is_the_setting(stack: Stack) -> None:
    """The listening socket's backlog is WARLOCK_GATEWAY_BACKLOG (1024 by default), not asyncio's 100."""
    default = stack.start_gateway("gw-backlog-default")
    assert listen_backlog(default.port) == 1024
    assert "(accept backlog 1024)" in default.proc.log()
    custom = stack.start_gateway("gw-backlog-777", backlog="777")
    assert listen_backlog(custom.port) == 777


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WARLOCK_GATEWAY_BACKLOG", "0"),
        ("WARLOCK_GATEWAY_BACKLOG", "70000"),
        ("WARLOCK_GATEWAY_BACKLOG", "lots"),
        ("WARLOCK_GATEWAY_SEND_TIMEOUT", "0"),
        ("WARLOCK_GATEWAY_SEND_TIMEOUT", "soon"),
    ],
)
def test_bad_backlog_or_send_timeout_is_a_config_error(variable: str, value: str) -> None:
    """A bad value exits 2 with one line naming the setting and its variable, no traceback."""
    env = {**os.environ, variable: value}
    proc = subprocess.run(
        [sys.executable, "-c", "from services.gateway.cli import main; main()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    field = variable.removeprefix("WARLOCK_GATEWAY_").lower()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"warlock-gateway: config error: {field} ({variable}): "), proc.stderr
    assert "Traceback" not in proc.stderr
