"""Bounded memory and disk: output kept by the ledger and the outbox, never the ledger's ids."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.agent.allocator import release_after
from services.agent.ledger import Ledger, Result
from services.agent.results import Outbox, OutputBudget, cap_output, output_bytes, strip_output
from shared.ids import CommandId
from shared.protocol import Exec, ExecError, ExecResult

KIB, MIB = 1024, 1024 * 1024


def big(command_id: str, size: int = MIB, exit_code: int = 0) -> ExecResult:
    """A result with `size` bytes on stdout and on stderr."""
    return ExecResult(
        command_id=CommandId(command_id),
        exit_code=exit_code,
        stdout="o" * size,
        stderr="e" * size,
        duration_ms=12.5,
    )


def request(command_id: str) -> Exec:
    """An Exec for `command_id`."""
    return Exec(command_id=CommandId(command_id), command="true", timeout=5)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """An open ledger keeping 64 KiB per stream and 512 KiB of output in all."""
    led = Ledger(tmp_path / "ledger.jsonl", output_bytes=64 * KIB, max_bytes=512 * KIB)
    led.open()
    yield led
    led.close()


def test_cap_output_cuts_each_stream_on_a_character_boundary() -> None:
    """Each stream is cut to the byte limit without splitting a UTF-8 character; small ones are untouched."""
    small = ExecResult(command_id=CommandId("s"), exit_code=0, stdout="ok\n", duration_ms=1)
    assert cap_output(small, 10) is small
    wide = ExecResult(command_id=CommandId("w"), exit_code=0, stdout="é" * 10, stderr="x" * 20, duration_ms=1)
    capped = cap_output(wide, 9)
    assert isinstance(capped, ExecResult)
    assert (capped.stdout, capped.stderr, capped.truncated) == ("é" * 4, "x" * 9, True)
    assert output_bytes(capped) == 8 + 9
    error = ExecError(command_id=CommandId("e"), code="busy", description="d" * 100)
    assert cap_output(error, 1) is error
    assert strip_output(error) is error


def test_budget_drops_the_oldest_output_first() -> None:
    """Past its bytes, the budget names the oldest keys; re-adding a key moves it to the newest."""
    budget = OutputBudget(100)
    assert budget.add("a", 40) == []
    assert budget.add("b", 40) == []
    assert budget.add("a", 40) == []  # replaced, now the newest
    assert budget.add("c", 40) == ["b"]
    assert budget.total == 80
    budget.discard("a")
    assert (budget.total, len(budget)) == (40, 1)


async def test_ledger_output_is_bounded_per_result_and_in_total(ledger: Ledger) -> None:
    """Ten 1 MiB results: repeats get 64 KiB per stream, the oldest only their outcome; every id is kept."""

    async def runner(req: Exec) -> Result:
        return big(req.command_id, exit_code=int(req.command_id[1:]))

    first = await ledger.run(request("c0"), runner)
    assert isinstance(first, ExecResult)
    assert len(first.stdout) == MIB  # the first answer is the whole result
    for i in range(1, 10):
        await ledger.run(request(f"c{i}"), runner)
    assert ledger.output_held() <= 512 * KIB
    newest = ledger.lookup("c9")
    assert isinstance(newest, ExecResult)
    assert (len(newest.stdout), len(newest.stderr), newest.truncated) == (64 * KIB, 64 * KIB, True)
    oldest = ledger.lookup("c0")
    assert isinstance(oldest, ExecResult)
    assert (oldest.stdout, oldest.stderr, oldest.truncated) == ("", "", True)
    assert (oldest.exit_code, oldest.duration_ms) == (0, 12.5)
    assert all(ledger.lookup(f"c{i}") is not None for i in range(10))


async def test_ledger_file_stays_bounded_and_reloads_every_id(tmp_path: Path, ledger: Ledger) -> None:
    """Fifty 1 MiB results: the file stays near twice the output bound and a restart still knows every id."""
    sizes = []

    async def runner(req: Exec) -> Result:
        return big(req.command_id)

    for i in range(50):
        await ledger.run(request(f"c{i}"), runner)
        sizes.append(ledger.path.stat().st_size)
    assert max(sizes) < 2 * 512 * KIB + 2 * 130 * KIB + 50 * KIB
    ledger.close()
    again = Ledger(ledger.path, output_bytes=64 * KIB, max_bytes=512 * KIB)
    again.open()
    try:
        answers = [again.lookup(f"c{i}") for i in range(50)]
        assert all(isinstance(a, ExecResult) for a in answers)
        assert again.output_held() <= 512 * KIB
    finally:
        again.close()


def test_an_old_unbounded_ledger_is_bounded_when_opened(tmp_path: Path) -> None:
    """A file written without bounds (full outputs) is cut to the bounds on open and on disk."""
    path = tmp_path / "ledger.jsonl"
    lines = []
    for i in range(6):
        dump = big(f"c{i}").model_dump(mode="json")
        lines.append(json.dumps({"id": f"c{i}", "at": 2e9, "state": "started"}))
        lines.append(json.dumps({"id": f"c{i}", "at": 2e9, "state": "done", "result": dump}))
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size > 12 * MIB
    led = Ledger(path, output_bytes=64 * KIB, max_bytes=512 * KIB, clock=lambda: 2e9)
    led.open()
    try:
        assert led.output_held() <= 512 * KIB
        assert path.stat().st_size < 512 * KIB + 10 * KIB
        assert all(led.lookup(f"c{i}") is not None for i in range(6))
    finally:
        led.close()


def test_outbox_is_bounded_by_bytes_and_keeps_every_outcome() -> None:
    """Un-acked results beyond the byte bound lose their output, oldest first, but are still re-sent."""
    outbox = Outbox(max_bytes=5 * MIB)
    for i in range(10):
        outbox.add(big(f"c{i}"))
    assert outbox.output_bytes() <= 5 * MIB
    pending = outbox.pending()
    assert [r.command_id for r in pending] == [f"c{i}" for i in range(10)]
    assert isinstance(pending[0], ExecResult)
    assert (pending[0].stdout, pending[0].truncated, pending[0].exit_code) == ("", True, 0)
    assert pending[-1] == big("c9")
    assert outbox.ack("c9")
    assert outbox.output_bytes() <= 3 * MIB


def test_heap_is_trimmed_only_after_a_big_output() -> None:
    """malloc_trim runs after a result over 256 KiB (glibc here), never after small ones (the hot path)."""
    assert release_after(10 * 1024) is False
    assert release_after(1024 * 1024) is True
