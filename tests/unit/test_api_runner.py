"""Hybrid runner decisions, without I/O: which NATS answer becomes which CommandRun outcome."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import nats.errors
import pytest
from nacl.signing import SigningKey
from nats.aio.client import Client as NATS
from sqlalchemy.exc import OperationalError

from services.api.errors import DatabaseUnavailable, NotFound
from services.api.fleet.runner import (
    Runner,
    cap,
    outcome_of_reply,
    timed_out,
    undeliverable,
)
from services.api.fleet.signer import ApiSigner
from services.api.fleet.tasks import TaskTracker
from services.api.http.deps import AuthCache, KeyInfo
from services.api.http.schemas import ExecBody
from services.api.settings import ApiSettings
from services.api.store.models import CommandStatus, Host, UtcDateTime, Via
from services.api.store.runstore import HostTarget, NewRun
from shared import signing
from shared.errors import MAY_HAVE_RUN, NOTHING_RAN, ErrorCode
from shared.natsx import error
from shared.protocol import ExecRequest, ExecResult, SshExecRequest, decode_model, encode


def _result(**fields: Any) -> bytes:
    values: dict[str, Any] = {"command_id": "c1", "exit_code": 0, "duration_ms": 2.0}
    values.update(fields)
    return encode(ExecResult.model_validate(values))


def test_every_error_code_is_classified() -> None:
    """Each error code is either nothing-ran (failed) or may-have-run (timed_out), never both."""
    assert set(NOTHING_RAN) | set(MAY_HAVE_RUN) == set(ErrorCode)
    assert not set(NOTHING_RAN) & set(MAY_HAVE_RUN)


@pytest.mark.parametrize(
    ("reply", "status", "code"),
    [
        (_result(), CommandStatus.SUCCEEDED, None),
        (_result(exit_code=1), CommandStatus.FAILED, None),
        (_result(exit_code=None, signal=9), CommandStatus.FAILED, None),
        (_result(exit_code=None, signal=9, timed_out=True), CommandStatus.TIMED_OUT, "timeout"),
        (encode(error(ErrorCode.BUSY, "full")), CommandStatus.FAILED, "busy"),
        (encode(error(ErrorCode.HOST_KEY_MISMATCH, "x")), CommandStatus.FAILED, "host_key_mismatch"),
        (encode(error(ErrorCode.TIMEOUT, "late")), CommandStatus.TIMED_OUT, "timeout"),
        (encode(error(ErrorCode.DISCONNECTED, "gone")), CommandStatus.TIMED_OUT, "disconnected"),
        (b"{garbage", CommandStatus.FAILED, "internal"),
    ],
)
def test_reply_outcomes(reply: bytes, status: CommandStatus, code: str | None) -> None:
    """Results and typed errors map to the documented statuses and codes."""
    outcome = outcome_of_reply(reply, Via.AGENT, 100)
    assert outcome.status == status
    assert outcome.error_code == code
    assert outcome.via == Via.AGENT


def test_output_cap_sets_truncated() -> None:
    """Output longer than the cap is cut; the agent's own truncated flag is kept."""
    assert cap("abc", 2) == ("ab", True)
    assert cap("abc", 3) == ("abc", False)
    assert outcome_of_reply(_result(stderr="e" * 9), Via.SSH, 4).stderr == "eeee"
    assert outcome_of_reply(_result(stdout="ok", truncated=True), Via.SSH, 4).truncated is True
    assert outcome_of_reply(_result(stdout="ok"), Via.SSH, 4).truncated is False


def test_timeout_and_undeliverable_outcomes() -> None:
    """A NATS timeout is timed_out on its path; undeliverable has no path."""
    assert timed_out(Via.SSH, 12.0).status == CommandStatus.TIMED_OUT
    assert timed_out(Via.SSH, 12.0).via == Via.SSH
    assert undeliverable("nobody").status == CommandStatus.UNDELIVERABLE
    assert undeliverable("nobody").via is None


class FakeNats:
    """Answers requests from a script of exceptions or replies, recording subjects (unit tests only)."""

    def __init__(self, script: dict[str, BaseException | bytes]) -> None:
        self.script = script
        self.requests: list[tuple[str, bytes]] = []

    async def request(self, subject: str, payload: bytes, timeout: float) -> Any:
        """Record the request and play the scripted answer for the subject's kind."""
        self.requests.append((subject, payload))
        kind = subject.split(".")[1]
        answer = self.script[kind]
        if isinstance(answer, BaseException):
            raise answer

        class Reply:
            data = answer

        return Reply()


@pytest.fixture
def signer(tmp_path: Path) -> ApiSigner:
    """The API's signer with a key in the test's directory."""
    return ApiSigner(tmp_path / "signing.key", [], 120.0)


def _runner(fake: FakeNats, signer: ApiSigner, store: Any = None) -> Runner:
    settings = ApiSettings(exec_grace=1.0, max_output_chars=100)
    return Runner(cast(NATS, fake), store, cast(Any, None), settings, TaskTracker(), signer)


