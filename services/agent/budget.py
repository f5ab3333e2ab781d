"""A command's time budget under the concurrency cap (sans-I/O: plain numbers in, decisions out).

A command's timeout counts from when the agent received it. Waiting for a free slot uses up that budget;
a command starts only while at least `min_run` of it is left, and then runs with what is left as its
timeout. So the agent answers every command within its timeout (plus the reap tail of
`shared.limits.AGENT_AFTER_TIMEOUT_S` if it had to be killed), and a command never starts after the
moment its caller stops waiting for it. One that cannot start gets a typed ``busy`` error: nothing ran.
"""

from __future__ import annotations

from shared.errors import ErrorCode
from shared.ids import CommandId
from shared.protocol import ExecError

MIN_RUN_S = 0.1


def min_run(timeout: float) -> float:
    """The least budget a command still starts with: `MIN_RUN_S`, or half of a shorter timeout."""
    return min(MIN_RUN_S, timeout / 2)


def slot_wait(timeout: float, waited: float) -> float:
    """How much longer a command that has waited `waited` seconds may wait for a slot (0: no longer)."""
    return max(0.0, timeout - waited - min_run(timeout))


def start_timeout(timeout: float, waited: float) -> float | None:
    """The timeout a command runs with once it got a slot after `waited` seconds; None: it must not start."""
    left = timeout - waited
    return left if left >= min_run(timeout) else None


def no_slot(command_id: CommandId, timeout: float, waited: float, limit: int) -> ExecError:
    """The answer to a command whose budget ran out while it waited for a slot."""
    return ExecError(
        command_id=command_id,
        code=ErrorCode.BUSY,
        description=(
            f"waited {waited:.1f}s for a free slot ({limit} commands running), too long for its "
            f"{timeout:g}s timeout; nothing ran"
        ),
    )
