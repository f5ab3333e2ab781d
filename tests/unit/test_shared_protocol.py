"""The wire protocol: every message round-trips; bad input is refused with the right close code."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shared import protocol as p
from shared.errors import CloseCode, ErrorCode, ProtocolError


def test_exec_request_as_typed_on_the_cli() -> None:
    """`{"command": "uptime"}` is a whole exec request: type, version and timeout default."""
    req = p.decode_model(p.ExecRequest, b'{"command":"uptime"}')
    assert (req.type, req.v, req.command, req.timeout, req.command_id) == ("exec", 1, "uptime", 30.0, None)


def test_empty_ping_body_is_a_ping() -> None:
    """An empty body (`nats req subject ''`) decodes as a ping request."""
    assert p.decode_model(p.PingRequest, b"").type == "ping"


@pytest.mark.parametrize(
    "frame",
    [
        p.Hello(host_id="web-1", hostname="web-1", platform="Linux", agent_version="0.1.0"),
        p.ExecResult(command_id="c1", exit_code=0, stdout="hi\n", duration_ms=1.5),
        p.ExecError(command_id="c1", code=ErrorCode.BUSY, description="full"),
        p.Ping(id="x"),
        p.Pong(id="x"),
    ],
)
def test_agent_frames_round_trip(frame: p.Message) -> None:
    """Each agent frame decodes back to an equal model."""
    assert p.decode_agent_frame(p.encode(frame)) == frame


@pytest.mark.parametrize(
    "frame",
    [
        p.Welcome(session_id="s1", gateway_id="gw1", ping_interval=20, max_result_bytes=4096),
        p.Exec(command_id="c1", command="true", timeout=5),
        p.Ack(command_id="c1"),
    ],
)
def test_gateway_frames_round_trip(frame: p.Message) -> None:
    """Each gateway frame decodes back to an equal model."""
    assert p.decode_gateway_frame(p.encode(frame)) == frame


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{not json", CloseCode.INVALID_DATA),
        (b"\xff\xfe", CloseCode.INVALID_DATA),
        (b'{"type":"nope"}', CloseCode.POLICY_VIOLATION),
        (b'{"type":"ping","v":2}', CloseCode.POLICY_VIOLATION),
        (b'{"type":"ping","extra":1}', CloseCode.POLICY_VIOLATION),
        (b"[1,2]", CloseCode.POLICY_VIOLATION),
        (b'{"type":"hello","host_id":"BAD HOST","hostname":"h","platform":"p","agent_version":"1"}', 1008),
    ],
)
def test_bad_agent_frames_carry_close_code(data: bytes, code: int) -> None:
    """Undecodable frames raise ProtocolError with 1007 (not JSON) or 1008 (anything else)."""
    with pytest.raises(ProtocolError) as info:
        p.decode_agent_frame(data)
    assert info.value.close_code == code


def test_error_description_holds_no_input_values() -> None:
    """The error text names the field but does not echo what was sent (it could be a secret)."""
    with pytest.raises(ProtocolError) as info:
        p.decode_model(p.TokenVerifyRequest, b'{"token_sha256":"supersecretvalue"}')
    assert "token_sha256" in info.value.message
    assert "supersecretvalue" not in info.value.message


@pytest.mark.parametrize(
    "body",
    [b'{"command":""}', b'{"command":"x","timeout":0}', b'{"command":"x","timeout":-1}', b'{"cmd":"x"}'],
)
def test_bad_exec_requests_are_refused(body: bytes) -> None:
    """Empty commands, non-positive timeouts and unknown fields are refused."""
    with pytest.raises(ProtocolError):
        p.decode_model(p.ExecRequest, body)


def test_exec_reply_union() -> None:
    """An exec reply decodes as a result or a typed error."""
    err = p.ErrorReply(code=ErrorCode.TIMEOUT, description="late", command_id="c9")
    assert p.decode_exec_reply(p.encode(err)) == err
    res = p.ExecResult(command_id="c9", exit_code=1, duration_ms=0)
    assert p.decode_exec_reply(p.encode(res)) == res


def test_messages_are_frozen() -> None:
    """Models cannot be mutated after construction."""
    ping = p.Ping(id="a")
    with pytest.raises(ValueError, match="frozen"):
        ping.id = "b"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("decode", "body"),
    [
        (lambda b: p.decode_model(p.ExecRequest, b), b'{"command":"echo a\\u0000b"}'),
        (lambda b: p.decode_model(p.SshExecRequest, b), b'{"command":"\\u0000"}'),
        (p.decode_gateway_frame, b'{"type":"exec","command_id":"c1","command":"true\\u0000","timeout":5}'),
    ],
)
def test_nul_in_a_command_is_refused(decode: Callable[[bytes], object], body: bytes) -> None:
    """A NUL character in any command field (NATS exec requests, the exec frame) is refused by name."""
    with pytest.raises(ProtocolError) as info:
        decode(body)
    assert "command" in info.value.message
    assert "NUL" in info.value.message
