"""Callers stop waiting on a dead gateway: the decisions of `InFlight`, `GatewayWatch.release` and the
runner's agent request, without I/O (a scripted NATS whose replies the test releases)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from nats.aio.client import Client as NATS

from services.api.fleet.inflight import Gone, InFlight
from services.api.fleet.liveness import GatewayWatch
from services.api.fleet.runner import Runner, ssh_target
from services.api.fleet.signer import ApiSigner
from services.api.fleet.tasks import TaskTracker
from services.api.settings import ApiSettings
from services.api.store import crud
from services.api.store.models import CommandStatus, Via
from services.api.store.runstore import HostTarget
from shared import signing
from shared.errors import ErrorCode
from shared.ids import CommandId
from shared.natsx import error
from shared.protocol import ExecResult, encode

AGENT_KEY = signing.generate()
AGENT_PUB = signing.public_text(AGENT_KEY)


def _signed(command_id: str = "c1", exit_code: int = 0) -> bytes:
    result = ExecResult(command_id=command_id, exit_code=exit_code, duration_ms=1.0, stdout="done")
    return encode(signing.sign_result(AGENT_KEY, "h1", result))


# ----------------------------------------------------------------------------- InFlight


async def test_gone_wakes_only_the_requests_of_that_gateway() -> None:
    inflight = InFlight()
    a1, a2 = inflight.watch("gw-a", "c1"), inflight.watch("gw-a", "c2")
    b1 = inflight.watch("gw-b", "c3")
    assert sorted(inflight.gateways()) == ["gw-a", "gw-b"]
    assert len(inflight) == 3
    assert inflight.gone("gw-a", "gateway gw-a silent") == 2
    assert a1.result() == Gone("gw-a", "gateway gw-a silent")
    assert a2.done()
    assert not b1.done()
    assert inflight.gateways() == ["gw-b"]
    assert inflight.gone("gw-a", "again") == 0  # nothing left to wake
    inflight.forget("gw-b", "c3")
    assert b1.cancelled()
    assert len(inflight) == 0
    assert inflight.gateways() == []
    inflight.forget("gw-b", "c3")  # twice, or of an unknown gateway: nothing happens
    inflight.forget("gw-x", "c9")


async def test_release_wakes_callers_of_silent_gateways_only() -> None:
    """A gateway heard within the silence keeps its callers; one not heard for longer (or never heard since
    the API started) releases them, even with no agent recorded connected through it (no database)."""
    now = [100.0]
    inflight = InFlight()
    watch = GatewayWatch(cast(Any, None), silence=3.0, clock=lambda: now[0], inflight=inflight)
    watch.heard["gw-live"] = 100.0
    watch.heard["gw-dead"] = 100.0
    live, dead, never = (
        inflight.watch("gw-live", "c1"),
        inflight.watch("gw-dead", "c2"),
        inflight.watch("gw-never", "c3"),
    )
    now[0] = 102.0
    assert watch.release() == []
    watch.heard["gw-live"] = 102.5
    now[0] = 103.5
    assert watch.release() == ["gw-dead", "gw-never"]
    assert dead.done()
    assert never.done()
    assert not live.done()
    woken = dead.result()
    assert woken is not None
    assert "gw-dead silent for over 3s" in woken.reason
    assert GatewayWatch(cast(Any, None), silence=3.0).release() == []  # no registry: nothing to do


# ----------------------------------------------------------------------------- the runner


class HeldNats:
    """Agent requests wait until the test releases a reply (or an exception); SSH requests are recorded."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.replies: dict[str, asyncio.Future[bytes]] = {}

    async def request(self, subject: str, payload: bytes, timeout: float) -> Any:
        self.requests.append(subject)
        if ".ssh." in f".{subject}":
            raise AssertionError("never re-sent over SSH")
        future = self.replies.setdefault(subject, asyncio.get_running_loop().create_future())
        async with asyncio.timeout(timeout):
            data = await future

        class Reply:
            pass

        reply = Reply()
        reply.data = data  # type: ignore[attr-defined]
        return reply


class RecordingSessions:
    """Stands in for the session maker: `crud.update_run` is replaced by a recorder in these tests."""

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[None]:
        yield None


