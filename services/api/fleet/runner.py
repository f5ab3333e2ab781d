"""The hybrid runner: record the command, ask the agent, fall back to SSH only on *no responders*.

Decisions are plain functions of what NATS answered (`outcome_of_reply`, `timed_out`, `undeliverable`),
so the rules are tested without I/O; `Runner` only writes rows, sends requests and awaits.

    agent request ── ExecResult ─────────────▶ succeeded / failed / timed_out   (via agent)
                  ├─ ExecResult not signed by the host's agent key ─▶ timed_out + bad_signature
                  ├─ ErrorReply nothing-ran ─▶ failed + code                    (no fallback)
                  ├─ ErrorReply may-have-run ▶ timed_out + code                 (no fallback)
                  ├─ NATS timeout ───────────▶ timed_out                        (never re-sent)
                  ├─ its gateway went silent ▶ timed_out + disconnected         (never re-sent)
                  └─ no responders ──▶ SSH request, same command id ─▶ same rules (via ssh)
                                                 └─ no responders ──▶ undeliverable

Every request leaves signed by the API (`ApiSigner`): kind ``exec`` on the agent subject, ``ssh_exec`` on
the SSH subject with the target (address, port, user, pinned key) inside the signed fields. An agent's
result counts only if it verifies with the host's agent key (`services.api.fleet.verify`); the SSH
worker's are authenticated by NATS itself: only the ssh-worker identity may subscribe to ``warlock.ssh.>``
(`shared.permissions`), so nobody else receives the request it answers.

An agent request to a host recorded connected through a gateway is registered in `InFlight` under that
gateway: if `GatewayWatch` finds the gateway silent (SIGKILLed: nobody will answer), the caller stops waiting
and the row says ``timed_out`` / ``disconnected`` (it may have run; never re-sent). The request keeps
listening in the background until its own timeout: a reply that still comes (the agent had reconnected
elsewhere) settles the row like a late result, as does the result the agent's outbox re-sends on
``warlock.result.<host>`` after it reconnects.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, ParamSpec, Protocol

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from sqlalchemy import func
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.errors import DatabaseUnavailable, DomainError, NotFound
from services.api.fleet.browser import announce_run
from services.api.fleet.inflight import Gone, InFlight
from services.api.fleet.signer import ApiSigner
from services.api.fleet.tasks import TaskTracker
from services.api.fleet.verify import Rejections, result_problem
from services.api.http.schemas import CommandRunPublic, ExecBody
from services.api.settings import ApiSettings
from services.api.store import crud
from services.api.store.models import CommandRun, CommandStatus, Host, Via, utcnow
from services.api.store.runstore import HostTarget, NewRun, RunStore
from shared import signing, subjects
from shared.errors import MAY_HAVE_RUN, ErrorCode, ProtocolError
from shared.ids import CommandId, new_command_id
from shared.metrics import observe_exec
from shared.protocol import (
    ErrorReply,
    ExecRequest,
    ExecResult,
    SshExecRequest,
    SshTarget,
    decode_exec_reply,
    encode,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")

OPEN = (CommandStatus.PENDING, CommandStatus.RUNNING)


class Requester(Protocol):
    """Sends a NATS request and returns its reply, as `NATS.request` (raising the same errors)."""

    def __call__(self, subject: str, payload: bytes, *, timeout: float) -> Awaitable[Msg]: ...


@dataclass(frozen=True)
class Outcome:
    """What to record about a command once its request has ended."""

    status: CommandStatus
    via: Via | None
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False
    error_code: str | None = None
    error_description: str | None = None
    duration_ms: float | None = None
    is_result: bool = False  # a result (the host answered), not a typed error; not a column

    def values(self) -> dict[str, Any]:
        """The CommandRun columns this outcome sets (by hand: `dataclasses.asdict` deep-copies)."""
        return {f: getattr(self, f) for f in _OUTCOME_FIELDS}


_OUTCOME_FIELDS = tuple(f.name for f in fields(Outcome) if f.name != "is_result")


def cap(text: str, max_chars: int) -> tuple[str, bool]:
    """`text` cut to `max_chars`, and whether it was cut."""
    return (text, False) if len(text) <= max_chars else (text[:max_chars], True)


def outcome_of_result(result: ExecResult, via: Via, max_chars: int) -> Outcome:
    """A result: succeeded on exit 0, timed_out if the timeout killed it, else failed."""
    stdout, cut_out = cap(result.stdout, max_chars)
    stderr, cut_err = cap(result.stderr, max_chars)
    if result.cancelled:
        status, code, text = CommandStatus.CANCELLED, None, "cancelled; the process group was killed"
    elif result.timed_out:
        status, code, text = CommandStatus.TIMED_OUT, ErrorCode.TIMEOUT, "timed out; the process was killed"
    elif result.exit_code == 0:
        status, code, text = CommandStatus.SUCCEEDED, None, None
    else:
        status, code, text = CommandStatus.FAILED, None, None
    return Outcome(
        status=status,
        via=via,
        exit_code=result.exit_code,
        signal=result.signal,
        stdout=stdout,
        stderr=stderr,
        truncated=result.truncated or cut_out or cut_err,
        error_code=code,
        error_description=text,
        duration_ms=result.duration_ms,
        is_result=True,
    )


def outcome_of_error(reply: ErrorReply, via: Via) -> Outcome:
    """A typed error: timed_out when the command may have run, else failed (nothing ran)."""
    status = CommandStatus.TIMED_OUT if reply.code in MAY_HAVE_RUN else CommandStatus.FAILED
    return Outcome(status=status, via=via, error_code=str(reply.code), error_description=reply.description)


def outcome_of_reply(data: bytes, via: Via, max_chars: int) -> Outcome:
    """Decode an exec reply into an outcome; an undecodable reply is an internal failure."""
    try:
        reply = decode_exec_reply(data)
    except ProtocolError as exc:
        return Outcome(
            CommandStatus.FAILED, via, error_code=ErrorCode.INTERNAL, error_description=f"bad reply: {exc}"
        )
    if isinstance(reply, ExecResult):
        return outcome_of_result(reply, via, max_chars)
    return outcome_of_error(reply, via)


def unverified(problem: str) -> Outcome:
    """An agent reply that claims to be a result but is not the agent's: the outcome stays unknown."""
    text = f"{problem}; the command may have run: its outcome is unknown and it is not re-sent"
    code = ErrorCode.BAD_SIGNATURE
    return Outcome(CommandStatus.TIMED_OUT, Via.AGENT, error_code=code, error_description=text)