def _host() -> Host:
    return Host(id="h1", address="10.0.0.1", ssh_port=2222, ssh_user="ops", host_key="ssh-ed25519 AAAA")


async def test_send_falls_back_only_on_no_responders(signer: ApiSigner) -> None:
    """Agent no responders → SSH with the same id and target; SSH no responders → undeliverable."""
    fake = FakeNats({"agent": nats.errors.NoRespondersError(), "ssh": _result(exit_code=0)})
    outcome = await _runner(fake, signer).send("h1", "c1", "true", 5, _target(), None)  # type: ignore[arg-type]
    assert outcome.via == Via.SSH
    assert outcome.status == CommandStatus.SUCCEEDED  # the worker's result: NATS permissions vouch for it
    assert [s for s, _ in fake.requests] == ["warlock.agent.h1.exec", "warlock.ssh.h1.exec"]
    ssh = decode_model(SshExecRequest, fake.requests[1][1])
    assert ssh.command_id == "c1"
    assert ssh.target == _target()
    fake = FakeNats({"agent": nats.errors.NoRespondersError(), "ssh": nats.errors.NoRespondersError()})
    outcome = await _runner(fake, signer).send("h1", "c1", "true", 5, _target(), None)  # type: ignore[arg-type]
    assert outcome.status == CommandStatus.UNDELIVERABLE


async def test_both_requests_are_signed_and_the_ssh_target_is_covered(signer: ApiSigner) -> None:
    """The agent request verifies as kind exec for its host; the SSH request as ssh_exec with the target
    inside the signed fields: a changed address (or another host) does not verify."""
    fake = FakeNats({"agent": nats.errors.NoRespondersError(), "ssh": _result()})
    await _runner(fake, signer).send("h1", "c1", "true", 5, _target(), None)  # type: ignore[arg-type]
    trusted = signing.TrustedKeys(signer.trusted_keys)
    agent = decode_model(ExecRequest, fake.requests[0][1])
    fields = signing.signed_fields(agent)
    assert fields == {"command_id": "c1", "command": "true", "timeout": 5.0}
    assert signing.verify_command("exec", fields, agent.signature, trusted, "h1", 120) == signer.key_id
    ssh = decode_model(SshExecRequest, fake.requests[1][1])
    assert ssh.target is not None
    ssh_fields = signing.signed_fields(ssh)
    assert signing.verify_command("ssh_exec", ssh_fields, ssh.signature, trusted, "h1", 120) == signer.key_id
    moved = ssh.model_copy(update={"target": ssh.target.model_copy(update={"address": "6.6.6.6"})})
    with pytest.raises(signing.CommandRefused) as refused:
        signing.verify_command("ssh_exec", signing.signed_fields(moved), ssh.signature, trusted, "h1", 120)
    assert refused.value.code == ErrorCode.BAD_SIGNATURE
    with pytest.raises(signing.CommandRefused) as other:
        signing.verify_command("ssh_exec", ssh_fields, ssh.signature, trusted, "h2", 120)
    assert other.value.code == ErrorCode.WRONG_HOST
    with pytest.raises(signing.CommandRefused) as kind:
        signing.verify_command("exec", ssh_fields, ssh.signature, trusted, "h1", 120)
    assert kind.value.code == ErrorCode.BAD_SIGNATURE


AGENT_KEY = signing.generate()
AGENT_PUB = signing.public_text(AGENT_KEY)


def _signed(key: SigningKey = AGENT_KEY, host: str = "h1", **fields: Any) -> bytes:
    values: dict[str, Any] = {"command_id": "c1", "exit_code": 0, "duration_ms": 2.0, "stdout": "ok"}
    values.update(fields)
    return encode(signing.sign_result(key, host, ExecResult.model_validate(values)))


def _edited_stdout() -> bytes:
    result = decode_model(ExecResult, _signed())
    return encode(result.model_copy(update={"stdout": "forged"}))


@pytest.mark.parametrize(
    ("reply", "public_key", "why"),
    [
        (_result(), AGENT_PUB, "not signed"),
        (_signed(key=signing.generate()), AGENT_PUB, "does not verify"),
        (_edited_stdout(), AGENT_PUB, "does not verify"),
        (_signed(host="h2"), AGENT_PUB, "does not verify"),
        (_signed(command_id="c2"), AGENT_PUB, "another command"),
        (_signed(), None, "no public key"),
    ],
    ids=["unsigned", "other-key", "edited-stdout", "other-host", "other-command", "no-key-registered"],
)
async def test_agent_result_that_does_not_verify_never_settles(
    signer: ApiSigner, reply: bytes, public_key: str | None, why: str
) -> None:
    """An agent reply that is not the host agent's own result of this command: timed_out (outcome
    unknown) with bad_signature, no exit code or output taken from it, counted."""
    fake = FakeNats({"agent": reply, "ssh": _result()})
    runner = _runner(fake, signer)
    outcome = await runner.send("h1", "c1", "true", 5, _target(), public_key)  # type: ignore[arg-type]
    assert outcome.status == CommandStatus.TIMED_OUT
    assert outcome.error_code == ErrorCode.BAD_SIGNATURE
    assert outcome.error_description is not None
    assert why in outcome.error_description
    assert (outcome.exit_code, outcome.stdout, outcome.is_result) == (None, "", False)
    assert runner.rejections.count("result", "h1") == 1
    assert len(fake.requests) == 1  # never re-sent over SSH


