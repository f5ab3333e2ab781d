"""Cancel a run: the host kills the command's processes; the run says ``cancelled``; a finished run stays.

    cancel_run(runner, id)
      ├─ unknown id ────────────────────────────▶ NotFound
      ├─ run already final ─────────────────────▶ finished (the row unchanged)
      ├─ via ssh ──▶ warlock.ssh.<host>.cancel   (signed ``ssh_cancel``: command id + target)
      └─ else ────▶ warlock.agent.<host>.cancel  (signed ``cancel``: command id)
                     └─ no responders, via still unset ──▶ warlock.ssh.<host>.cancel
    answer accepted ─▶ wait up to `wait` s for the row to be final: cancelled | finished (it ended first)
                       | cancelling (not final yet: the host's result will settle it)
    answer never_ran ─▶ (agent: it never got the command and now refuses its id) cancelled, nothing ran
    answer finished / not_running ─▶ the row as it is (after a short wait for a result in flight)

Only the cancel is ever sent, never the command. The run becomes ``cancelled`` through the host's own
result (the agent signs ``cancelled: true`` with the result; the SSH worker running the command sets it),
recorded by the runner like any result, so the REST caller of the exec gets the cancelled row with the
output produced until the kill. When another SSH worker of the queue group ran the command, its result
says only "killed by SIGKILL": a run that a cancel we sent over SSH was accepted for, then ended ``failed``
by signal 9, is recorded ``cancelled``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import nats.errors

from services.api.fleet.browser import announce_run
from services.api.fleet.runner import OPEN, Runner, ssh_target
from services.api.store import crud
from services.api.store.models import CommandRun, CommandStatus, Via, utcnow
from shared import subjects
from shared.errors import ErrorCode, ProtocolError
from shared.ids import CommandId
from shared.protocol import CancelAnswer, CancelRequest, SshCancelRequest, decode_cancel_reply, encode

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 5.0  # how long cancel_run waits for an accepted cancel's result to settle the run
AGENT_CANCEL_TIMEOUT_S = 10.0  # the gateway gives the agent 5 s (agent_ping_timeout)
SSH_CANCEL_TIMEOUT_S = 30.0  # the worker may queue for a channel (10 s), dial (10 s), run the script (10 s)
FINISHED_WAIT_S = 1.0  # a host that says finished: its result may still be on its way to the row
POLL_S = 0.05

CancelState = Literal[
    "cancelled", "cancelling", "finished", "not_running", "unreachable", "no_answer", "failed"
]


@dataclass(frozen=True)
class CancelOutcome:
    """What a cancel did.

    - ``cancelled``: the host killed it; `run` is final, ``cancelled``.
    - ``cancelling``: the host accepted the cancel; `run` is not final yet (its result will settle it).
    - ``finished``: it had already ended (or ended before the kill); `run` keeps its result.
    - ``not_running``: the host does not run it (not arrived yet, or ended and forgotten); nothing killed.
    - ``unreachable``: no agent session and no SSH worker answered; nothing was sent.
    - ``no_answer``: the cancel request timed out; it may or may not have been carried out.
    - ``failed``: the host or worker answered a typed error (`code`), e.g. the host cannot be reached.
    """

    state: CancelState
    run: CommandRun  # as read after the cancel (the http layer answers it as CommandRunPublic)
    detail: str
    code: str | None = None
    via: Via | None = None  # the path the cancel went by


async def _read(runner: Runner, command_id: str) -> CommandRun:
    async with runner.sessions() as session:
        return await crud.get_run(session, command_id)


async def _settled(runner: Runner, command_id: str, wait: float) -> CommandRun:
    """The run once it is final, or as it is after `wait` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        run = await _read(runner, command_id)
        if run.status not in OPEN or loop.time() >= deadline:
            return run
        await asyncio.sleep(POLL_S)