def agent_result_problem(
    reply: ExecResult, host_id: str, command_id: str, public_key: str | None
) -> str | None:
    """None when `reply` is the result of `command_id` signed by `host_id`'s agent key; else why not."""
    if reply.command_id != command_id:
        return f"the reply is the result of another command ({reply.command_id})"
    return result_problem(public_key, host_id, reply)


def timed_out(via: Via, waited: float) -> Outcome:
    """No reply in time: a responder existed, so the command may have run; it is never re-sent."""
    text = f"no reply within {waited:g}s; the command may have run and is not re-sent"
    return Outcome(CommandStatus.TIMED_OUT, via, error_code=ErrorCode.TIMEOUT, error_description=text)


def session_gone(gone: Gone) -> Outcome:
    """The gateway that carried the request is gone: the command may have run; it is never re-sent."""
    text = (
        f"{gone.reason}: the agent's session that received the command is gone; the command may have run "
        "and is not re-sent (a late result from the agent still settles it)"
    )
    return Outcome(
        CommandStatus.TIMED_OUT, Via.AGENT, error_code=ErrorCode.DISCONNECTED, error_description=text
    )


class SettledElsewhere(Exception):
    """Raised by `Runner._agent_request` when a late result settled the run before the reply came."""


class SessionGone(Exception):
    """Raised by `Runner._agent_request` when the request's gateway was found gone before an answer."""

    def __init__(self, gone: Gone) -> None:
        super().__init__(gone.reason)
        self.gone = gone


