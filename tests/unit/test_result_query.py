"""Result queries without I/O: what the agent's ledger answers (and that it never runs anything), the signed
answer, the gateway session's bookkeeping, and the reconciler's decision on each answer."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.agent.commands import Commands
from services.agent.ledger import Ledger, Result
from services.agent.results import Outbox
from services.api.fleet.reconciler import NEVER_RAN, Settle, Wait, decide
from services.api.store.models import CommandStatus, Via
from services.gateway.session import Answered, Session
from shared import signing
from shared.errors import ErrorCode
from shared.ids import CommandId, GatewayId, HostId
from shared.natsx import error
from shared.protocol import (
    ErrorReply,
    Exec,
    ExecError,
    ExecResult,
    Hello,
    ResultAnswer,
    ResultQuery,
    decode_agent_frame,
    decode_gateway_frame,
    decode_result_reply,
    encode,
)
from tests.support.agent_trust import HOST, agent_trust, signed_exec
from tests.support.trust import TestSigner

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path: Path, clock: Clock) -> Any:
    led = Ledger(tmp_path / "ledger.jsonl", clock=clock)
    led.open()
    yield led
    led.close()


def _exec(command_id: str, command: str = "true") -> Exec:
    return Exec(command_id=CommandId(command_id), command=command, timeout=5)


async def _result(request: Exec) -> Result:
    return ExecResult(command_id=request.command_id, exit_code=0, stdout="ran", duration_ms=1.0)


# ----------------------------------------------------------------------------- the ledger


async def test_ledger_answers_done_running_and_lost(ledger: Ledger, clock: Clock) -> None:
    await ledger.run(_exec("c1"), _result)
    state, recorded = ledger.query("c1", clock.now - 1)  # past its not-after: the record still answers
    assert state == "done"
    assert isinstance(recorded, ExecResult)
    assert recorded.stdout == "ran"

    release = asyncio.Event()

    async def slow(request: Exec) -> Result:
        await release.wait()
        return await _result(request)

    running = asyncio.create_task(ledger.run(_exec("c2"), slow))
    await asyncio.sleep(0)
    assert ledger.query("c2", clock.now + 60) == ("running", None)
    release.set()
    await running
    ledger._entries["c3"] = type(ledger._entries["c1"])(at=clock.now)  # started, result lost in a crash
    state, recorded = ledger.query("c3", clock.now + 60)
    assert state == "done"
    assert isinstance(recorded, ExecError)
    assert recorded.code == ErrorCode.UNKNOWN_RESULT


async def test_an_unknown_id_before_its_not_after_never_ran_and_is_then_refused(
    ledger: Ledger, clock: Clock, tmp_path: Path
) -> None:
    """Asked about while its exec could still arrive: `never_ran`, the id is recorded (on disk), and an exec
    with it is then a replay: nothing runs. The answer stays `never_ran` after a restart."""
    ran: list[str] = []

    async def counting(request: Exec) -> Result:
        ran.append(request.command_id)
        return await _result(request)

    assert ledger.query("late", clock.now + 30) == ("never_ran", None)
    refused = await ledger.run(_exec("late"), counting, keep_until=clock.now + 30)
    assert isinstance(refused, ExecError)
    assert refused.code == ErrorCode.REPLAY
    assert ran == []
    ledger.close()
    reopened = Ledger(tmp_path / "ledger.jsonl", clock=clock)
    reopened.open()
    try:
        assert reopened.query("late", clock.now + 30) == ("never_ran", None)
        clock.now += 200  # past its not-after: still held (kept at least the retention)
        assert reopened.query("late", 0) == ("never_ran", None)
        again = await reopened.run(_exec("late"), counting)
        assert isinstance(again, ExecError)
        assert again.code == ErrorCode.REPLAY
    finally:
        reopened.close()
    assert ran == []


async def test_an_unknown_id_past_its_not_after_is_unknown_and_not_recorded(
    ledger: Ledger, clock: Clock
) -> None:
    """Past the exec's not-after it can no longer start, but it may have run and been forgotten."""
    assert ledger.query("gone", clock.now - 0.001) == ("unknown", None)
    assert "gone" not in ledger._entries
    clock.now += 601
    await ledger.run(_exec("old"), _result)
    clock.now += 601  # the record of a run expires with the retention
    assert ledger.query("old", clock.now - 1) == ("unknown", None)


async def test_the_tombstone_outlives_the_not_after_it_was_given(ledger: Ledger, clock: Clock) -> None:
    """A not-after far ahead keeps the id that long (bounded by what an exec may carry here)."""
    assert ledger.query("far", clock.now + 800)[0] == "never_ran"
    clock.now += 790
    assert ledger.replay("far") is not None
    assert ledger.query("huge", clock.now + 10**9)[0] == "never_ran"
    assert ledger._entries["huge"].at <= clock.now + 300 + 1e-6


