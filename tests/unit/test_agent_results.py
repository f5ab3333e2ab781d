"""Results on their way out: trimming to the frame limit, the un-acked outbox, and frame dispatch."""

from __future__ import annotations

from pathlib import Path

from services.agent import dispatch
from services.agent.results import Outbox, cap_output, fit_result, strip_output
from shared import signing
from shared.errors import CloseCode, ErrorCode
from shared.ids import CommandId, SessionId
from shared.protocol import Ack, Exec, ExecError, ExecResult, Ping, Pong, Welcome, encode
from tests.support.agent_trust import agent_trust

CID = CommandId("c1")


def welcome(max_result_bytes: int = 4096) -> Welcome:
    """A Welcome with the given frame limit."""
    return Welcome(
        session_id=SessionId("s1"), gateway_id="gw1", ping_interval=20, max_result_bytes=max_result_bytes
    )


def test_small_result_is_untouched() -> None:
    """A result that fits is returned as is."""
    result = ExecResult(command_id=CID, exit_code=0, stdout="hi", duration_ms=1)
    assert fit_result(result, 2048) is result


def test_big_result_is_trimmed_to_fit() -> None:
    """The longer stream is cut first until the encoded frame fits; truncated is set."""
    result = ExecResult(command_id=CID, exit_code=0, stdout="o" * 50_000, stderr="e" * 300, duration_ms=1)
    fitted = fit_result(result, 5000)
    assert isinstance(fitted, ExecResult)
    assert len(encode(fitted)) <= 5000
    assert fitted.truncated
    assert fitted.stderr == "e" * 300
    assert fitted.stdout == "o" * len(fitted.stdout)
    assert len(fitted.stdout) > 4000


def test_both_streams_trimmed_with_escapes() -> None:
    """Output that expands when JSON-escaped (newlines, non-ASCII) is still brought under the limit."""
    result = ExecResult(
        command_id=CID, exit_code=1, stdout="\n\x01é" * 20_000, stderr="€" * 20_000, duration_ms=1
    )
    fitted = fit_result(result, 2000)
    assert len(encode(fitted)) <= 2000
    assert fitted.truncated  # type: ignore[union-attr]


def test_long_error_description_is_trimmed() -> None:
    """An ExecError whose description does not fit is cut to fit."""
    error = ExecError(command_id=CID, code=ErrorCode.EXEC_FAILED, description="x" * 4000)
    fitted = fit_result(error, 1100)
    assert len(encode(fitted)) <= 1100
    assert isinstance(fitted, ExecError)
    assert fitted.code == ErrorCode.EXEC_FAILED


def test_outbox_keeps_until_ack() -> None:
    """Results stay in the outbox, oldest first, until acked."""
    box = Outbox()
    a = ExecResult(command_id=CommandId("a"), exit_code=0, duration_ms=1)
    b = ExecError(command_id=CommandId("b"), code=ErrorCode.UNKNOWN_RESULT, description="lost")
    box.add(a)
    box.add(b)
    assert box.pending() == [a, b]
    assert box.ack("a")
    assert not box.ack("a")
    assert box.pending() == [b]


def test_outbox_is_bounded() -> None:
    """Past its limit the outbox drops the oldest result."""
    box = Outbox(limit=2)
    for name in "abc":
        box.add(ExecResult(command_id=CommandId(name), exit_code=0, duration_ms=1))
    assert [r.command_id for r in box.pending()] == ["b", "c"]


def test_dispatch_ping_exec_ack() -> None:
    """Ping → Pong with the same id; Exec → Run; Ack → dropped from the outbox; liveness noted."""
    state = dispatch.SessionState(welcome=welcome(), last_received=0.0)
    state.outbox.add(ExecResult(command_id=CID, exit_code=0, duration_ms=1))
    assert dispatch.on_frame(state, encode(Ping(id="p7")), 5.0) == [dispatch.Send(Pong(id="p7"))]
    assert state.last_received == 5.0
    request = Exec(command_id=CommandId("c2"), command="true", timeout=3)
    assert dispatch.on_frame(state, encode(request), 6.0) == [dispatch.Run(request)]
    assert dispatch.on_frame(state, encode(Ack(command_id=CID)), 7.0) == []
    assert len(state.outbox) == 0


def test_dispatch_bad_frames_close() -> None:
    """Undecodable bytes close with 1007, an unknown type with 1008."""
    state = dispatch.SessionState(welcome=welcome(), last_received=0.0)
    [not_json] = dispatch.on_frame(state, b"{nope", 1.0)
    assert isinstance(not_json, dispatch.Close)
    assert not_json.code == CloseCode.INVALID_DATA
    [unknown] = dispatch.on_frame(state, b'{"type":"launch","v":1}', 1.0)
    assert isinstance(unknown, dispatch.Close)
    assert unknown.code == CloseCode.POLICY_VIOLATION


def test_resend_trims_to_session_limit(tmp_path: Path) -> None:
    """After a welcome every un-acked result is re-sent, trimmed to that session's limit."""
    state = dispatch.SessionState(welcome=welcome(2000), last_received=0.0)
    trust = agent_trust(tmp_path)
    state.outbox.add(ExecResult(command_id=CID, exit_code=0, stdout="y" * 10_000, duration_ms=1))
    [send] = dispatch.resend(state, trust)
    assert len(encode(send.message)) <= 2000
    assert isinstance(send.message, ExecResult)
    assert send.message.command_id == CID
    assert send.message.truncated
    public = signing.parse_public(trust.public_key)
    assert signing.verify_result(public, "web-1", send.message)  # signed over the trimmed output


def test_a_changed_result_loses_its_signature_and_is_signed_again(tmp_path: Path) -> None:
    """cap/strip/fit drop the signature (it covered other output); seal signs what is sent; an edit by
    anyone else fails verify_result."""
    trust = agent_trust(tmp_path)
    public = signing.parse_public(trust.public_key)
    signed = trust.seal(ExecResult(command_id=CID, exit_code=0, stdout="x" * 5000, duration_ms=1))
    assert isinstance(signed, ExecResult)
    assert signing.verify_result(public, "web-1", signed)
    assert trust.seal(signed) is signed
    for changed in (cap_output(signed, 100), strip_output(signed), fit_result(signed, 2000)):
        assert isinstance(changed, ExecResult)
        assert changed.signature is None
        resealed = trust.seal(changed)
        assert isinstance(resealed, ExecResult)
        assert signing.verify_result(public, "web-1", resealed)
    forged = signed.model_copy(update={"stdout": "x" * 4999 + "y"})
    assert not signing.verify_result(public, "web-1", forged)
    assert not signing.verify_result(public, "web-2", signed)
    error = ExecError(command_id=CID, code=ErrorCode.BUSY, description="no slot")
    assert trust.seal(error) is error
