"""Unit tests of the gateway's sans-I/O decisions: session frames, admission, claims, auth helpers."""

from __future__ import annotations

import asyncio
import json
import time
from typing import cast

import pytest
from nacl.signing import SigningKey
from nats.aio.msg import Msg

from services.gateway.auth import TokenCache, parse_bearer
from services.gateway.session import (
    HELLO_MAX_AGE_S,
    Busy,
    Close,
    Joined,
    Publish,
    Send,
    Session,
    Settle,
    Started,
    Wake,
    accept_hello,
    is_dead,
    keepalive_id,
    keepalive_rtt_ms,
    max_result_bytes,
)
from services.gateway.settings import GatewaySettings, default_gateway_id
from shared import signing, subjects
from shared.errors import CloseCode, ErrorCode, ProtocolError
from shared.ids import GatewayId, HostId, SessionId, is_host_id
from shared.protocol import (
    Ack,
    ErrorReply,
    ExecError,
    ExecRequest,
    ExecResult,
    Hello,
    Metrics,
    MetricsEvent,
    MetricsSample,
    Ping,
    Pong,
    SessionClaim,
    encode,
)
from shared.tokens import generate_token

HELLO = Hello(host_id="web-1", hostname="web-1.test", platform="linux", agent_version="1.0")


def new_session(connected_at: float = 100.0, session_id: str = "s-1") -> Session[None]:
    """A session with no connection object (the logic never touches it)."""
    return Session(None, HELLO, GatewayId("gw-1"), connected_at, 0.0, SessionId(session_id))


def fake_msg(n: int) -> Msg:
    """A stand-in for a NATS message (the session only stores it)."""
    return cast(Msg, object())


def test_accept_hello_checks_type_and_host() -> None:
    """Only a Hello for the token's host is accepted; anything else raises with the close code."""
    assert accept_hello(encode(HELLO), HostId("web-1")) == HELLO
    with pytest.raises(ProtocolError) as other_host:
        accept_hello(encode(HELLO), HostId("web-2"))
    assert other_host.value.close_code == CloseCode.POLICY_VIOLATION
    with pytest.raises(ProtocolError) as not_hello:
        accept_hello(encode(Ping()), HostId("web-1"))
    assert not_hello.value.close_code == CloseCode.POLICY_VIOLATION
    with pytest.raises(ProtocolError) as not_json:
        accept_hello(b"{", HostId("web-1"))
    assert not_json.value.close_code == CloseCode.INVALID_DATA


async def test_new_command_is_started_then_settled_and_acked() -> None:
    """An exec request starts a command; its result settles the waiters and is acked."""
    session = new_session()
    msg = fake_msg(1)
    admission = session.admit_exec(ExecRequest(command="ls", command_id="c1"), msg, 2)
    assert isinstance(admission, Started)
    assert (admission.frame.command_id, admission.frame.command) == ("c1", "ls")
    assert admission.pending.msgs == [msg]
    result = ExecResult(command_id="c1", exit_code=0, duration_ms=1)
    actions = session.handle(result)
    assert actions == [Settle(admission.pending, result), Send(Ack(command_id="c1"))]
    assert session.pending == {}


async def test_generated_id_join_and_busy() -> None:
    """A missing id is generated; the same id joins; a new id over the limit is busy."""
    session = new_session()
    first = session.admit_exec(ExecRequest(command="a"), fake_msg(1), 2)
    assert isinstance(first, Started)
    assert len(first.frame.command_id) == 32
    again = session.admit_exec(ExecRequest(command="a", command_id=first.frame.command_id), fake_msg(2), 2)
    assert isinstance(again, Joined)
    assert again.pending is first.pending
    assert len(first.pending.msgs) == 2
    assert isinstance(session.admit_exec(ExecRequest(command="b"), fake_msg(3), 2), Started)
    busy = session.admit_exec(ExecRequest(command="c", command_id="c3"), fake_msg(4), 2)
    assert isinstance(busy, Busy)
    assert (busy.reply.code, busy.reply.command_id) == (ErrorCode.BUSY, "c3")


