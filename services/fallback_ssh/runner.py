"""Run one command over a pooled SSH channel, with the agent's semantics (see `execution`)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

import asyncssh

from services.fallback_ssh.errors import Disconnected
from services.fallback_ssh.execution import (
    build_result,
    cancel_script,
    exit_outcome,
    killed_count,
    wrap_command,
)
from services.fallback_ssh.pool import Pool
from shared.ids import CommandId
from shared.output import OutputCap
from shared.protocol import ExecResult, SshTarget
from shared.stream import OutputStreamer

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


async def _drain(
    stream: asyncssh.SSHReader[bytes], cap: OutputCap, tee: Callable[[bytes], None] | None = None
) -> None:
    """Read `stream` to its end, feeding `cap` (keeps reading past the cap so the channel never stalls)
    and `tee` (output streaming)."""
    while chunk := await stream.read(CHUNK):
        cap.feed(chunk)
        if tee is not None:
            tee(chunk)


async def run_command(
    pool: Pool,
    target: SshTarget,
    command_id: CommandId,
    command: str,
    timeout_s: float,
    max_output_bytes: int,
    grace_s: float,
    cancelled: Callable[[], bool] | None = None,
    chunks: OutputStreamer | None = None,
) -> ExecResult:
    """Run `command` on `target` with a remote timeout that kills its process group; return its result.

    Raises an SshError when nothing ran (connect, auth, host key, busy) or when the connection was lost
    with the command in flight (`Disconnected`: it may have run); `pool.NotStarted` when `cancelled` said
    so once a channel was free (nothing ran). `chunks`: where output is streamed as it arrives; closed here
    before the result is returned (the caller aborts it on a failure).
    """
    out, err = OutputCap(max_output_bytes), OutputCap(max_output_bytes)
    started = time.perf_counter()
    client_timed_out = False
    async with pool.process(target, wrap_command(command, timeout_s, command_id), cancelled) as proc:
        proc.stdin.write_eof()
        tee_out = functools.partial(chunks.feed, "stdout") if chunks is not None else None
        tee_err = functools.partial(chunks.feed, "stderr") if chunks is not None else None
        io = asyncio.gather(
            _drain(proc.stdout, out, tee_out), _drain(proc.stderr, err, tee_err), proc.wait_closed()
        )
        try:
            async with asyncio.timeout(timeout_s + grace_s):
                await io
        except TimeoutError:
            # The remote timeout did not end the channel (something left the process group and
            # holds the output open): stop waiting and close the channel.
            client_timed_out = True
            log.warning(
                "command %s: channel still open %.1fs after its timeout; closing it", command_id, grace_s
            )
            proc.close()
        except (asyncssh.Error, OSError) as exc:
            raise Disconnected(
                f"connection to {target.address}:{target.port} lost while the command ran; it may have run"
            ) from exc
        exit_status, exit_signal = proc.exit_status, proc.exit_signal
    duration_ms = (time.perf_counter() - started) * 1000
    if chunks is not None:
        await chunks.close()  # the last chunks leave before the result does
    outcome = exit_outcome(
        exit_status,
        exit_signal[0] if exit_signal else None,
        duration_ms / 1000,
        timeout_s,
        client_timed_out,
    )
    if outcome is None:
        raise Disconnected(
            f"{target.address}:{target.port} closed the channel without an exit status; "
            "the command may have run"
        )
    return build_result(command_id, outcome, out, err, duration_ms)


CANCEL_TIMEOUT_S = 10.0


async def kill_remote(pool: Pool, target: SshTarget, command_id: CommandId) -> int:
    """Kill every process on `target` that runs under `command_id` (`execution.cancel_script`), over a
    connection of its own (`Pool.side_process`: not behind the host's channel cap); return how many were
    found. Raises an SshError when the host cannot be reached, Disconnected when the script's
    channel is lost or it prints no count."""
    out, err = OutputCap(64 * 1024), OutputCap(64 * 1024)
    async with pool.side_process(target, cancel_script(command_id)) as proc:
        proc.stdin.write_eof()
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT_S):
                await asyncio.gather(_drain(proc.stdout, out), _drain(proc.stderr, err), proc.wait_closed())
        except (TimeoutError, asyncssh.Error, OSError) as exc:
            raise Disconnected(
                f"cancel of {command_id} on {target.address}:{target.port} did not finish"
            ) from exc
    count = killed_count(out.text())
    if count is None:
        raise Disconnected(f"cancel of {command_id} on {target.address}:{target.port} reported nothing")
    return count
