"""Gateway ⇄ NATS bridging against a real nats-server, a real gateway and a WebSocket fake agent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from websockets.asyncio.client import connect

from services.gateway.server import Gateway
from shared import signing, subjects
from shared.errors import CloseCode, ErrorCode
from shared.limits import MIN_EXEC_GRACE_S
from shared.protocol import (
    Ack,
    ErrorReply,
    Exec,
    ExecError,
    ExecRequest,
    ExecResult,
    Metrics,
    MetricsEvent,
    MetricsSample,
    Ping,
    PingReply,
    Pong,
    decode_exec_reply,
    decode_model,
    decode_ping_reply,
    decode_presence,
    encode,
)
from tests.integration.gateway_fixtures import (
    FakeAgent,
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
from tests.support.trust import TestSigner

HOSTS = ("web-1", "web-2", "db-1")


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One nats-server for this module."""
    with nats_server(tmp_path_factory.mktemp("nats")) as url:
        yield url


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    """Hosts with fresh tokens in a token file."""
    return Fleet(tmp_path / "tokens.json", HOSTS)


@pytest.fixture
async def gw(nats_url: str, fleet: Fleet) -> AsyncIterator[Gateway]:
    """A gateway with a token authority, in-flight limit 2, the shortest exec grace it accepts."""
    async with (
        token_authority(nats_url, fleet.path),
        running_gateway(
            nats_url, gateway_id="gw-bridge", max_in_flight=2, exec_grace=MIN_EXEC_GRACE_S
        ) as gateway,
    ):
        yield gateway


@pytest.fixture
async def api(nats_url: str) -> AsyncIterator[NATS]:
    """A NATS client playing the API."""
    nc = await api_client(nats_url)
    yield nc
    await nc.close()


async def exec_round_trip(api: NATS, fake: FakeAgent, host: str, command: str = "uptime") -> ExecResult:
    """Send an exec request over NATS, answer it as the agent, check the Ack; return the reply."""
    request = asyncio.ensure_future(
        api.request(subjects.agent_exec(host), encode(ExecRequest(command=command)), timeout=5)
    )
    frame = await fake.recv()
    assert isinstance(frame, Exec)
    assert frame.command == command
    result = ExecResult(command_id=frame.command_id, exit_code=0, stdout="up 3 days\n", duration_ms=1.5)
    await fake.send(result)
    assert await fake.recv() == Ack(command_id=frame.command_id)
    reply = decode_exec_reply((await request).data)
    assert isinstance(reply, ExecResult)
    return reply


async def test_exec_round_trip_replies_with_the_result_and_acks(gw: Gateway, fleet: Fleet, api: NATS) -> None:
    """An exec request reaches the agent with a generated command id; its result is the reply, then Ack."""
    async with agent(gw, "web-1", fleet.tokens["web-1"]) as fake:
        reply = await exec_round_trip(api, fake, "web-1")
    assert reply.exit_code == 0
    assert reply.stdout == "up 3 days\n"
    assert len(reply.command_id) == 32


async def test_exec_error_from_agent_becomes_typed_error(gw: Gateway, fleet: Fleet, api: NATS) -> None:
    """An agent ExecError is answered as an ErrorReply with the same code and command id."""
    async with agent(gw, "web-1", fleet.tokens["web-1"]) as fake:
        body = encode(ExecRequest(command="x", command_id="cmd-1"))
        request = asyncio.ensure_future(api.request(subjects.agent_exec("web-1"), body, timeout=5))
        frame = await fake.recv()
        assert isinstance(frame, Exec)
        await fake.send(ExecError(command_id="cmd-1", code=ErrorCode.EXEC_FAILED, description="no shell"))
        assert await fake.recv() == Ack(command_id="cmd-1")
        reply = decode_exec_reply((await request).data)
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.command_id) == (ErrorCode.EXEC_FAILED, "cmd-1")


async def test_bad_body_and_unknown_verb_get_bad_request(gw: Gateway, fleet: Fleet, api: NATS) -> None:
    """A body that does not validate gets bad_request; the session carries on. (An unknown verb,
    ``warlock.agent.<host>.reboot``, is refused by the server before any gateway sees it: no role may
    publish there, see test_nats_permissions; the gateway would answer bad_request too.)"""
    async with agent(gw, "web-1", fleet.tokens["web-1"]) as fake:
        for subject, body in (
            (subjects.agent_exec("web-1"), b'{"command": ""}'),
            (subjects.agent_exec("web-1"), b'{"command": "echo a\\u0000b"}'),  # NUL: never forwarded
            (subjects.agent_exec("web-1"), b"not json"),
        ):
            msg = await api.request(subject, body, timeout=5)
            reply = decode_exec_reply(msg.data)
            assert isinstance(reply, ErrorReply)
            assert reply.code == ErrorCode.BAD_REQUEST
            assert msg.headers is not None
            assert msg.headers["Nats-Service-Error-Code"] == "400"
        await exec_round_trip(api, fake, "web-1")