async def _send_agent(runner: Runner, run: CommandRun) -> bytes:
    exec_not_after = run.created_at.timestamp() + runner.settings.command_ttl  # as the reconciler's query
    request = CancelRequest(command_id=CommandId(run.command_id), exec_not_after=exec_not_after)
    request = runner.signer.sign("cancel", request, run.host_id)
    msg = await runner.nc.request(
        subjects.agent_cancel(run.host_id), encode(request), timeout=AGENT_CANCEL_TIMEOUT_S
    )
    return bytes(msg.data)


async def _send_ssh(runner: Runner, run: CommandRun) -> bytes | None:
    """The SSH worker's answer; None when the host is gone from the inventory (no target to sign)."""
    async with runner.sessions() as session:
        host = await crud.find_host(session, run.host_id)
    if host is None or host.id != run.host_id:
        return None
    request = SshCancelRequest(command_id=CommandId(run.command_id), target=ssh_target(host))
    request = runner.signer.sign("ssh_cancel", request, run.host_id)
    if run.command_id in runner.delivering:  # its result, a SIGKILL, is then recorded as this cancel
        runner.ssh_cancels.add(run.command_id)
    msg = await runner.nc.request(
        subjects.ssh_cancel(run.host_id), encode(request), timeout=SSH_CANCEL_TIMEOUT_S
    )
    return bytes(msg.data)


async def cancel_run(runner: Runner, command_id: str, wait: float = CANCEL_WAIT_S) -> CancelOutcome:
    """Cancel the run `command_id` (see the module docstring); NotFound for an unknown id.

    NATS and typed failures are outcomes, not exceptions, so a job can cancel many runs and report each.
    """
    run = await _read(runner, command_id)
    if run.status not in OPEN:
        return CancelOutcome("finished", run, f"the command already ended ({run.status}); its result stands")
    via = Via.SSH if run.via == Via.SSH else Via.AGENT
    try:
        if via is Via.AGENT:
            try:
                data: bytes | None = await _send_agent(runner, run)
            except nats.errors.NoRespondersError:
                current = await _read(runner, command_id)
                if current.status not in OPEN:
                    return CancelOutcome(
                        "finished", current, "the command ended meanwhile; its result stands"
                    )
                if current.via is not None and current.via != Via.SSH:
                    return CancelOutcome("not_running", current, "no agent session holds the host now")
                via = Via.SSH
                data = await _send_ssh(runner, current)
        else:
            data = await _send_ssh(runner, run)
    except nats.errors.NoRespondersError:
        return CancelOutcome(
            "unreachable", await _read(runner, command_id), "no agent session and no SSH worker for the host"
        )
    except nats.errors.TimeoutError:
        return CancelOutcome(
            "no_answer", await _read(runner, command_id), "no answer to the cancel in time", via=via
        )
    except nats.errors.Error as exc:
        return CancelOutcome(
            "unreachable", await _read(runner, command_id), f"NATS unavailable: {type(exc).__name__}", via=via
        )
    if data is None:
        return CancelOutcome(
            "unreachable", await _read(runner, command_id), "the host is no longer in the inventory", via=via
        )
    try:
        answer = decode_cancel_reply(data)
    except ProtocolError as exc:
        return CancelOutcome(
            "failed", await _read(runner, command_id), f"bad reply: {exc}", ErrorCode.INTERNAL, via
        )
    if not isinstance(answer, CancelAnswer):
        log.warning("cancel of %s on %s: %s: %s", command_id, run.host_id, answer.code, answer.description)
        current = await _read(runner, command_id)
        return CancelOutcome("failed", current, answer.description, str(answer.code), via)
    log.info("cancel of %s on %s via %s: %s", command_id, run.host_id, via, answer.state)
    if answer.state == "accepted":
        settled = await _settled(runner, command_id, wait)
        if via is Via.SSH:
            settled = await _killed_by_us(runner, settled)
        if settled.status == CommandStatus.CANCELLED:
            return CancelOutcome("cancelled", settled, "the command was killed", via=via)
        if settled.status in OPEN:
            return CancelOutcome("cancelling", settled, "the host is killing the command", via=via)
        return CancelOutcome("finished", settled, "the command ended before it was killed", via=via)
    if answer.state == "never_ran":
        return await _never_ran(runner, command_id, answer.description)
    if answer.state == "finished":
        settled = await _settled(runner, command_id, FINISHED_WAIT_S)
        return CancelOutcome("finished", settled, "the command already ended; its result stands", via=via)
    return CancelOutcome(
        "not_running",
        await _read(runner, command_id),
        answer.description or "not running on the host",
        via=via,
    )