# ----------------------------------------------------------------------------- the agent's answer


def _query(signer: TestSigner | None, command_id: str, not_after: float, host: str = HOST) -> ResultQuery:
    query = ResultQuery(query_id=CommandId("q-1"), command_id=CommandId(command_id), exec_not_after=not_after)
    if signer is None:
        return query
    signed = signer.sign("result_query", query, host)
    assert isinstance(signed, ResultQuery)
    return signed


async def test_the_agent_answers_signed_from_its_ledger_and_refuses_unsigned_queries(tmp_path: Path) -> None:
    signer = TestSigner(tmp_path)
    trust = agent_trust(tmp_path, signer=signer)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.open()
    delivered: list[Result] = []

    async def deliver(result: Result) -> None:
        delivered.append(result)

    commands = Commands(ledger, Outbox(), deliver, trust=trust, limit=2, max_output=1024)
    public = signing.parse_public(trust.public_key)
    try:
        commands.start(signed_exec(signer, "c1", "echo hi"))
        await commands.wait(10)
        answer = commands.answer(_query(signer, "c1", time.time() + 60), 64 * 1024)
        assert answer.state == "done"
        assert answer.result is not None
        assert answer.result.stdout == "hi\n"
        assert signing.answer_problem(public, HOST, "q-1", answer) is None
        assert signing.answer_problem(public, HOST, "q-2", answer) is not None  # bound to its query
        assert signing.answer_problem(public, "web-2", "q-1", answer) is not None  # and to its host
        edited = answer.model_copy(update={"result": answer.result.model_copy(update={"stdout": "forged"})})
        assert "does not verify" in (signing.answer_problem(public, HOST, "q-1", edited) or "")
        flipped = answer.model_copy(update={"state": "never_ran", "result": None})
        assert "not signed" in (signing.answer_problem(public, HOST, "q-1", flipped) or "")

        never = commands.answer(_query(signer, "c9", time.time() + 60), 64 * 1024)
        assert never.state == "never_ran"
        assert signing.answer_problem(public, HOST, "q-1", never) is None

        for bad, code in (
            (_query(None, "c2", time.time() + 60), "unsigned"),
            (_query(TestSigner(tmp_path, "other.key"), "c2", time.time() + 60), "unknown_key"),
            (_query(signer, "c2", time.time() + 60, host="web-2"), "wrong_host"),
        ):
            refused = commands.answer(bad, 64 * 1024)
            assert refused.state == "refused"
            assert refused.description.startswith(code)
            assert refused.signature is None
        assert ledger.query("c2", time.time() + 60)[0] == "never_ran"  # refused queries recorded nothing
        frame = decode_agent_frame(encode(never))
        assert frame == never
    finally:
        ledger.close()


async def test_a_big_recorded_result_is_trimmed_to_the_frame_and_still_verifies(tmp_path: Path) -> None:
    signer = TestSigner(tmp_path)
    trust = agent_trust(tmp_path, signer=signer)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.open()

    async def deliver(result: Result) -> None:
        pass

    commands = Commands(ledger, Outbox(), deliver, trust=trust, limit=2, max_output=64 * 1024)
    try:
        commands.start(signed_exec(signer, "big", "head -c 20000 /dev/zero | tr '\\0' x"))
        await commands.wait(10)
        answer = commands.answer(_query(signer, "big", time.time() + 60), 4096)
        assert len(encode(answer)) <= 4096
        assert answer.result is not None
        assert answer.result.truncated
        assert signing.answer_problem(signing.parse_public(trust.public_key), HOST, "q-1", answer) is None
    finally:
        ledger.close()


def test_the_query_frame_round_trips_and_old_agents_see_no_new_fields() -> None:
    query = ResultQuery(query_id=CommandId("q"), command_id=CommandId("c"), exec_not_after=1.5)
    assert decode_gateway_frame(encode(query)) == query
    reply = decode_result_reply(encode(error(ErrorCode.UNAVAILABLE, "old agent")))
    assert isinstance(reply, ErrorReply)


# ----------------------------------------------------------------------------- the gateway's session