async def test_timeout_then_late_result_is_published(gw: Gateway, fleet: Fleet, api: NATS) -> None:
    """No result within timeout + grace → typed timeout; the late result goes to warlock.result.<host>."""
    late = await api.subscribe(subjects.result("web-1"))
    await synced(api)
    async with agent(gw, "web-1", fleet.tokens["web-1"]) as fake:
        body = encode(ExecRequest(command="sleep 9", timeout=0.2, command_id="slow-1"))
        msg = await api.request(subjects.agent_exec("web-1"), body, timeout=0.2 + MIN_EXEC_GRACE_S + 5)
        reply = decode_exec_reply(msg.data)
        assert isinstance(reply, ErrorReply)
        assert (reply.code, reply.command_id) == (ErrorCode.TIMEOUT, "slow-1")
        frame = await fake.recv()
        assert isinstance(frame, Exec)
        await fake.send(ExecResult(command_id="slow-1", exit_code=0, duration_ms=9000))
        assert await fake.recv() == Ack(command_id="slow-1")
        published = await late.next_msg(timeout=5)
    assert decode_model(ExecResult, published.data).command_id == "slow-1"


async def test_in_flight_limit_answers_busy(gw: Gateway, fleet: Fleet, api: NATS) -> None:
    """Over max_in_flight (2) the request is refused with busy and nothing is forwarded."""
    async with agent(gw, "web-1", fleet.tokens["web-1"]) as fake:
        waiting = [
            asyncio.ensure_future(
                api.request(subjects.agent_exec("web-1"), encode(ExecRequest(command="sleep 1")), timeout=5)
            )
            for _ in range(2)
        ]
        execs = [await fake.recv(), await fake.recv()]
        msg = await api.request(subjects.agent_exec("web-1"), encode(ExecRequest(command="third")), timeout=5)
        reply = decode_exec_reply(msg.data)
        assert isinstance(reply, ErrorReply)
        assert reply.code == ErrorCode.BUSY
        for frame in execs:
            assert isinstance(frame, Exec)
            await fake.send(ExecResult(command_id=frame.command_id, exit_code=0, duration_ms=1))
        for done in waiting:
            assert isinstance(decode_exec_reply((await done).data), ExecResult)


async def test_same_command_id_is_sent_once(gw: Gateway, fleet: Fleet, api: NATS) -> None:
    """Two requests with one command id in flight share one Exec frame and both get the result."""
    async with agent(gw, "web-1", fleet.tokens["web-1"]) as fake:
        body = encode(ExecRequest(command="date", command_id="same-1"))
        first = asyncio.ensure_future(api.request(subjects.agent_exec("web-1"), body, timeout=5))
        frame = await fake.recv()
        second = asyncio.ensure_future(api.request(subjects.agent_exec("web-1"), body, timeout=5))
        await asyncio.sleep(0.2)
        await fake.send(ExecResult(command_id="same-1", exit_code=0, stdout="now", duration_ms=1))
        assert await fake.recv() == Ack(command_id="same-1")
        replies = [decode_exec_reply((await f).data) for f in (first, second)]
        with pytest.raises(TimeoutError):
            await fake.recv(timeout=0.3)  # no second Exec
    assert isinstance(frame, Exec)
    assert all(isinstance(r, ExecResult) and r.stdout == "now" for r in replies)


async def test_no_session_means_no_responders(gw: Gateway, api: NATS) -> None:
    """A host with no live session has no responder: the request fails at once."""
    with pytest.raises(nats.errors.NoRespondersError):
        await api.request(subjects.agent_exec("db-1"), encode(ExecRequest(command="true")), timeout=5)


async def test_ping_request_round_trips_to_the_agent(gw: Gateway, fleet: Fleet, api: NATS) -> None:
    """A NATS ping is forwarded as Ping(id); the agent's Pong yields a PingReply with the session."""
    async with agent(gw, "web-2", fleet.tokens["web-2"]) as fake:
        request = asyncio.ensure_future(api.request(subjects.agent_ping("web-2"), b"", timeout=5))
        frame = await fake.recv()
        assert isinstance(frame, Ping)
        assert frame.id is not None
        await fake.send(Pong(id=frame.id))
        reply = decode_ping_reply((await request).data)
        assert fake.welcome is not None
    assert isinstance(reply, PingReply)
    assert (reply.host_id, reply.gateway_id, reply.agent_version) == ("web-2", "gw-bridge", "9.9.9")
    assert reply.session_id == fake.welcome.session_id
    assert reply.agent_rtt_ms >= 0


