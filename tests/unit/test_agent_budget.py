"""A command's timeout counts from its arrival: waiting for a slot uses it up; past it `busy`, nothing ran."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.agent import budget, commands
from services.agent.commands import Commands
from services.agent.ledger import Ledger, Result
from services.agent.results import Outbox
from shared.errors import NOTHING_RAN, ErrorCode
from shared.ids import CommandId
from shared.protocol import Exec, ExecError, ExecResult
from tests.support.agent_trust import agent_trust, signed_exec
from tests.support.trust import TestSigner


def test_budget_decisions() -> None:
    """Wait while enough is left, start with what is left, refuse below the minimum run time."""
    assert budget.min_run(30) == budget.MIN_RUN_S
    assert budget.min_run(0.05) == 0.025
    assert budget.slot_wait(3.0, 1.0) == pytest.approx(2.0 - budget.MIN_RUN_S)
    assert budget.slot_wait(3.0, 2.95) == 0.0
    assert budget.start_timeout(3.0, 0.0) == 3.0
    assert budget.start_timeout(3.0, 2.5) == pytest.approx(0.5)
    assert budget.start_timeout(3.0, 2.95) is None
    refusal = budget.no_slot(CommandId("c1"), 3.0, 2.9, 8)
    assert refusal.code == ErrorCode.BUSY in NOTHING_RAN
    assert "waited 2.9s" in refusal.description
    assert "nothing ran" in refusal.description


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """An open ledger, closed after the test."""
    led = Ledger(tmp_path / "ledger.jsonl")
    led.open()
    yield led
    led.close()


async def test_refused_admission_is_not_recorded(ledger: Ledger, tmp_path: Path) -> None:
    """A refusal answers the request, is not written down, and the id may run later; the same id arriving
    while the first waits for admission is a replay (nothing runs)."""
    gate = asyncio.Event()
    refusal = ExecError(command_id=CommandId("c1"), code=ErrorCode.BUSY, description="no slot; nothing ran")
    ran: list[str] = []

    @contextlib.asynccontextmanager
    async def refuse(request: Exec) -> AsyncIterator[Exec | ExecError]:
        await gate.wait()
        yield refusal

    async def runner(request: Exec) -> Result:
        ran.append(request.command_id)
        return ExecResult(command_id=request.command_id, exit_code=0, duration_ms=1)

    request = Exec(command_id=CommandId("c1"), command="true", timeout=5)
    first = asyncio.create_task(ledger.run(request, runner, refuse))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(ledger.run(request, runner, refuse))
    await asyncio.sleep(0.01)
    gate.set()
    assert await first == refusal
    replayed = await second
    assert isinstance(replayed, ExecError)
    assert replayed.code == ErrorCode.REPLAY
    assert ran == []
    assert ledger.lookup("c1") is None
    assert "c1" not in (tmp_path / "ledger.jsonl").read_text()
    again = await ledger.run(request, runner)
    assert isinstance(again, ExecResult)
    assert ran == ["c1"]


async def test_queued_command_runs_with_the_rest_of_its_timeout_or_not_at_all(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One slot: a command queued past its budget is busy; one that gets the slot runs with what is left."""
    timeouts: dict[str, float] = {}

    async def fake_run(command_id: CommandId, command: str, timeout: float, cap: int) -> Result:
        timeouts[command_id] = timeout
        await asyncio.sleep(float(command))
        return ExecResult(command_id=command_id, exit_code=0, duration_ms=1)

    monkeypatch.setattr(commands, "run_command", fake_run)
    results: dict[str, Result] = {}

    async def deliver(result: Result) -> None:
        results[result.command_id] = result

    signer = TestSigner(tmp_path)
    trust = agent_trust(tmp_path, signer=signer)
    cmds = Commands(ledger, Outbox(), deliver, trust=trust, limit=1, max_output=1024)
    started = time.monotonic()
    cmds.start(signed_exec(signer, "long", "0.6", timeout=5))
    cmds.start(signed_exec(signer, "short", "0", timeout=0.3))
    cmds.start(signed_exec(signer, "patient", "0", timeout=3))
    await cmds.wait(10)
    short = results["short"]
    assert isinstance(short, ExecError)
    assert short.code == ErrorCode.BUSY
    assert "short" not in timeouts
    assert timeouts["long"] == pytest.approx(5, abs=0.1)
    assert 3 - time.monotonic() + started < timeouts["patient"] < 3 - 0.5
    assert isinstance(results["patient"], ExecResult)
