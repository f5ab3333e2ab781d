"""The on-disk ledger: each command id runs at most once, even across restarts."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.agent.executor import run_command
from services.agent.ledger import Ledger, Result
from shared.errors import ErrorCode
from shared.ids import CommandId
from shared.protocol import Exec, ExecError, ExecResult


class Clock:
    """A settable wall clock."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        """The current fake time."""
        return self.now


def counting_exec(counter: Path, command_id: str = "c1", extra: str = "") -> Exec:
    """An Exec that appends one line to `counter` each time it really runs."""
    return Exec(
        command_id=CommandId(command_id), command=f"echo ran >> {counter}; {extra} echo hi", timeout=10
    )


async def runner(request: Exec) -> Result:
    """Run the request with the real executor."""
    return await run_command(request.command_id, request.command, request.timeout, 1024 * 1024)


def runs(counter: Path) -> int:
    """How many times the counting command ran."""
    return len(counter.read_text().splitlines()) if counter.exists() else 0


@pytest.fixture
def opened() -> Iterator[Callable[..., Ledger]]:
    """Factory of open ledgers, all closed after the test."""
    made: list[Ledger] = []

    def make(path: Path, clock: Callable[[], float] = time.time) -> Ledger:
        led = Ledger(path, clock=clock)
        led.open()
        made.append(led)
        return led

    yield make
    for led in made:
        led.close()


@pytest.fixture
def ledger(tmp_path: Path, opened: Callable[..., Ledger]) -> Ledger:
    """An open ledger in a fresh directory."""
    return opened(tmp_path / "state" / "ledger.jsonl")


async def test_repeat_id_is_a_replay(ledger: Ledger, tmp_path: Path) -> None:
    """The same id twice: the command runs once; the second gets a typed `replay` (nothing ran again)."""
    counter = tmp_path / "count"
    first = await ledger.run(counting_exec(counter), runner)
    second = await ledger.run(counting_exec(counter), runner)
    assert isinstance(first, ExecResult)
    assert first.stdout == "hi\n"
    assert isinstance(second, ExecError)
    assert (second.code, second.command_id) == (ErrorCode.REPLAY, "c1")
    assert "nothing ran again" in second.description
    assert runs(counter) == 1


async def test_concurrent_same_id_is_a_replay(ledger: Ledger, tmp_path: Path) -> None:
    """An id that is running now is not started again; the second caller gets `replay` at once."""
    counter = tmp_path / "count"
    request = counting_exec(counter, extra="sleep 0.3;")
    a, b = await asyncio.gather(ledger.run(request, runner), ledger.run(request, runner))
    assert isinstance(a, ExecResult)
    assert isinstance(b, ExecError)
    assert b.code == ErrorCode.REPLAY
    assert runs(counter) == 1


async def test_reload_from_disk(ledger: Ledger, tmp_path: Path, opened: Callable[..., Ledger]) -> None:
    """A new Ledger on the same file (agent restart) still refuses the id without running it."""
    counter = tmp_path / "count"
    await ledger.run(counting_exec(counter), runner)
    ledger.close()
    again = opened(ledger.path)
    answer = await again.run(counting_exec(counter), runner)
    assert isinstance(answer, ExecError)
    assert answer.code == ErrorCode.REPLAY
    assert runs(counter) == 1


async def test_an_id_outlives_its_envelope(tmp_path: Path, opened: Callable[..., Ledger]) -> None:
    """An id is kept until the not-after it was signed with, even past the retention (no late replay)."""
    clock = Clock(1_000_000.0)
    ledger = opened(tmp_path / "ledger.jsonl", clock)
    request = Exec(command_id=CommandId("late"), command="true", timeout=1)
    await ledger.run(request, runner, keep_until=1_000_000.0 + 900)
    assert ledger.claim("rot-1", keep_until=1_000_000.0 + 850) is None
    clock.now += 800  # past the 600 s retention, before the not-after
    ledger.close()
    ledger = opened(ledger.path, clock)  # and across a restart
    again = await ledger.run(request, runner)
    assert isinstance(again, ExecError)
    assert again.code == ErrorCode.REPLAY
    claimed = ledger.claim("rot-1")
    assert claimed is not None
    assert claimed.code == ErrorCode.REPLAY
    clock.now += 101
    ledger.compact()
    assert ledger.claim("rot-1") is None  # its envelope has expired: the id may be forgotten
    assert isinstance(await ledger.run(request, runner), ExecResult)


async def test_started_but_not_done_is_unknown_result(tmp_path: Path, opened: Callable[..., Ledger]) -> None:
    """An id whose run began before a crash is answered UNKNOWN_RESULT and never run again."""
    path = tmp_path / "ledger.jsonl"
    path.write_text(json.dumps({"id": "c1", "at": 1_000_000.0, "state": "started"}) + "\n")
    ledger = opened(path, Clock(1_000_010.0))
    counter = tmp_path / "count"
    answer = await ledger.run(counting_exec(counter), runner)
    assert isinstance(answer, ExecError)
    assert answer.code == ErrorCode.UNKNOWN_RESULT
    assert answer.command_id == "c1"
    assert runs(counter) == 0


async def test_started_record_is_written_before_running(
    tmp_path: Path, opened: Callable[..., Ledger]
) -> None:
    """While the command runs, the file already holds its "started" record."""
    ledger = opened(tmp_path / "ledger.jsonl")
    seen: list[str] = []

    async def peek(request: Exec) -> Result:
        seen.append(ledger.path.read_text())
        return ExecResult(command_id=request.command_id, exit_code=0, duration_ms=1)

    await ledger.run(Exec(command_id=CommandId("c9"), command="true", timeout=1), peek)
    assert '"state": "started"' in seen[0] or '"state":"started"' in seen[0]
    assert "c9" in seen[0]


async def test_expiry_after_ten_minutes(tmp_path: Path, opened: Callable[..., Ledger]) -> None:
    """After 10 minutes an id is forgotten (and compaction drops it from the file)."""
    clock = Clock()
    ledger = opened(tmp_path / "ledger.jsonl", clock)
    counter = tmp_path / "count"
    await ledger.run(counting_exec(counter), runner)
    clock.now += 599
    await ledger.run(counting_exec(counter), runner)
    assert runs(counter) == 1
    clock.now += 2
    ledger.compact()
    assert "c1" not in ledger.path.read_text()
    await ledger.run(counting_exec(counter), runner)
    assert runs(counter) == 2


async def test_corrupt_lines_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, opened: Callable[..., Ledger]
) -> None:
    """Garbage lines are skipped with a warning; good records around them still count."""
    path = tmp_path / "ledger.jsonl"
    result = ExecResult(command_id=CommandId("good"), exit_code=0, stdout="x", duration_ms=1)
    lines = [
        "{not json",
        json.dumps({"id": "good", "at": 1_000_000.0, "state": "started"}),
        json.dumps({"id": "bad", "at": 1_000_000.0, "state": "done", "result": {"type": "nope"}}),
        json.dumps(
            {"id": "good", "at": 1_000_000.0, "state": "done", "result": result.model_dump(mode="json")}
        ),
        '{"id": "half", "at": 1',
    ]
    path.write_text("\n".join(lines) + "\n")
    ledger = opened(path, Clock(1_000_001.0))
    assert ledger.lookup("good") == result
    assert ledger.lookup("bad") is None
    assert sum("skipping corrupt line" in r.getMessage() for r in caplog.records) == 3


def test_permissions(ledger: Ledger) -> None:
    """The ledger directory is 0700 and the file 0600."""
    assert stat.S_IMODE(ledger.path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600


async def test_runner_exception_becomes_internal_error(ledger: Ledger) -> None:
    """A runner that raises yields a recorded INTERNAL error, not an exception."""

    async def broken(request: Exec) -> Result:
        raise RuntimeError("boom")

    answer = await ledger.run(Exec(command_id=CommandId("c2"), command="true", timeout=1), broken)
    assert isinstance(answer, ExecError)
    assert answer.code == ErrorCode.INTERNAL
    assert ledger.lookup("c2") == answer