async def test_agent_ping_gets_pong_and_metrics_are_published(gw: Gateway, fleet: Fleet, api: NATS) -> None:
    """The agent's Ping gets a Pong with its id; a Metrics frame becomes a MetricsEvent on NATS."""
    events = await api.subscribe(subjects.metrics("web-1"))
    await synced(api)
    sample = MetricsSample(
        timestamp=1.0, cpu_percent=5, load_1=0.1, load_5=0.1, load_15=0.1, memory_total=100,
        memory_available=50, memory_used=50, memory_percent=50, swap_total=0, swap_used=0, swap_percent=0,
        net_bytes_sent=1, net_bytes_recv=2, net_packets_sent=3, net_packets_recv=4, uptime_s=9,
        process_count=7,
    )  # fmt: skip
    async with agent(gw, "web-1", fleet.tokens["web-1"]) as fake:
        await fake.send(Ping(id="p1"))
        assert await fake.recv() == Pong(id="p1")
        await fake.send(Metrics(sample=sample))
        msg = await events.next_msg(timeout=5)
    event = decode_model(MetricsEvent, msg.data)
    assert (event.host_id, event.gateway_id, event.sample) == ("web-1", "gw-bridge", sample)


async def test_disconnect_fails_pending_and_publishes_presence(gw: Gateway, fleet: Fleet, api: NATS) -> None:
    """Presence connected on hello; on disconnect a pending request gets `disconnected` and presence too."""
    presence = await api.subscribe(subjects.presence("web-2"))
    await synced(api)
    async with agent(gw, "web-2", fleet.tokens["web-2"]) as fake:
        body = encode(ExecRequest(command="sleep 5", command_id="gone-1"))
        request = asyncio.ensure_future(api.request(subjects.agent_exec("web-2"), body, timeout=5))
        assert isinstance(await fake.recv(), Exec)
        await fake.ws.close()
    reply = decode_exec_reply((await request).data)
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.command_id) == (ErrorCode.DISCONNECTED, "gone-1")
    connected = decode_presence((await presence.next_msg(timeout=5)).data)
    disconnected = decode_presence((await presence.next_msg(timeout=5)).data)
    assert connected.type == "connected"
    assert connected.hostname == "web-2.test"
    assert disconnected.type == "disconnected"
    assert disconnected.session_id == connected.session_id
    assert disconnected.close_code == CloseCode.NORMAL
    with pytest.raises(nats.errors.NoRespondersError):
        await api.request(subjects.agent_exec("web-2"), body, timeout=5)


async def test_welcome_carries_session_limits(gw: Gateway, fleet: Fleet, api: NATS) -> None:
    """Welcome names the gateway, the ping interval and a result limit under NATS's max payload."""
    async with agent(gw, "db-1", fleet.tokens["db-1"]) as fake:
        welcome = fake.welcome
    assert welcome is not None
    assert welcome.gateway_id == "gw-bridge"
    assert welcome.ping_interval == gw.settings.ping_interval
    assert welcome.max_result_bytes == min(gw.settings.max_frame_bytes, api.max_payload) - 1024


async def test_binary_frames_are_decoded_as_json(gw: Gateway, fleet: Fleet) -> None:
    """A binary frame carrying JSON is accepted like a text frame."""
    headers = {"Authorization": f"Bearer {fleet.tokens['db-1']}"}
    async with connect(agent_url(gw), additional_headers=headers) as ws:
        await ws.send(encode(hello("db-1")))
        fake = FakeAgent(ws)
        assert (await fake.recv()).type == "welcome"
        await ws.send(encode(Ping(id="b")))
        assert await fake.recv() == Pong(id="b")


async def test_signatures_pass_through_unchanged(
    gw: Gateway, fleet: Fleet, api: NATS, tmp_path: Path
) -> None:
    """The gateway neither checks nor makes signatures: the request's reaches the Exec frame as is, and
    the agent's hello signature and signed_at reach presence; the agent's result signature is replied."""
    signer = TestSigner(tmp_path)
    presence = await api.subscribe(subjects.presence("db-1"))
    await synced(api)
    headers = {"Authorization": f"Bearer {fleet.tokens['db-1']}"}
    async with connect(agent_url(gw), additional_headers=headers, compression=None) as ws:
        fake = FakeAgent(ws)
        signed_hello = hello("db-1").model_copy(update={"signed_at": 1234.5, "signature": "h" * 86})
        await fake.send(signed_hello)
        assert (await fake.recv()).type == "welcome"
        body = signer.exec_body("db-1", b'{"command": "uptime", "timeout": 7}')
        sent = decode_model(ExecRequest, body)
        request = asyncio.ensure_future(api.request(subjects.agent_exec("db-1"), body, timeout=5))
        frame = await fake.recv()
        assert isinstance(frame, Exec)
        assert frame.signature == sent.signature
        assert signing.signed_fields(frame) == signing.signed_fields(sent)
        result = ExecResult(command_id=frame.command_id, exit_code=0, duration_ms=1.0, signature="r" * 86)
        await fake.send(result)
        reply = decode_exec_reply((await request).data)
        assert isinstance(reply, ExecResult)
        assert reply.signature == "r" * 86
    connected = decode_presence((await presence.next_msg(timeout=5)).data)
    assert connected.type == "connected"
    assert (connected.signed_at, connected.signature) == (1234.5, "h" * 86)