def undeliverable(description: str) -> Outcome:
    """Nobody could take the command: nothing ran."""
    return Outcome(
        CommandStatus.UNDELIVERABLE, None, error_code=ErrorCode.UNAVAILABLE, error_description=description
    )


def killed_by_cancel(values: dict[str, Any]) -> dict[str, Any]:
    """The outcome `values` of a run whose cancel was sent to an SSH worker: ``cancelled`` when it ended
    by SIGKILL over SSH (another worker of the queue group took the cancel and killed it, so the running
    worker's result says ``failed``); nothing to change otherwise."""
    killed = values.get("status") == CommandStatus.FAILED and values.get("signal") == int(signal.SIGKILL)
    if killed and values.get("via") == Via.SSH:
        return {
            "status": CommandStatus.CANCELLED,
            "error_description": "cancelled; the process group was killed",
        }
    return {}


def ssh_target(host: Host | HostTarget) -> SshTarget:
    """The SSH target of a host, with its pinned key (None: the worker refuses the host)."""
    return SshTarget(address=host.address, port=host.ssh_port, username=host.ssh_user, host_key=host.host_key)


def observed(
    send: Callable[P, Coroutine[Any, Any, Outcome]],
) -> Callable[P, Coroutine[Any, Any, Outcome]]:
    """`send`, observed: ``warlock_exec_total{via,status}``, ``warlock_exec_seconds{via}`` and the
    outcome's error code in ``warlock_errors_total`` (`shared.metrics`)."""

    @functools.wraps(send)
    async def timed(*args: P.args, **kwargs: P.kwargs) -> Outcome:
        t0 = time.monotonic()
        outcome = await send(*args, **kwargs)
        observe_exec(outcome.via, outcome.status, time.monotonic() - t0, outcome.error_code)
        return outcome

    return timed