@pytest.fixture
def updates(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any], tuple[str, ...]]]:
    calls: list[tuple[str, dict[str, Any], tuple[str, ...]]] = []

    async def update_run(session: Any, command_id: str, values: Any, when: Any, host_id: Any = None) -> bool:
        calls.append((command_id, dict(values), tuple(str(s) for s in when)))
        return True

    monkeypatch.setattr(crud, "update_run", update_run)
    return calls


def _runner(tmp_path: Path, fake: HeldNats, inflight: InFlight) -> Runner:
    settings = ApiSettings(exec_grace=1.0, max_output_chars=100)
    signer = ApiSigner(tmp_path / "signing.key", [], 120.0)
    sessions = cast(Any, RecordingSessions())
    return Runner(
        cast(NATS, fake), cast(Any, None), sessions, settings, TaskTracker(), signer, inflight=inflight
    )


def _target() -> Any:
    return ssh_target(HostTarget("h1", "10.0.0.1", 22, "ops", "ssh-ed25519 AAAA"))


async def _until(predicate: Any) -> None:
    async with asyncio.timeout(5):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_caller_stops_waiting_when_its_gateway_is_gone_and_a_late_reply_settles(
    tmp_path: Path, updates: list[tuple[str, dict[str, Any], tuple[str, ...]]]
) -> None:
    """Gone → timed_out / disconnected at once (not after the 30 s wait), sent once, never over SSH; the
    reply that still comes on the request is verified and settles the row if it is pending or timed out."""
    fake, inflight = HeldNats(), InFlight()
    runner = _runner(tmp_path, fake, inflight)
    send = asyncio.create_task(
        runner.send("h1", CommandId("c1"), "sleep 30", 30, _target(), AGENT_PUB, gateway_id="gw-a")
    )
    await _until(lambda: len(inflight) == 1)
    assert inflight.gone("gw-a", "gateway gw-a silent for over 3s") == 1
    async with asyncio.timeout(1):
        outcome = await send
    assert (outcome.status, outcome.via, outcome.error_code) == (
        CommandStatus.TIMED_OUT,
        Via.AGENT,
        ErrorCode.DISCONNECTED,
    )
    assert outcome.error_description is not None
    assert "may have run" in outcome.error_description
    assert "not re-sent" in outcome.error_description
    assert "gw-a" in outcome.error_description
    assert fake.requests == ["warlock.agent.h1.exec"]
    assert len(inflight) == 0
    assert len(runner._listeners) == 1  # still listening on the request
    fake.replies["warlock.agent.h1.exec"].set_result(_signed(exit_code=0))
    await _until(lambda: bool(updates))
    command_id, values, when = updates[0]
    assert command_id == "c1"
    assert values["status"] == CommandStatus.SUCCEEDED
    assert values["stdout"] == "done"
    assert when == ("pending", "timed_out")
    await _until(lambda: not runner._listeners)


async def test_a_late_reply_that_does_not_verify_settles_nothing(
    tmp_path: Path, updates: list[tuple[str, dict[str, Any], tuple[str, ...]]]
) -> None:
    fake, inflight = HeldNats(), InFlight()
    runner = _runner(tmp_path, fake, inflight)
    send = asyncio.create_task(
        runner.send("h1", CommandId("c1"), "true", 30, _target(), AGENT_PUB, gateway_id="gw-a")
    )
    await _until(lambda: len(inflight) == 1)
    inflight.gone("gw-a", "gone")
    assert (await send).error_code == ErrorCode.DISCONNECTED
    forged = ExecResult(command_id="c1", exit_code=0, duration_ms=1.0, stdout="forged")
    fake.replies["warlock.agent.h1.exec"].set_result(encode(forged))  # unsigned
    await _until(lambda: not runner._listeners)
    assert updates == []
    assert runner.rejections.count("result", "h1") == 1