async def _killed_by_us(runner: Runner, run: CommandRun) -> CommandRun:
    """A run over SSH we had a cancel accepted for, that ended ``failed`` by SIGKILL (another worker of
    the queue group ran it, so its result does not say cancelled): record it ``cancelled``. A run this
    instance delivers is recorded ``cancelled`` by its runner already (`Runner.ssh_cancels`); this covers
    a run delivered by another API instance, whose exec caller was answered ``failed``."""
    if run.status != CommandStatus.FAILED or run.signal != int(signal.SIGKILL) or run.via != Via.SSH:
        return run
    values = {
        "status": CommandStatus.CANCELLED,
        "error_description": "cancelled; the process group was killed",
    }
    async with runner.sessions() as session:
        changed = await crud.update_run(session, run.command_id, values, when=(CommandStatus.FAILED,))
    current = await _read(runner, run.command_id)
    if changed:
        await announce_run(runner.nc, current)  # failed → cancelled, to the browsers (fleet.browser)
    return current


async def _never_ran(runner: Runner, command_id: str, description: str) -> CancelOutcome:
    """The agent never got the command and now refuses its id: the run, still pending and not routed over
    SSH, is recorded ``cancelled`` (nothing ran); the exec, if it still arrives, is refused as a replay."""
    values = {
        "status": CommandStatus.CANCELLED,
        "error_description": "cancelled before it reached the agent; it never ran",
        "finished_at": utcnow(),
    }
    async with runner.sessions() as session:
        changed = await crud.update_run(
            session, command_id, values, when=(CommandStatus.PENDING,), unrouted=True
        )
    run = await _read(runner, command_id)
    if changed:
        await announce_run(runner.nc, run)  # to the browsers of every instance (fleet.browser)
        why = "it never ran: cancelled before it reached the agent"
        return CancelOutcome("cancelled", run, why, via=Via.AGENT)
    if run.status in OPEN:  # routed over SSH meanwhile
        return CancelOutcome(
            "not_running", run, description or "not on the agent; routed over SSH", via=Via.AGENT
        )
    return CancelOutcome("finished", run, "the command ended meanwhile; its result stands", via=Via.AGENT)


JOB_CANCEL_CONCURRENCY = 64  # cancels of one job's runs in flight at once


def cancel_many(runner: Runner) -> Callable[[Sequence[str]], Awaitable[None]]:
    """What a job cancel calls for its runs in flight (`JobRunner.cancel_in_flight`): `cancel_run` each,
    at most `JOB_CANCEL_CONCURRENCY` at once, without waiting for the hosts' results (they settle the rows
    as they come); a run that fails to cancel is logged, never re-sent."""

    async def cancel(command_ids: Sequence[str]) -> None:
        gate = asyncio.Semaphore(JOB_CANCEL_CONCURRENCY)

        async def one(command_id: str) -> None:
            async with gate:
                try:
                    outcome = await cancel_run(runner, command_id, wait=0)
                except Exception as exc:  # one run's failure must not stop the others
                    log.warning("cancel of %s failed: %s: %s", command_id, type(exc).__name__, exc)
                    return
                log.info("cancel of %s: %s", command_id, outcome.state)

        await asyncio.gather(*(one(c) for c in command_ids))

    return cancel
