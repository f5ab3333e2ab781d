"""The command executor: output, exit codes, signals, truncation, timeouts that kill the whole group."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from unittest import mock

import pytest

from services.agent import executor
from services.agent.executor import run_command
from shared.errors import ErrorCode
from shared.ids import CommandId
from shared.protocol import ExecError, ExecResult

CID = CommandId("cmd-1")
MIB = 1024 * 1024


async def run_ok(command: str, timeout: float = 10, cap: int = MIB) -> ExecResult:
    """Run `command` and return its ExecResult (fails the test on an ExecError)."""
    result = await run_command(CID, command, timeout, cap)
    assert isinstance(result, ExecResult), result
    return result


async def test_stdout_and_exit_code() -> None:
    """Stdout is captured and a zero exit code reported, with a duration."""
    result = await run_ok("echo hello")
    assert result.stdout == "hello\n"
    assert result.stderr == ""
    assert result.exit_code == 0
    assert result.signal is None
    assert not result.truncated
    assert not result.timed_out
    assert result.duration_ms > 0
    assert result.command_id == CID


async def test_stderr_and_nonzero_exit() -> None:
    """Stderr is kept apart from stdout and the exit code is passed through."""
    result = await run_ok("echo out; echo err >&2; exit 3")
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert result.exit_code == 3


async def test_killed_by_signal() -> None:
    """A command ended by a signal reports the signal and no exit code."""
    result = await run_ok("kill -TERM $$")
    assert result.exit_code is None
    assert result.signal == signal.SIGTERM


async def test_invalid_utf8_is_replaced() -> None:
    """Bytes that are not UTF-8 are decoded with replacement characters."""
    result = await run_ok(r"printf 'a\377b'")
    assert result.stdout == "a\ufffdb"


async def test_truncation_keeps_the_cap_and_drains() -> None:
    """Output past the cap is dropped (truncated=True) while the command still runs to its end."""
    result = await run_ok("head -c 200000 /dev/zero | tr '\\0' x; echo done >&2", cap=1000)
    assert result.stdout == "x" * 1000
    assert result.stderr == "done\n"
    assert result.truncated
    assert result.exit_code == 0


async def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    """On timeout the whole group is SIGKILLed: a background child is gone afterwards."""
    pidfile = tmp_path / "pid"
    result = await run_ok(f"sleep 300 & echo $! > {pidfile}; sleep 300", timeout=1)
    assert result.timed_out
    assert result.exit_code is None
    assert result.signal == signal.SIGKILL
    assert result.duration_ms < 8000
    child = int(pidfile.read_text())
    for _ in range(100):  # the child is reaped by init shortly after it dies
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        status = (
            Path(f"/proc/{child}/stat").read_text().split()[2] if Path(f"/proc/{child}/stat").exists() else ""
        )
        if status == "Z":
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"background child {child} still alive after the timeout")


async def test_command_is_the_dash_c_argument() -> None:
    """The command string is passed verbatim as the -c argument of /bin/sh, in a new session."""
    real = asyncio.create_subprocess_exec
    seen: list[tuple[object, ...]] = []
    kwargs_seen: list[dict[str, object]] = []

    async def spy(*args: object, **kwargs: object) -> asyncio.subprocess.Process:
        seen.append(args)
        kwargs_seen.append(kwargs)
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    command = "echo 'a b' \"$HOME\" ; true"
    with mock.patch("asyncio.create_subprocess_exec", spy):
        await run_ok(command)
    assert seen == [("/bin/sh", "-c", command)]
    assert kwargs_seen[0]["start_new_session"] is True
    assert kwargs_seen[0]["stdin"] == asyncio.subprocess.DEVNULL


async def test_spawn_failure_is_exec_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the shell cannot be started the answer is an EXEC_FAILED error, not an exception."""
    monkeypatch.setattr(executor, "SHELL", "/nonexistent/sh")
    result = await run_command(CID, "true", 5, MIB)
    assert isinstance(result, ExecError)
    assert result.code == ErrorCode.EXEC_FAILED
    assert result.command_id == CID


async def test_nul_byte_is_exec_failed_and_nothing_runs(tmp_path: Path) -> None:
    """A command holding a NUL byte is answered EXEC_FAILED (nothing ran), never a traceback."""
    marker = tmp_path / "ran"
    result = await run_command(CID, f"touch {marker}; echo a\x00b", 5, MIB)
    assert isinstance(result, ExecError), result
    assert result.code == ErrorCode.EXEC_FAILED
    assert result.command_id == CID
    assert "nothing ran" in result.description
    assert not marker.exists()