async def test_other_gateways_and_answered_requests_are_not_affected(
    tmp_path: Path, updates: list[tuple[str, dict[str, Any], tuple[str, ...]]]
) -> None:
    """A request sent through gw-b (the agent had reconnected there before the send) is not woken by gw-a
    going silent; it gets its answer. A request with no gateway (not recorded connected) is not tracked."""
    fake, inflight = HeldNats(), InFlight()
    runner = _runner(tmp_path, fake, inflight)
    send = asyncio.create_task(
        runner.send("h1", CommandId("c1"), "true", 30, _target(), AGENT_PUB, gateway_id="gw-b")
    )
    await _until(lambda: len(inflight) == 1)
    assert inflight.gone("gw-a", "gone") == 0
    await asyncio.sleep(0.05)
    assert not send.done()
    fake.replies["warlock.agent.h1.exec"].set_result(_signed(exit_code=4))
    outcome = await send
    assert (outcome.status, outcome.exit_code) == (CommandStatus.FAILED, 4)
    assert len(inflight) == 0
    assert not runner._listeners
    assert updates == []
    fake2 = HeldNats()
    runner2 = _runner(tmp_path, fake2, inflight)
    send = asyncio.create_task(
        runner2.send("h1", CommandId("c2"), "true", 30, _target(), AGENT_PUB, gateway_id=None)
    )
    await _until(lambda: bool(fake2.requests))
    assert len(inflight) == 0
    fake2.replies["warlock.agent.h1.exec"].set_result(encode(error(ErrorCode.DISCONNECTED, "bye", "c2")))
    assert (await send).error_code == ErrorCode.DISCONNECTED


async def test_stop_listening_cancels_the_listeners(
    tmp_path: Path, updates: list[tuple[str, dict[str, Any], tuple[str, ...]]]
) -> None:
    fake, inflight = HeldNats(), InFlight()
    runner = _runner(tmp_path, fake, inflight)
    send = asyncio.create_task(
        runner.send("h1", CommandId("c1"), "true", 30, _target(), AGENT_PUB, gateway_id="gw-a")
    )
    await _until(lambda: len(inflight) == 1)
    inflight.gone("gw-a", "gone")
    await send
    assert runner._listeners
    await runner.stop_listening()
    assert not runner._listeners
    assert updates == []


# ----------------------------------------------------------------------------- the SSH route and signing


class NoAgent:
    """No agent responders; SSH requests are recorded and answered with a result."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    async def request(self, subject: str, payload: bytes, timeout: float) -> Any:
        import nats.errors

        self.requests.append(subject)
        if subject.startswith("warlock.agent."):
            raise nats.errors.NoRespondersError

        class Reply:
            data = encode(ExecResult(command_id=CommandId("c1"), exit_code=0, duration_ms=1.0, via="ssh"))

        return Reply()


async def test_ssh_leaves_only_once_its_route_is_recorded(tmp_path: Path) -> None:
    """The SSH request is sent only after `before_ssh` recorded the route: a settled run (False) or a
    database error sends nothing; recorded, it goes out."""
    from services.api.errors import DatabaseUnavailable

    async def settled() -> bool:
        return False

    async def broken() -> bool:
        raise DatabaseUnavailable("down")

    async def recorded() -> bool:
        return True

    for before, sent in ((settled, False), (broken, False), (recorded, True)):
        fake = NoAgent()
        runner = _runner(tmp_path, cast(Any, fake), InFlight())
        outcome = await runner.send("h1", CommandId("c1"), "true", 5, _target(), AGENT_PUB, before_ssh=before)
        assert ("warlock.ssh.h1.exec" in fake.requests) is sent
        if sent:
            assert (outcome.status, outcome.via) == (CommandStatus.SUCCEEDED, Via.SSH)
        else:
            assert outcome.status == CommandStatus.UNDELIVERABLE
            assert outcome.error_description is not None
            assert "nothing sent" in outcome.error_description


async def test_an_exec_is_signed_as_issued_at_its_runs_creation(tmp_path: Path) -> None:
    """The exec's not-after is created_at + command_ttl: what the reconciler's result query names."""
    from shared.protocol import ExecRequest, decode_model

    fake, inflight = HeldNats(), InFlight()
    runner = _runner(tmp_path, fake, inflight)
    payloads: list[bytes] = []
    original = fake.request

    async def recording(subject: str, payload: bytes, timeout: float) -> Any:
        payloads.append(payload)
        return await original(subject, payload, timeout)

    fake.request = recording  # type: ignore[method-assign]
    send = asyncio.create_task(
        runner.send("h1", CommandId("c1"), "true", 5, _target(), AGENT_PUB, issued_at=1_700_000_000.25)
    )
    await _until(lambda: bool(payloads))
    fake.replies["warlock.agent.h1.exec"].set_result(_signed())
    await send
    signature = decode_model(ExecRequest, payloads[0]).signature
    assert signature is not None
    assert (signature.issued_at, signature.not_after) == (1_700_000_000.25, 1_700_000_000.25 + 120.0)
