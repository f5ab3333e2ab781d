"""Session lifecycle against real servers: bad input, newest session wins, dead peers, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from websockets.asyncio.client import connect

from services.gateway.server import Gateway
from shared import subjects
from shared.errors import CloseCode
from shared.ids import HostId
from shared.protocol import (
    Exec,
    ExecRequest,
    ExecResult,
    Ping,
    PresenceDisconnected,
    decode_exec_reply,
    decode_presence,
    encode,
)
from tests.integration.gateway_fixtures import (
    Fleet,
    agent,
    agent_url,
    api_client,
    hello,
    nats_server,
    running_gateway,
    synced,
    token_authority,
)

HOSTS = ("web-1", "web-2", "good-1")


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One nats-server for this module."""
    with nats_server(tmp_path_factory.mktemp("nats")) as url:
        yield url


@pytest.fixture
async def fleet(nats_url: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    """Hosts with fresh tokens, served by a token authority."""
    hosts = Fleet(tmp_path / "tokens.json", HOSTS)
    async with token_authority(nats_url, hosts.path):
        yield hosts


@pytest.fixture
async def api(nats_url: str) -> AsyncIterator[NATS]:
    """A NATS client playing the API."""
    nc = await api_client(nats_url)
    yield nc
    await nc.close()


async def assert_serves(api: NATS, gateway: Gateway, fleet: Fleet, host: str = "good-1") -> None:
    """A fresh session for `host` on `gateway` completes an exec round trip."""
    async with agent(gateway, host, fleet.tokens[host]) as fake:
        request = asyncio.ensure_future(
            api.request(subjects.agent_exec(host), encode(ExecRequest(command="true")), timeout=5)
        )
        frame = await fake.recv()
        assert isinstance(frame, Exec)
        await fake.send(ExecResult(command_id=frame.command_id, exit_code=0, duration_ms=1))
        assert isinstance(decode_exec_reply((await request).data), ExecResult)


async def wait_for_log(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Wait until a captured log line contains `text` (the handler logs after the close handshake)."""
    async with asyncio.timeout(5):
        while not any(text in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("first", "second", "code"),
    [
        (None, b"{not json", CloseCode.INVALID_DATA),
        (None, '{"type": "reboot"}', CloseCode.POLICY_VIOLATION),
        (None, '{"type": "ping", "extra": 1}', CloseCode.POLICY_VIOLATION),
        (None, "x" * 70_000, CloseCode.MESSAGE_TOO_BIG),
        (None, encode(hello("web-1")).decode(), CloseCode.POLICY_VIOLATION),
        ("{oops", None, CloseCode.INVALID_DATA),
        ('{"type": "ping"}', None, CloseCode.POLICY_VIOLATION),
        ("x" * 70_000, None, CloseCode.MESSAGE_TOO_BIG),
        (encode(hello("web-2")).decode(), None, CloseCode.POLICY_VIOLATION),
    ],
    ids=["bad-json", "unknown-type", "extra-field", "oversized", "second-hello",
         "first-bad-json", "first-not-hello", "first-oversized", "host-mismatch"],
)  # fmt: skip
async def test_bad_frames_close_that_connection_only(
    nats_url: str,
    fleet: Fleet,
    api: NATS,
    first: str | None,
    second: str | bytes | None,
    code: CloseCode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bad frame closes its connection with the matching code and one WARNING; others carry on."""
    caplog.set_level(logging.INFO, logger="services.gateway")
    async with (
        running_gateway(nats_url, max_frame_bytes=65_536) as gateway,
        agent(gateway, "web-2", fleet.tokens["web-2"]) as bystander,
    ):
        async with agent(gateway, "web-1", fleet.tokens["web-1"], say_hello=first is None) as fake:
            caplog.clear()
            await fake.ws.send(first if first is not None else second or "")
            assert await fake.close_code() == code
        await wait_for_log(caplog, f"closing {int(code)}")
        await asyncio.sleep(0.1)
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert f"closing {int(code)}" in warnings[0].getMessage()
        await bystander.send(Ping(id="still-here"))
        assert (await bystander.recv()).type == "pong"
        await assert_serves(api, gateway, fleet)


async def test_no_hello_in_time_closes_4001(nats_url: str, fleet: Fleet, api: NATS) -> None:
    """A connection that sends nothing within auth_timeout is closed with 4001."""
    async with running_gateway(nats_url, auth_timeout=0.3) as gateway:
        async with agent(gateway, "web-1", fleet.tokens["web-1"], say_hello=False) as fake:
            assert await fake.close_code() == CloseCode.AUTH_TIMEOUT
        await assert_serves(api, gateway, fleet)


async def test_silent_session_closed_4002_and_unsubscribed(nats_url: str, fleet: Fleet, api: NATS) -> None:
    """A session that receives pings but never answers is closed 4002 and its host unsubscribed."""
    async with running_gateway(nats_url, ping_interval=0.2, ping_timeout=0.3) as gateway:
        async with agent(gateway, "web-1", fleet.tokens["web-1"]) as fake:
            assert isinstance(await fake.ws.recv(), str)  # a keepalive ping, left unanswered
            assert await fake.close_code(timeout=3) == CloseCode.PING_TIMEOUT
        with pytest.raises(nats.errors.NoRespondersError):
            await api.request(subjects.agent_exec("web-1"), encode(ExecRequest(command="true")), timeout=5)
        async with agent(gateway, "web-2", fleet.tokens["web-2"]) as alive:
            for _ in range(4):  # FakeAgent answers keepalive pings while it waits
                with pytest.raises(TimeoutError):
                    await alive.recv(timeout=0.25)
            assert "web-2" in gateway.sessions


async def test_same_host_twice_on_one_gateway_closes_older_4000(
    nats_url: str, fleet: Fleet, api: NATS
) -> None:
    """A second session for a host supersedes the first (4000); requests reach the new one."""
    presence = await api.subscribe(subjects.presence("web-1"))
    await synced(api)
    async with (
        running_gateway(nats_url) as gateway,
        agent(gateway, "web-1", fleet.tokens["web-1"]) as old,
        agent(gateway, "web-1", fleet.tokens["web-1"]) as new,
    ):
        assert await old.close_code() == CloseCode.SUPERSEDED
        assert gateway.sessions[HostId("web-1")].session_id == (new.welcome and new.welcome.session_id)
        request = asyncio.ensure_future(
            api.request(subjects.agent_exec("web-1"), encode(ExecRequest(command="id")), timeout=5)
        )
        frame = await new.recv()
        assert isinstance(frame, Exec)
        await new.send(ExecResult(command_id=frame.command_id, exit_code=0, duration_ms=1))
        assert isinstance(decode_exec_reply((await request).data), ExecResult)
    events = [decode_presence((await presence.next_msg(timeout=5)).data) for _ in range(4)]
    assert [e.type for e in events] == ["connected", "disconnected", "connected", "disconnected"]
    assert isinstance(events[1], PresenceDisconnected)
    assert events[1].close_code == CloseCode.SUPERSEDED


async def test_newest_session_wins_across_gateways(nats_url: str, fleet: Fleet, api: NATS) -> None:
    """Host connects to gateway A then B: A closes its session with 4000 and B serves the host."""
    async with (
        running_gateway(nats_url, gateway_id="gw-a") as gw_a,
        running_gateway(nats_url, gateway_id="gw-b") as gw_b,
        agent(gw_a, "web-1", fleet.tokens["web-1"]) as on_a,
        agent(gw_b, "web-1", fleet.tokens["web-1"]) as on_b,
    ):
        assert await on_a.close_code() == CloseCode.SUPERSEDED
        assert "web-1" not in gw_a.sessions
        for _ in range(5):
            request = asyncio.ensure_future(
                api.request(subjects.agent_exec("web-1"), encode(ExecRequest(command="id")), timeout=5)
            )
            frame = await on_b.recv()
            assert isinstance(frame, Exec)
            await on_b.send(ExecResult(command_id=frame.command_id, exit_code=0, duration_ms=1))
            assert isinstance(decode_exec_reply((await request).data), ExecResult)
            assert (await on_b.recv()).type == "ack"
        msg = await api.request(subjects.gateway_sessions("gw-b"), b"", timeout=5)
        assert json.loads(msg.data) == {"gateway_id": "gw-b", "hosts": ["web-1"]}


async def test_shutdown_drains_then_closes_1001(nats_url: str, fleet: Fleet, api: NATS) -> None:
    """On stop the host is unsubscribed, an in-flight request still completes, the agent gets 1001."""
    async with (
        running_gateway(nats_url, drain_timeout=5.0) as gateway,
        agent(gateway, "web-1", fleet.tokens["web-1"]) as fake,
    ):
        body = encode(ExecRequest(command="sleep 1", command_id="drain-1"))
        request = asyncio.ensure_future(api.request(subjects.agent_exec("web-1"), body, timeout=5))
        frame = await fake.recv()
        stopping = asyncio.ensure_future(gateway.stop())
        await asyncio.sleep(0.2)
        with pytest.raises(nats.errors.NoRespondersError):
            await api.request(subjects.agent_exec("web-1"), body, timeout=5)
        assert isinstance(frame, Exec)
        await fake.send(ExecResult(command_id="drain-1", exit_code=0, duration_ms=1000))
        assert isinstance(decode_exec_reply((await request).data), ExecResult)
        assert await fake.close_code() == CloseCode.GOING_AWAY
        await stopping
    with pytest.raises(OSError):  # noqa: PT011  (the listening socket is gone)
        await connect(agent_url(gateway), open_timeout=2)


async def test_unauthenticated_connection_rejected_while_others_served(
    nats_url: str, fleet: Fleet, api: NATS
) -> None:
    """Many refused upgrades in a row leave no session behind and the gateway still serves."""
    async with running_gateway(nats_url) as gateway:
        for token in ("", "Bearer short", f"Bearer {'0' * 64}") * 5:
            headers = {"Authorization": token} if token else {}
            with pytest.raises(Exception, match="HTTP 401"):
                await connect(agent_url(gateway), additional_headers=headers)
        assert gateway.sessions == {}
        await assert_serves(api, gateway, fleet)
