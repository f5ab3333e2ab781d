"""Run an agent operation (`agent_ops.OpPlan`) on a host over pooled SSH channels.

1. ``mktemp -d`` makes a private (0700) temporary directory on the host;
2. every upload is copied into it with ``cat > <file>`` over the channel's stdin (no SFTP subsystem
   needed);
3. the script runs with the plan's variables on the command line (nothing secret: no token travels);
4. the directory is removed whatever happened.
"""

from __future__ import annotations

import asyncio
import logging
import shlex

import asyncssh

from services.fallback_ssh.agent_ops import TEMP_DIR, OpPlan, parse_report
from services.fallback_ssh.errors import Disconnected, OpTimedOut, ScriptFailed, SshError
from services.fallback_ssh.pool import Pool
from shared.output import OutputCap
from shared.protocol import AgentOpResult, InstallStep, SshTarget

log = logging.getLogger(__name__)

MAX_OUTPUT = 256 * 1024
CLEANUP_TIMEOUT = 15.0
MKTEMP = 'mktemp -d "${TMPDIR:-/tmp}/warlock-agent-op.XXXXXXXX"'


async def _read(stream: asyncssh.SSHReader[bytes], cap: OutputCap) -> None:
    """Read `stream` to its end into `cap`."""
    while chunk := await stream.read(64 * 1024):
        cap.feed(chunk)


async def remote(
    pool: Pool, target: SshTarget, command: str, stdin: bytes = b""
) -> tuple[int | None, str, str]:
    """Run `command` on `target` feeding it `stdin`; return (exit status, stdout, stderr)."""
    out, err = OutputCap(MAX_OUTPUT), OutputCap(MAX_OUTPUT)
    async with pool.process(target, command) as proc:
        try:
            if stdin:
                proc.stdin.write(stdin)
            proc.stdin.write_eof()
            await asyncio.gather(_read(proc.stdout, out), _read(proc.stderr, err), proc.wait_closed())
        except (asyncssh.Error, OSError) as exc:
            raise Disconnected(
                f"connection to {target.address}:{target.port} lost during an agent operation; "
                "it may have partly run"
            ) from exc
        return proc.exit_status, out.text(), err.text()


async def _make_temp_dir(pool: Pool, target: SshTarget) -> str:
    """Create the private temporary directory on the host and return its path."""
    status, out, err = await remote(pool, target, MKTEMP)
    if status != 0:
        raise ScriptFailed(f"mktemp -d failed on the host (exit status {status}): {err.strip()[:500]}")
    temp_dir = out.strip()
    if not TEMP_DIR.match(temp_dir) or "/warlock-agent-op." not in temp_dir:
        raise ScriptFailed(f"mktemp -d answered an unusable directory name: {temp_dir[:200]!r}")
    return temp_dir


async def _cleanup(pool: Pool, target: SshTarget, temp_dir: str) -> None:
    """Remove `temp_dir` on the host; a failure is logged, never raised."""
    try:
        async with asyncio.timeout(CLEANUP_TIMEOUT):
            status, _, err = await remote(pool, target, f"rm -rf -- {shlex.quote(temp_dir)}")
    except (SshError, TimeoutError) as exc:
        log.warning("could not remove %s on %s: %s", temp_dir, target.address, exc)
        return
    if status != 0:
        log.warning("could not remove %s on %s: %s", temp_dir, target.address, err.strip()[:200])


async def _copy_and_run(
    pool: Pool, target: SshTarget, op_plan: OpPlan, temp_dir: str, timeout_s: float
) -> AgentOpResult:
    """Copy the plan's files into `temp_dir`, run its script and parse the report."""
    for upload in op_plan.uploads:
        path = shlex.quote(f"{temp_dir}/{upload.name}")
        status, _, err = await remote(pool, target, f"cat > {path}", upload.data)
        if status != 0:
            raise ScriptFailed(f"copying {upload.name} to the host failed: {err.strip()[:500]}")
    sizes = ", ".join(f"{u.name} ({len(u.data) / 1024:.1f} KiB)" for u in op_plan.uploads)
    copied = InstallStep(name="upload", ok=True, detail=f"copied {sizes} to {temp_dir}")
    status, out, err = await remote(pool, target, op_plan.command(temp_dir, timeout_s), op_plan.stdin())
    return parse_report(op_plan, out, err, status, (copied,))


async def run_agent_op(pool: Pool, target: SshTarget, op_plan: OpPlan, timeout_s: float) -> AgentOpResult:
    """Carry out `op_plan` on `target` within `timeout_s`; the temporary directory is always removed.

    Raises an SshError: connection failures as for commands, ScriptFailed when the script failed,
    OpTimedOut when it did not finish in time.
    """
    temp_dir: str | None = None
    try:
        async with asyncio.timeout(timeout_s):
            temp_dir = await _make_temp_dir(pool, target)
            return await _copy_and_run(pool, target, op_plan, temp_dir, timeout_s)
    except TimeoutError as exc:
        raise OpTimedOut(
            f"{op_plan.op} on {target.address}:{target.port} did not finish within {timeout_s:g}s; "
            "it may have partly run"
        ) from exc
    finally:
        if temp_dir is not None:
            await _cleanup(pool, target, temp_dir)
