"""Run one shell command in its own process group, with a timeout and capped output.

The command string is the ``-c`` argument of ``/bin/sh``; the agent never builds a shell string itself.
A timeout kills the whole process group with SIGKILL, so children the command started die with it; so
does a cancel (`cancel` set): the result then says ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from shared.errors import ErrorCode
from shared.ids import CommandId
from shared.limits import AGENT_REAP_S
from shared.output import OutputCap
from shared.protocol import ExecError, ExecResult

from .stream import open_stream

log = logging.getLogger(__name__)

SHELL = "/bin/sh"
CHUNK = 64 * 1024
REAP_TIMEOUT_S = AGENT_REAP_S  # after SIGKILL, how long to wait for the group to let go of the pipes
# The cancel event of the command the current task runs (`services.agent.commands` sets it around the
# call): `run_command` uses it when it is given none.
CANCEL: ContextVar[asyncio.Event | None] = ContextVar("warlock_cancel", default=None)


async def _drain(
    stream: asyncio.StreamReader | None, capture: OutputCap, tee: Callable[[bytes], None] | None = None
) -> None:
    """Read `stream` to its end, feeding `capture` (keeps reading past the cap) and `tee` (streaming)."""
    if stream is None:
        return
    while chunk := await stream.read(CHUNK):
        capture.feed(chunk)
        if tee is not None:
            tee(chunk)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group led by `pid` (it may be gone already)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _until_done_or_cancelled(io: asyncio.Future[Any], cancel: asyncio.Event | None) -> bool:
    """Wait for `io` (shielded); return True when `cancel` was set first (the command is still running)."""
    if cancel is None:
        await asyncio.shield(io)
        return False
    cancelled = asyncio.ensure_future(cancel.wait())
    try:
        await asyncio.wait({io, cancelled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        cancelled.cancel()
    if io.done():
        io.result()  # re-raise what the I/O raised, as `await asyncio.shield(io)` would
        return False
    return True


def _cancelled_before_start(command_id: CommandId) -> ExecResult:
    """The result of a command cancelled before it started (it waited for a slot): nothing ran."""
    return ExecResult(command_id=command_id, exit_code=None, duration_ms=0.0, cancelled=True)


async def run_command(
    command_id: CommandId,
    command: str,
    timeout_s: float,
    max_output_bytes: int,
    cancel: asyncio.Event | None = None,
) -> ExecResult | ExecError:
    """Run `command` with ``/bin/sh -c`` in a new session; return its result or an EXEC_FAILED error.

    `cancel` (default: the task's `CANCEL`) set while it runs: the process group is killed (SIGKILL) and
    the result says ``cancelled``.
    """
    if cancel is None:
        cancel = CANCEL.get()
    if cancel is not None and cancel.is_set():
        return _cancelled_before_start(command_id)
    if "\0" in command:
        # exec() takes C strings: a NUL cannot reach the shell (spawning would raise ValueError).
        log.warning("command %s: refused, it contains a NUL byte", command_id)
        return ExecError(
            command_id=command_id,
            code=ErrorCode.EXEC_FAILED,
            description="the command contains a NUL byte, which no process argument can hold; nothing ran",
        )
    started = time.perf_counter()
    try:
        proc = await asyncio.create_subprocess_exec(
            SHELL,
            "-c",
            command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        log.warning("command %s: could not start %s: %s", command_id, SHELL, exc)
        return ExecError(
            command_id=command_id, code=ErrorCode.EXEC_FAILED, description=f"could not start {SHELL}: {exc}"
        )
    out, err = OutputCap(max_output_bytes), OutputCap(max_output_bytes)
    chunks = open_stream(command_id)  # output as it happens, when a session takes chunks (`stream`)
    tee_out = functools.partial(chunks.feed, "stdout") if chunks is not None else None
    tee_err = functools.partial(chunks.feed, "stderr") if chunks is not None else None
    io = asyncio.gather(_drain(proc.stdout, out, tee_out), _drain(proc.stderr, err, tee_err), proc.wait())
    timed_out = False
    cancelled = False
    try:
        async with asyncio.timeout(timeout_s):
            cancelled = await _until_done_or_cancelled(io, cancel)
            if cancelled:
                log.info("command %s: cancelled; killing its process group", command_id)
                raise TimeoutError  # the same kill and reap as a timeout
    except TimeoutError:
        timed_out = not cancelled
        _kill_group(proc.pid)
        try:
            async with asyncio.timeout(REAP_TIMEOUT_S):
                await asyncio.shield(io)
        except TimeoutError:
            # Something outside the group (it called setsid) still holds a pipe: stop reading it.
            log.warning("command %s: output pipes still open after SIGKILL; abandoning them", command_id)
            io.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await io
            await proc.wait()
    except asyncio.CancelledError:
        # The agent is stopping: take the command's process group down with it.
        _kill_group(proc.pid)
        io.cancel()
        with contextlib.suppress(asyncio.CancelledError, ProcessLookupError):
            await proc.wait()
        if chunks is not None:
            await chunks.abort()
        raise
    duration_ms = (time.perf_counter() - started) * 1000
    if chunks is not None:
        await chunks.close()  # the last chunks leave before the result does
    code = proc.returncode
    if timed_out or cancelled:
        exit_code, sig = None, int(signal.SIGKILL)
    elif code is not None and code < 0:
        exit_code, sig = None, -code
    else:
        exit_code, sig = code, None
    return ExecResult(
        command_id=command_id,
        exit_code=exit_code,
        signal=sig,
        stdout=out.text(),
        stderr=err.text(),
        truncated=bool(out.dropped or err.dropped),
        timed_out=timed_out,
        duration_ms=duration_ms,
        cancelled=cancelled,
    )