async def test_give_up_drops_entry_and_late_result_is_published() -> None:
    """After its last waiter times out, a command's late result is published and acked."""
    session = new_session()
    msg = fake_msg(1)
    started = session.admit_exec(ExecRequest(command="a", command_id="c1"), msg, 2)
    assert isinstance(started, Started)
    assert session.give_up(started.pending, msg) is True
    assert session.give_up(started.pending, msg) is False
    result = ExecResult(command_id="c1", exit_code=1, duration_ms=1)
    assert session.handle(result) == [Publish(subjects.result("web-1"), result), Send(Ack(command_id="c1"))]


async def test_exec_error_becomes_error_reply() -> None:
    """An ExecError settles its waiters with an ErrorReply of the same code."""
    session = new_session()
    started = session.admit_exec(ExecRequest(command="a", command_id="c1"), fake_msg(1), 2)
    assert isinstance(started, Started)
    actions = session.handle(ExecError(command_id="c1", code=ErrorCode.BUSY, description="full"))
    settle = actions[0]
    assert isinstance(settle, Settle)
    assert isinstance(settle.reply, ErrorReply)
    assert (settle.reply.code, settle.reply.command_id) == (ErrorCode.BUSY, "c1")
    orphan = session.handle(ExecError(command_id="zz", code=ErrorCode.EXEC_FAILED, description="x"))
    assert orphan == [Send(Ack(command_id="zz"))]


async def test_ping_pong_metrics_and_second_hello() -> None:
    """Ping → Pong; a Pong wakes its waiter; Metrics → MetricsEvent; a second Hello → close 1008."""
    session = new_session()
    assert session.handle(Ping(id="a")) == [Send(Pong(id="a"))]
    assert session.handle(Pong(id="unknown")) == []
    assert session.handle(Pong()) == []
    sample = MetricsSample.model_validate(
        {k: 0 for k in MetricsSample.model_fields if k not in ("v", "disks")}
    )
    event = MetricsEvent(host_id="web-1", gateway_id="gw-1", sample=sample)
    assert session.handle(Metrics(sample=sample)) == [Publish(subjects.metrics("web-1"), event)]
    [close] = session.handle(HELLO)
    assert isinstance(close, Close)
    assert close.code == CloseCode.POLICY_VIOLATION


def test_keepalive_rtt_ms_parses_only_plausible_keepalive_ids() -> None:
    """A keepalive's id carries its send time; health-probe ids, garbage and implausible times give None."""
    sent = keepalive_id(1000.0)
    assert keepalive_rtt_ms(sent, 1000.0125) == pytest.approx(12.5)
    assert keepalive_rtt_ms(sent, 999.0) is None  # from the future
    assert keepalive_rtt_ms(sent, 1000.0 + 61) is None  # later than MAX_RTT_S
    for other in (None, "", "k", "kx12", "0a1b2c3d4e5f6a7b", "k-5"):
        assert keepalive_rtt_ms(other, 1000.0) is None


async def test_keepalive_pong_sets_rtt_carried_by_the_next_metrics_event() -> None:
    """A keepalive pong records the round trip; the next MetricsEvent carries it (None before any)."""
    session = new_session()
    sample = MetricsSample.model_validate(
        {k: 0 for k in MetricsSample.model_fields if k not in ("v", "disks")}
    )
    [before] = session.handle(Metrics(sample=sample))
    assert isinstance(before, Publish)
    assert isinstance(before.message, MetricsEvent)
    assert before.message.agent_rtt_ms is None
    assert session.handle(Pong(id=keepalive_id(time.monotonic() - 0.004))) == []
    [after] = session.handle(Metrics(sample=sample))
    assert isinstance(after, Publish)
    assert isinstance(after.message, MetricsEvent)
    assert after.message.agent_rtt_ms is not None
    assert 4.0 <= after.message.agent_rtt_ms < 1000


async def test_pong_wakes_waiter_and_end_hands_back_pending() -> None:
    """end() marks the session, wakes ping waiters and returns every pending command."""
    session = new_session()
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    session.pings["p1"] = waiter
    assert session.handle(Pong(id="p1")) == [Wake(waiter)]
    other: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    session.pings["p2"] = other
    session.admit_exec(ExecRequest(command="a", command_id="c1"), fake_msg(1), 2)
    pending = session.end()
    assert [p.command_id for p in pending] == ["c1"]
    assert session.ended
    assert other.done()
    assert session.pending == {}