class Runner:
    """Runs commands for the REST API; one per app.

    The two writes of every command go through `store` (plain SQL, see services.api.store.runstore); the
    rare read after a lost race with a late result goes through the ORM sessions.
    """

    def __init__(
        self,
        nc: NATS,
        store: RunStore,
        sessions: async_sessionmaker[AsyncSession],
        settings: ApiSettings,
        tasks: TaskTracker,
        signer: ApiSigner,
        rejections: Rejections | None = None,
        inflight: InFlight | None = None,
    ) -> None:
        self.nc = nc
        self.store = store
        self.sessions = sessions
        self.settings = settings
        self.tasks = tasks
        self.signer = signer
        self.rejections = rejections or Rejections()
        self.inflight = inflight
        self._listeners: set[asyncio.Task[None]] = set()  # requests given up on, still listening
        self.delivering: set[str] = set()  # command ids this instance is delivering (the reconciler skips)
        # runs delivered here whose cancel was sent to an SSH worker: a SIGKILL they end with is that cancel
        self.ssh_cancels: set[str] = set()
        # requests waiting for their agent's reply, by command id: a late result recorded meanwhile (the
        # gateway moved to another NATS node and could not reply) wakes the caller (`settled_elsewhere`)
        self._waiting: dict[str, asyncio.Future[Gone | None]] = {}

    def settled_elsewhere(self, command_id: str) -> None:
        """A late result settled `command_id` on this instance: its caller, if still waiting on the
        request, stops waiting and answers with the recorded row instead of waiting out the timeout."""
        waiter = self._waiting.get(command_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run(self, ref: str, body: ExecBody, requested_by: str | None) -> CommandRunPublic:
        """Record the command as pending (committed) for the host `ref` names, deliver it, record and
        return the outcome.

        An unknown host is NotFound; a database error before the commit is DatabaseUnavailable (503):
        either way nothing is sent. Delivery runs in a tracked task shielded from the request, so a client
        that goes away does not leave the row pending.
        """
        run = NewRun(new_command_id(), body.command, body.timeout, requested_by, utcnow())
        host = await self.store.start(ref, run)
        if host is None:
            raise NotFound(f"unknown host {ref[:100]!r}")
        task = self.tasks.spawn(self._deliver(run, host), name=f"exec-{run.command_id}")
        return (await asyncio.shield(task))[0]

    async def run_async(self, ref: str, body: ExecBody, requested_by: str | None) -> str:
        """As `run`, but return the command id once the pending row is committed: delivery goes on in a
        tracked task and records the outcome (``GET /api/commands/{id}``). NotFound and
        DatabaseUnavailable as `run` (nothing sent)."""
        run = NewRun(new_command_id(), body.command, body.timeout, requested_by, utcnow())
        host = await self.store.start(ref, run)
        if host is None:
            raise NotFound(f"unknown host {ref[:100]!r}")
        self.tasks.spawn(self._deliver(run, host), name=f"exec-{run.command_id}")
        return run.command_id

    async def deliver(self, run: NewRun, host: HostTarget) -> tuple[CommandRunPublic, Outcome]:
        """Deliver a run already recorded as pending, in a tracked task shielded from the caller; return
        what was recorded and the outcome itself (the operator exec path answers with the latter)."""
        task = self.tasks.spawn(self._deliver(run, host), name=f"exec-{run.command_id}")
        return await asyncio.shield(task)

    async def _deliver(self, run: NewRun, host: HostTarget) -> tuple[CommandRunPublic, Outcome]:
        started = utcnow()
        t0 = time.monotonic()
        command_id = CommandId(run.command_id)
        self.delivering.add(run.command_id)
        try:
            outcome = await self.send(
                host.id,
                command_id,
                run.command,
                run.timeout,
                ssh_target(host),
                host.public_key,
                gateway_id=host.gateway_id,
                issued_at=run.created_at.timestamp(),
                before_ssh=lambda: self.store.route_ssh(run.command_id),
            )
        finally:
            self.delivering.discard(run.command_id)
        wall_ms = (time.monotonic() - t0) * 1000
        values = outcome.values()
        if run.command_id in self.ssh_cancels:
            self.ssh_cancels.discard(run.command_id)
            values.update(killed_by_cancel(values))
        values.update(started_at=started, finished_at=utcnow())
        if values["duration_ms"] is None:
            values["duration_ms"] = round(wall_ms, 3)
        return await self._record(run, host.id, values), outcome

    async def _recorded_outcome(self, command_id: str, wait: float) -> Outcome:
        """The outcome a late result recorded for `command_id` (timed out if it cannot be read)."""
        try:
            async with self.sessions() as session:
                run = await crud.get_run(session, command_id)
        except (DomainError, SQLAlchemyError, OSError) as exc:
            log.warning("command %s: its late result could not be read: %s", command_id, type(exc).__name__)
            return timed_out(Via.AGENT, wait)
        return Outcome(**{f: getattr(run, f) for f in _OUTCOME_FIELDS}, is_result=True)

    async def _record(self, run: NewRun, host_id: str, values: dict[str, Any]) -> CommandRunPublic:
        data = {  # what was just written: no second read
            "command_id": run.command_id,
            "host_id": host_id,
            "command": run.command,
            "timeout": run.timeout,
            "requested_by": run.requested_by,
            "created_at": run.created_at,
            **values,
        }
        try:
            if await self.store.finish(run.command_id, values):
                return CommandRunPublic.model_validate(data)
            log.info("command %s was settled by a late result first", run.command_id)
            async with self.sessions() as session:
                return CommandRunPublic.model_validate(await crud.get_run(session, run.command_id))
        except (DatabaseUnavailable, SQLAlchemyError, OSError) as exc:
            log.error("command %s: outcome not recorded (row stays pending): %s", run.command_id, exc)
            return CommandRunPublic.model_validate(data)

    @observed
    async def send(
        self,
        host_id: str,
        command_id: CommandId,
        command: str,
        command_timeout: float,
        target: SshTarget,
        public_key: str | None,
        gateway_id: str | None = None,
        issued_at: float | None = None,
        before_ssh: Callable[[], Awaitable[bool]] | None = None,
        requester: Requester | None = None,
    ) -> Outcome:
        """Deliver one command, signed: agent subject first, the SSH subject only if the agent had no
        responders. An agent result counts only if it verifies with `public_key` (the host's agent key).

        `gateway_id`: the gateway the host's agent was recorded connected through (None: not connected);
        if it is found silent before the agent answers, the caller stops waiting (`session_gone`).
        `issued_at`: the exec's signed issued-at (the run's created_at: its not-after is then created_at +
        command_ttl, which the reconciler's result query names). `before_ssh`: records the SSH route before
        the SSH request leaves (False or a database error: nothing is sent). `requester`: what sends the
        agent request (as `NATS.request`, raising its errors; default the connection's own): jobs pass
        one reply subscription for all their requests (`services.api.fleet.jobs.ReplyMux`). Observed
        (`observed`): every outcome is counted in the Prometheus metrics."""
        wait = command_timeout + self.settings.exec_grace
        max_chars = self.settings.max_output_chars
        request = ExecRequest(command=command, timeout=command_timeout, command_id=command_id)
        signed = signing.signed_fields(request)
        signature = signing.sign_command(
            self.signer.key, "exec", signed, host_id, self.signer.ttl, now=issued_at
        )
        request = request.model_copy(update={"signature": signature})
        try:
            msg = await self._agent_request(
                host_id, command_id, encode(request), wait, public_key, gateway_id, requester
            )
        except SessionGone as exc:
            log.warning("command %s on %s: %s; caller answered, not re-sent", command_id, host_id, exc)
            return session_gone(exc.gone)
        except SettledElsewhere:
            return await self._recorded_outcome(command_id, wait)
        except nats.errors.NoRespondersError:
            log.debug("command %s: no agent session for %s, trying SSH", command_id, host_id)
        except nats.errors.TimeoutError:
            return timed_out(Via.AGENT, wait)
        except nats.errors.Error as exc:
            return undeliverable(f"NATS unavailable: {type(exc).__name__}")
        else:
            return self._agent_outcome(msg.data, host_id, command_id, public_key)
        if before_ssh is not None:
            try:
                routed = await before_ssh()
            except (DatabaseUnavailable, SQLAlchemyError, OSError) as exc:
                log.warning("command %s: SSH route not recorded, nothing sent: %s", command_id, exc)
                return undeliverable(
                    "no agent session, and the SSH route could not be recorded; nothing sent"
                )
            if not routed:
                return undeliverable(
                    "no agent session, and the run was settled meanwhile; nothing sent by SSH"
                )
        ssh_request = SshExecRequest(
            command=command, timeout=command_timeout, command_id=command_id, target=target
        )
        ssh_request = self.signer.sign("ssh_exec", ssh_request, host_id)
        wait = command_timeout + self.settings.ssh_grace
        try:
            msg = await self.nc.request(subjects.ssh_exec(host_id), encode(ssh_request), timeout=wait)
        except nats.errors.NoRespondersError:
            return undeliverable(f"no agent session and no SSH worker for host {host_id}")
        except nats.errors.TimeoutError:
            return timed_out(Via.SSH, wait)
        except nats.errors.Error as exc:
            return undeliverable(f"NATS unavailable: {type(exc).__name__}")
        return outcome_of_reply(msg.data, Via.SSH, max_chars)

    async def _agent_request(
        self,
        host_id: str,
        command_id: str,
        payload: bytes,
        wait: float,
        public_key: str | None,
        gateway_id: str | None,
        requester: Requester | None = None,
    ) -> Msg:
        """The agent's reply to `payload` (NATS errors raised as they come), or SessionGone when the
        request's gateway is found gone first; the request then keeps listening (`_listen_late`)."""
        send = self.nc.request if requester is None else requester
        answer = asyncio.ensure_future(send(subjects.agent_exec(host_id), payload, timeout=wait))
        watching = gateway_id is not None and self.inflight is not None
        # resolves with Gone (the gateway is gone), or None: answered, or settled by a late result
        wake: asyncio.Future[Gone | None] = (
            self.inflight.watch(gateway_id, command_id)  # type: ignore[union-attr, arg-type]
            if watching
            else asyncio.get_running_loop().create_future()
        )
        self._waiting[command_id] = wake

        def answered(_: asyncio.Future[Msg]) -> None:
            if not wake.done():
                wake.set_result(None)

        answer.add_done_callback(answered)  # one future to await: cheaper than asyncio.wait (~10 us)
        try:
            gone = await wake
        except asyncio.CancelledError:
            answer.cancel()
            raise
        finally:
            if self._waiting.get(command_id) is wake:
                del self._waiting[command_id]
            if watching:
                self.inflight.forget(gateway_id, command_id)  # type: ignore[union-attr, arg-type]
        if answer.done():
            return answer.result()
        if gone is None:  # a late result settled it: its row is the outcome
            answer.cancel()
            raise SettledElsewhere()
        listener = asyncio.ensure_future(self._listen_late(answer, host_id, command_id, public_key))
        self._listeners.add(listener)
        listener.add_done_callback(self._listeners.discard)
        raise SessionGone(gone)

    async def _listen_late(
        self, answer: asyncio.Future[Msg], host_id: str, command_id: str, public_key: str | None
    ) -> None:
        """A request given up on still gets its reply: a verified result settles the row (if it is still
        pending or timed out), as a late result on ``warlock.result.<host>`` would; anything else is moot."""
        try:
            msg = await answer
        except nats.errors.Error:
            return  # timed out (the agent's outbox may still re-send the result) or NATS went away
        try:
            reply = decode_exec_reply(msg.data)
        except ProtocolError as exc:
            log.warning("command %s: undecodable reply after it was given up on: %s", command_id, exc)
            return
        if not isinstance(reply, ExecResult):
            log.info("command %s: %s after it was given up on; row kept", command_id, reply.code)
            return
        problem = agent_result_problem(reply, host_id, command_id, public_key)
        if problem is not None:
            self.rejections.reject("result", host_id, problem)
            return
        values = late_result_values(reply, self.settings.max_output_chars, utcnow())
        try:
            async with self.sessions() as session:
                when = (CommandStatus.PENDING, CommandStatus.TIMED_OUT)
                changed = await crud.update_run(session, command_id, values, when=when, host_id=host_id)
                run = await session.get(CommandRun, command_id) if changed else None
        except (DatabaseUnavailable, SQLAlchemyError, OSError) as exc:
            log.error("command %s: late reply not recorded: %s", command_id, exc)
            return
        log.info("late reply for command %s %s", command_id, "recorded" if changed else "ignored")
        await announce_run(self.nc, run)  # to the browsers of every instance (fleet.browser)

    async def stop_listening(self) -> None:
        """Cancel the requests still listening after their callers were answered (at shutdown)."""
        listeners = set(self._listeners)
        for listener in listeners:
            listener.cancel()
        if listeners:
            await asyncio.wait(listeners, timeout=5)

    def _agent_outcome(self, data: bytes, host_id: str, command_id: str, public_key: str | None) -> Outcome:
        """The outcome of an agent reply: a result only if it is the agent's own (else counted, logged
        once per host, and recorded as `unverified`); typed errors as they are."""
        try:
            reply = decode_exec_reply(data)
        except ProtocolError:
            return outcome_of_reply(data, Via.AGENT, self.settings.max_output_chars)  # the same failure
        if isinstance(reply, ErrorReply):
            return outcome_of_error(reply, Via.AGENT)
        problem = agent_result_problem(reply, host_id, command_id, public_key)
        if problem is not None:
            self.rejections.reject("result", host_id, problem)
            return unverified(problem)
        return outcome_of_result(reply, Via.AGENT, self.settings.max_output_chars)


def late_result_values(result: ExecResult, max_chars: int, now: datetime) -> dict[str, Any]:
    """Columns a late result sets on a run that is still pending or timed out (via is kept)."""
    values = outcome_of_result(result, Via.AGENT, max_chars).values()
    values["via"] = func.coalesce(col(CommandRun.via), Via.AGENT.value)  # results come from gateways
    values["finished_at"] = now
    return values
