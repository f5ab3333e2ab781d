"""The API's trust checks without I/O: hellos, the rejection counter, `warlock req`'s signing, ops replies."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from services.api.fleet.bus import reply_of
from services.api.fleet.runner import Outcome, outcome_of_result, timed_out, undeliverable, unverified
from services.api.fleet.verify import Rejections, hello_problem, result_problem
from services.api.store.models import CommandStatus, Via
from services.ctl.cli import ReqError, signed_exec
from shared import signing
from shared.errors import ErrorCode
from shared.protocol import ErrorReply, ExecRequest, ExecResult, decode_model
from tests.support.fakeagent import AgentKey

AGENT = AgentKey()


def test_hello_verifies_only_with_the_agents_key_and_fresh() -> None:
    """A hello the agent signed now verifies; another key, an edited field, no key, or an old one do not."""
    now = time.time()
    event = AGENT.connected("h1", "s1", now)
    assert hello_problem(AGENT.public_key, event, now) is None
    assert hello_problem(AgentKey().public_key, event, now) is not None
    assert hello_problem(None, event, now) is not None
    assert hello_problem("ed25519:not-a-key", event, now) is not None
    edited = event.model_copy(update={"hostname": "evil"})
    assert hello_problem(AGENT.public_key, edited, now) is not None
    problem = hello_problem(AGENT.public_key, event, now + 3600)
    assert problem is not None
    assert "replayed" in problem
    unsigned = event.model_copy(update={"signature": None})
    assert hello_problem(AGENT.public_key, unsigned, now) == "the hello is not signed by the agent"


def test_result_problem() -> None:
    """A result signed for the host verifies; for another host, edited, or unsigned it does not."""
    result = AGENT.result("h1", command_id="c1", stdout="x")
    assert result_problem(AGENT.public_key, "h1", result) is None
    assert result_problem(AGENT.public_key, "h2", result) is not None
    assert result_problem(AGENT.public_key, "h1", result.model_copy(update={"stdout": "y"})) is not None
    assert result_problem(AGENT.public_key, "h1", result.model_copy(update={"signature": None})) is not None
    assert result_problem(None, "h1", result) is not None


def test_rejections_log_once_per_source_then_at_powers_of_ten(caplog: pytest.LogCaptureFixture) -> None:
    """1000 rejections from one source log 4 lines (1st, 10th, 100th, 1000th); another source logs its
    own first; every rejection is counted."""
    caplog.set_level(logging.WARNING, logger="services.api.fleet.verify")
    rejections = Rejections()
    for _ in range(1000):
        rejections.reject("result", "h1", "forged")
    rejections.reject("result", "h2", "forged")
    assert caplog.text.count("result from h1 not accepted") == 4
    assert caplog.text.count("result from h2 not accepted") == 1
    assert (rejections.total, rejections.count("result", "h1"), rejections.count("result")) == (
        1001,
        1000,
        1001,
    )


def _key(tmp_path: Path) -> tuple[Path, signing.TrustedKeys]:
    path = tmp_path / "op.key"
    key, _ = signing.ensure_private(path)
    return path, signing.TrustedKeys([signing.public_text(key)])


def test_req_signs_an_exec_for_the_ops_subject(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An agent exec subject becomes the ops subject (said on stderr); the body gets a command id and an
    ops_exec signature for that host; the exec's timeout is returned for the wait."""
    path, trusted = _key(tmp_path)
    subject, data, wait = signed_exec("warlock.agent.web-1.exec", '{"command": "id", "timeout": 7}', path)
    assert subject == "warlock.ops.web-1.exec"
    assert "warlock.ops.web-1.exec instead" in capsys.readouterr().err
    assert wait == 7
    request = decode_model(ExecRequest, data)
    assert request.command_id is not None
    fields = signing.signed_fields(request)
    assert signing.verify_command("ops_exec", fields, request.signature, trusted, "web-1", 120)
    with pytest.raises(signing.CommandRefused):
        signing.verify_command("exec", fields, request.signature, trusted, "web-1", 120)  # not for agents
    same, _, _ = signed_exec("warlock.ops.web-1.exec", '{"command": "id", "command_id": "mine"}', path)
    assert same == "warlock.ops.web-1.exec"
    assert capsys.readouterr().err == ""


def test_req_leaves_other_subjects_alone_and_refuses_bad_exec(tmp_path: Path) -> None:
    """Non-exec subjects pass unchanged (no key needed); an exec without a key, with bad JSON, with an
    already signed body or a bad host id is refused before anything is sent."""
    path, _ = _key(tmp_path)
    assert signed_exec("warlock.agent.web-1.ping", "", None) == ("warlock.agent.web-1.ping", "", None)
    assert signed_exec("$SRV.PING", "", None) == ("$SRV.PING", "", None)
    with pytest.raises(ReqError, match="warlock signing-keys create"):
        signed_exec("warlock.ops.web-1.exec", '{"command": "id"}', None)
    with pytest.raises(ReqError, match="not an exec request"):
        signed_exec("warlock.ops.web-1.exec", '{"cmd": "id"}', path)
    with pytest.raises(ReqError, match="invalid host id"):
        signed_exec("warlock.ops.Web!.exec", '{"command": "id"}', path)
    _, signed, _ = signed_exec("warlock.ops.web-1.exec", '{"command": "id"}', path)
    with pytest.raises(ReqError, match="already signed"):
        signed_exec("warlock.ops.web-1.exec", signed, path)


@pytest.mark.parametrize(
    ("outcome", "kind", "code"),
    [
        (outcome_of_result(AGENT.result("h1", command_id="c1", exit_code=3), Via.AGENT, 100), "result", None),
        (timed_out(Via.AGENT, 5), "error", ErrorCode.TIMEOUT),
        (undeliverable("nobody"), "error", ErrorCode.UNAVAILABLE),
        (unverified("forged"), "error", ErrorCode.BAD_SIGNATURE),
        (Outcome(CommandStatus.FAILED, Via.SSH, error_code="weird"), "error", ErrorCode.INTERNAL),
    ],
)
def test_ops_reply_of_outcome(outcome: Outcome, kind: str, code: ErrorCode | None) -> None:
    """An operator gets the result as recorded, or the typed error the row carries."""
    message = reply_of(outcome, "c1")
    if kind == "result":
        assert isinstance(message, ExecResult)
        assert (message.command_id, message.exit_code, message.via) == ("c1", 3, "agent")
    else:
        assert isinstance(message, ErrorReply)
        assert (message.code, message.command_id) == (code, "c1")