def test_newest_claim_wins() -> None:
    """A session is superseded only by a newer (connected_at, session_id) claim for its host."""
    session = new_session(connected_at=100.0, session_id="m")

    def claim(at: float, sid: str, host: str = "web-1") -> SessionClaim:
        return SessionClaim(host_id=host, session_id=sid, gateway_id="gw-2", connected_at=at)

    assert session.superseded_by(claim(101.0, "a"))
    assert session.superseded_by(claim(100.0, "z"))
    assert not session.superseded_by(claim(100.0, "a"))
    assert not session.superseded_by(claim(99.0, "z"))
    assert not session.superseded_by(claim(200.0, "m"))
    assert not session.superseded_by(claim(200.0, "z", host="web-2"))
    assert session.claim().connected_at == 100.0


def test_liveness_and_limits() -> None:
    """Dead after interval + timeout of silence; results leave 1 KiB headroom under both limits."""
    assert not is_dead(last_seen=0.0, now=30.0, ping_interval=20.0, ping_timeout=10.0)
    assert is_dead(last_seen=0.0, now=30.1, ping_interval=20.0, ping_timeout=10.0)
    assert max_result_bytes(4 * 1024 * 1024, 1024 * 1024) == 1024 * 1024 - 1024


def test_parse_bearer_accepts_only_well_formed_tokens() -> None:
    """Only ``Bearer <64 hex>`` yields a token."""
    token = generate_token()
    assert parse_bearer(f"Bearer {token}") == token
    assert parse_bearer(f"bearer  {token} ") == token
    for bad in (None, "", "Bearer", f"Basic {token}", f"Bearer {token[:-1]}", f"Bearer {token.upper()}"):
        assert parse_bearer(bad) is None


def test_token_cache_expires_and_is_bounded() -> None:
    """Entries expire after ttl; the oldest is evicted when full; a revoked host is forgotten."""
    now = [0.0]
    cache = TokenCache(ttl=10.0, size=2, clock=lambda: now[0])
    cache.put("a", HostId("h1"))
    cache.put("b", HostId("h2"))
    cache.put("c", HostId("h3"))
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (None, "h2", "h3")
    cache.forget_host(HostId("h2"))
    assert cache.get("b") is None
    now[0] = 10.0
    assert cache.get("c") is None
    assert len(cache) == 0


def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read WARLOCK_GATEWAY_*; the default gateway id is sanitized and unique."""
    monkeypatch.setenv("WARLOCK_GATEWAY_PORT", "0")
    monkeypatch.setenv("WARLOCK_GATEWAY_MAX_IN_FLIGHT", "3")
    settings = GatewaySettings()
    assert (settings.port, settings.max_in_flight, settings.max_frame_bytes) == (0, 3, 4 * 1024 * 1024)
    assert is_host_id(settings.gateway_id)
    assert default_gateway_id("Web.Example_COM!").startswith("web-example_com-")
    assert is_host_id(default_gateway_id("x" * 200))
    assert default_gateway_id("h") != default_gateway_id("h")


def test_accept_hello_with_a_known_agent_key_needs_its_fresh_signature() -> None:
    """When the token authority names the host's agent key, only a hello signed with it, stamped within
    HELLO_MAX_AGE_S of the gateway's clock, is accepted."""
    key, other = signing.generate(), signing.generate()
    public = signing.public_text(key)
    now = 1_000_000.0

    def signed(by: SigningKey, at: float) -> bytes:
        hello = HELLO.model_copy(update={"signed_at": at})
        sig = signing.sign_values(by, signing.HELLO_DOMAIN, signing.hello_values(hello))
        return encode(hello.model_copy(update={"signature": sig}))

    assert accept_hello(signed(key, now - 10), HostId("web-1"), public, now=now).host_id == "web-1"
    for data in (
        encode(HELLO),  # unsigned
        signed(other, now),  # another key
        signed(key, now - HELLO_MAX_AGE_S - 1),  # stale
        signed(key, now + HELLO_MAX_AGE_S + 1),  # from the future
    ):
        with pytest.raises(ProtocolError) as refused:
            accept_hello(data, HostId("web-1"), public, now=now)
        assert refused.value.close_code == CloseCode.POLICY_VIOLATION
    edited = json.loads(signed(key, now))
    edited["hostname"] = "elsewhere"
    with pytest.raises(ProtocolError):
        accept_hello(json.dumps(edited), HostId("web-1"), public, now=now)