async def test_gateway_session_queries_only_agents_that_answer_them() -> None:
    def session(capabilities: tuple[str, ...]) -> Session[object]:
        hello = Hello(
            host_id=HostId("h1"), hostname="h", platform="p", agent_version="1", capabilities=capabilities
        )
        return Session(object(), hello, GatewayId("gw1"), connected_at=1.0, last_seen=1.0)

    query = ResultQuery(query_id=CommandId("q"), command_id=CommandId("c"), exec_not_after=1.0)
    old = session(("exec",)).start_query(query, 4)
    assert isinstance(old, ErrorReply)
    assert old.code == ErrorCode.UNAVAILABLE
    new = session(("exec", "result_query"))
    started = new.start_query(query, 4)
    assert not isinstance(started, ErrorReply)
    frame, future = started
    assert frame is query
    again = new.start_query(query, 4)
    assert isinstance(again, ErrorReply)
    assert again.code == ErrorCode.BUSY
    answer = ResultAnswer(query_id=CommandId("q"), command_id=CommandId("c"), state="running")
    actions = new.handle(answer)
    assert len(actions) == 1
    assert isinstance(actions[0], Answered)
    actions[0].resolve()
    assert future.result() is answer
    assert new.handle(answer) == []  # a late answer: its request is gone
    pending = new.start_query(query.model_copy(update={"query_id": CommandId("q2")}), 4)
    assert not isinstance(pending, ErrorReply)
    new.end()
    assert pending[1].result() is None  # the waiting task answers disconnected


# ----------------------------------------------------------------------------- the reconciler's decision

AGENT = signing.generate()
AGENT_PUB = signing.public_text(AGENT)


def _answer(state: str, key: Any = AGENT, host: str = "h1", query_id: str = "q-1", **fields: Any) -> bytes:
    answer = ResultAnswer.model_validate({"query_id": query_id, "command_id": "c1", "state": state, **fields})
    if key is not None:
        answer = signing.sign_answer(key, host, answer)
    return encode(answer)


def _signed_result(**fields: Any) -> dict[str, Any]:
    result = ExecResult.model_validate(
        {"command_id": "c1", "exit_code": 0, "duration_ms": 2.0, "stdout": "ok", **fields}
    )
    return signing.sign_result(AGENT, "h1", result).model_dump(mode="json")


def _decide(data: bytes, public_key: str | None = AGENT_PUB) -> Settle | Wait:
    return decide(data, "h1", "q-1", public_key, 100, NOW)


def test_a_verified_recorded_result_settles_the_run_via_agent() -> None:
    decision = _decide(_answer("done", result=_signed_result(exit_code=3)))
    assert isinstance(decision, Settle)
    values = decision.values
    assert (values["status"], values["via"], values["exit_code"], values["stdout"]) == (
        "failed",
        "agent",
        3,
        "ok",
    )
    assert values["finished_at"] == NOW
    ok = _decide(_answer("done", result=_signed_result()))
    assert isinstance(ok, Settle)
    assert ok.values["status"] == CommandStatus.SUCCEEDED


def test_never_ran_fails_the_run_with_its_own_code_and_recorded_errors_keep_their_meaning() -> None:
    never = _decide(_answer("never_ran"))
    assert isinstance(never, Settle)
    assert (never.values["status"], never.values["error_code"]) == (CommandStatus.FAILED, NEVER_RAN)
    assert never.values["via"] == Via.AGENT
    assert "nothing ran" in never.values["error_description"]
    lost = {"command_id": "c1", "code": "unknown_result", "description": "lost"}
    maybe = _decide(_answer("done", error=lost))
    assert isinstance(maybe, Settle)
    assert (maybe.values["status"], maybe.values["error_code"]) == (CommandStatus.TIMED_OUT, "unknown_result")
    failed = {"command_id": "c1", "code": "exec_failed", "description": "no shell"}
    nothing = _decide(_answer("done", error=failed))
    assert isinstance(nothing, Settle)
    assert nothing.values["status"] == CommandStatus.FAILED


@pytest.mark.parametrize(
    ("data", "public_key", "why"),
    [
        (_answer("never_ran", key=None), AGENT_PUB, "not signed"),
        (_answer("never_ran", key=signing.generate()), AGENT_PUB, "not signed"),
        (_answer("never_ran", host="h2"), AGENT_PUB, "not signed"),
        (_answer("never_ran", query_id="q-old"), AGENT_PUB, "another query"),
        (_answer("done", result=_signed_result() | {"stdout": "forged"}), AGENT_PUB, "does not verify"),
        (_answer("done", result=_signed_result() | {"command_id": "c2"}), AGENT_PUB, "another command"),
        (_answer("never_ran"), None, "no agent key"),
        (_answer("running"), AGENT_PUB, "running"),
        (_answer("unknown"), AGENT_PUB, "unknown"),
        (encode(error(ErrorCode.TIMEOUT, "no answer")), AGENT_PUB, "no answer"),
        (b"{not json", AGENT_PUB, "undecodable"),
    ],
    ids=[
        "unsigned",
        "other-key",
        "other-host",
        "replayed-answer",
        "edited-result",
        "other-command",
        "no-key",
        "running",
        "unknown",
        "gateway-error",
        "garbage",
    ],
)
def test_anything_else_leaves_the_run_to_the_deadline_rule(
    data: bytes, public_key: str | None, why: str
) -> None:
    decision = _decide(data, public_key)
    assert isinstance(decision, Wait)
    assert why in decision.why
