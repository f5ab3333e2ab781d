"""Run one command over a pooled SSH channel, with the agent's semantics (see `execution`)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

import asyncssh

from services.fallback_ssh.errors import Disconnected
from services.fallback_ssh.execution import build_result, exit_outcome, wrap_command
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
    chunks: OutputStreamer | None = None,
) -> ExecResult:
    """Run `command` on `target` with a remote timeout that kills its process group; return its result.

    Raises an SshError when nothing ran (connect, auth, host key, busy) or when the connection was lost
    with the command in flight (`Disconnected`: it may have run). `chunks`: where output is streamed as
    it arrives; closed here before the result is returned (the caller aborts it on a failure).
    """
    out, err = OutputCap(max_output_bytes), OutputCap(max_output_bytes)
    started = time.perf_counter()
    client_timed_out = False
    async with pool.process(target, wrap_command(command, timeout_s)) as proc:
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