async def test_agent_result_signed_by_its_key_settles(signer: ApiSigner) -> None:
    """The agent's own signed result is recorded as it says."""
    fake = FakeNats({"agent": _signed(exit_code=3), "ssh": _result()})
    runner = _runner(fake, signer)
    outcome = await runner.send("h1", "c1", "true", 5, _target(), AGENT_PUB)  # type: ignore[arg-type]
    assert (outcome.status, outcome.exit_code, outcome.stdout, outcome.via) == ("failed", 3, "ok", "agent")
    assert runner.rejections.total == 0


@pytest.mark.parametrize(
    "failure", [nats.errors.TimeoutError(), nats.errors.ConnectionClosedError()], ids=["timeout", "closed"]
)
async def test_send_never_falls_back_on_other_failures(failure: BaseException, signer: ApiSigner) -> None:
    """A timeout (timed_out) or a closed connection (undeliverable) never reaches the SSH subject."""
    fake = FakeNats({"agent": failure, "ssh": _result()})
    outcome = await _runner(fake, signer).send("h1", "c1", "true", 5, _target(), None)  # type: ignore[arg-type]
    assert [s for s, _ in fake.requests] == ["warlock.agent.h1.exec"]
    expected = CommandStatus.TIMED_OUT if isinstance(failure, nats.errors.TimeoutError) else "undeliverable"
    assert outcome.status == expected


def _target() -> Any:
    from services.api.fleet.runner import ssh_target

    return ssh_target(_host())


class ScriptedStore:
    """A run store whose `start` answers from a script: a host, None (unknown) or an exception."""

    def __init__(self, answer: HostTarget | Exception | None) -> None:
        self.answer = answer

    async def start(self, ref: str, run: NewRun) -> HostTarget | None:
        """Play the scripted answer."""
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize(
    ("answer", "error"),
    [(DatabaseUnavailable("database unavailable: down"), DatabaseUnavailable), (None, NotFound)],
    ids=["database-down", "unknown-host"],
)
async def test_run_sends_nothing_without_a_committed_pending_row(
    answer: Exception | None, error: type[Exception], signer: ApiSigner
) -> None:
    """No pending row (database down, or no such host): the error propagates and no request is sent."""
    fake = FakeNats({"agent": _result(), "ssh": _result()})
    runner = _runner(fake, signer, store=ScriptedStore(answer))
    with pytest.raises(error):
        await runner.run("h1", ExecBody(command="true"), requested_by="k")
    assert fake.requests == []


def test_utc_datetime_round_trip() -> None:
    """Aware datetimes are stored as UTC and read back aware; naive ones are refused."""
    from sqlalchemy.dialects import postgresql, sqlite

    column = UtcDateTime()
    lite = sqlite.dialect()
    pg = postgresql.dialect()  # type: ignore[no-untyped-call]
    local = datetime(2024, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    stored = column.process_bind_param(local, lite)
    assert stored == datetime(2024, 1, 1, 10)
    assert column.process_result_value(stored, lite) == datetime(2024, 1, 1, 10, tzinfo=UTC)
    assert column.process_bind_param(local, pg) == local
    with pytest.raises(ValueError, match="naive"):
        column.process_bind_param(datetime(2024, 1, 1), lite)


def test_auth_cache_expires_and_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached key name is served until its TTL ends; TTL 0 caches nothing."""
    now = [100.0]
    monkeypatch.setattr("services.api.http.deps.time.monotonic", lambda: now[0])
    cache = AuthCache(ttl=5)
    cache.put("h", KeyInfo("ops"))
    assert cache.get("h") == KeyInfo("ops")
    now[0] += 6
    assert cache.get("h") is None
    off = AuthCache(ttl=0)
    off.put("h", KeyInfo("ops"))
    assert off.get("h") is None


async def test_unexpected_errors_become_json_500_without_traceback() -> None:
    """An exception no handler knows becomes a JSON 500 whose body carries no traceback."""
    import httpx
    from fastapi import FastAPI

    from services.api.http.errors import install_error_handlers
    from services.api.main import JsonServerErrors

    app = FastAPI()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    @app.get("/db")
    async def db() -> None:
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("down"))

    install_error_handlers(app)
    app.add_middleware(JsonServerErrors)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        boom_response = await client.get("/boom")
        db_response = await client.get("/db")
    assert boom_response.status_code == 500
    assert boom_response.json() == {"detail": "internal error"}
    assert db_response.status_code == 503
    assert db_response.json() == {"detail": "database unavailable"}
