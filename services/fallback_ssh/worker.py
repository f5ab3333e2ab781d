"""The NATS side of the SSH fallback worker: subscriptions, signature checks, replies, shutdown.

Subscriptions (queue group ``warlock-ssh``): ``warlock.ssh.*.exec``, ``warlock.ssh.probe``, the agent
operations ``warlock.ssh.*.install`` / ``.uninstall`` / ``.configure`` (see `installer`) and
``warlock.ssh.*.cancel`` (kill a command's remote processes: `runner.kill_remote`; the result of a command
this worker runs then says ``cancelled``). nats-py
runs a subscription's callbacks one at a time, so a callback only starts a tracked task; the task runs
the SSH work and replies. Every request is checked by `trust.Verifier` (the API's signature, the host,
replays) before anything is dialed; the SSH target comes only from the signed request. Every outcome
is a protocol model: an `ExecResult` / `SshProbeOk` / `AgentOpResult`, or an `ErrorReply` with the
micro error headers; never a traceback, never silence.

The worker also registers the NATS micro service ``warlock-fallback-ssh`` with a ``status`` endpoint
on ``warlock.ssh.<worker_id>.status`` so ``nats micro ls`` lists it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal

import asyncssh
import nats.errors
import nats.micro
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.request import Request
from nats.micro.service import Service

from services.fallback_ssh import __version__, metrics
from services.fallback_ssh.agent_ops import OP_MODELS, plan
from services.fallback_ssh.errors import SshError
from services.fallback_ssh.execution import KILL, fit_result
from services.fallback_ssh.installer import run_agent_op
from services.fallback_ssh.pool import NotStarted, Pool
from services.fallback_ssh.probe import probe
from services.fallback_ssh.runner import kill_remote, run_command
from services.fallback_ssh.settings import FallbackSettings
from services.fallback_ssh.trust import Verifier
from shared import signing, subjects
from shared.errors import ErrorCode, InvalidIdError, ProtocolError
from shared.metrics import count_error
from shared.natsx import error, reply
from shared.protocol import (
    CancelAnswer,
    ErrorReply,
    ExecResult,
    Message,
    OutputChunk,
    SshCancelRequest,
    SshExecRequest,
    SshProbeRequest,
    decode_model,
    encode,
)
from shared.signing import CommandRefused
from shared.stream import OutputStreamer

log = logging.getLogger("services.fallback_ssh")

SERVICE_NAME = "warlock-fallback-ssh"
CANCEL_RETRIES = 5  # a command this worker runs whose processes a cancel did not find: look again ...
CANCEL_RETRY_S = 0.2  # ... this often (its channel may be opening; one still queued is stopped by `abort`)


class WorkerStatus(Message):
    """Answer of the micro ``status`` endpoint: who this worker is and how its pool is doing."""

    type: Literal["ssh_worker_status"] = "ssh_worker_status"
    worker_id: str
    version: str
    connections: int
    in_flight: int
    dials: int
    reuses: int
    max_channels_per_host: int


class Worker:
    """Answers SSH exec and probe requests from NATS, using one connection pool."""

    def __init__(self, nc: NATS, settings: FallbackSettings, client_key: asyncssh.SSHKey) -> None:
        self.nc = nc
        self.settings = settings
        self.client_key = client_key
        self.pool = Pool(client_key, settings)
        self.verifier = Verifier(settings.trusted_keys, settings.max_command_ttl, settings.replay_capacity)
        self._subs: list[Subscription] = []
        self._service: Service | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: set[str] = set()  # command ids this worker is running
        self._cancelled: set[str] = set()  # of those, the ones a cancel killed
        self.metrics: metrics.MetricsServer | None = None  # WARLOCK_SSH_METRICS_PORT
        metrics.watch_worker(self)  # warlock_ssh_in_flight

    async def start(self) -> None:
        """Subscribe and register the micro service (and serve /metrics if a port is set)."""
        self.pool.start()
        if self.settings.metrics_port is not None and self.metrics is None:
            self.metrics = metrics.MetricsServer(self.settings.metrics_host, self.settings.metrics_port)
            if not self.metrics.start():
                self.metrics = None
        self._subs = [
            await self.nc.subscribe(subjects.ssh_exec_wildcard(), queue=subjects.SSH_QUEUE, cb=self._on_exec),
            await self.nc.subscribe(subjects.SSH_PROBE, queue=subjects.SSH_QUEUE, cb=self._on_probe),
        ]
        self._subs.append(
            await self.nc.subscribe(
                subjects.ssh_cancel_wildcard(), queue=subjects.SSH_QUEUE, cb=self._on_cancel
            )
        )
        for op in subjects.SSH_AGENT_OPS:
            self._subs.append(
                await self.nc.subscribe(
                    subjects.ssh_agent_op_wildcard(op), queue=subjects.SSH_QUEUE, cb=self._on_agent_op
                )
            )
        self._service = await nats.micro.add_service(
            self.nc,
            name=SERVICE_NAME,
            version=__version__,
            description=(
                "Warlock SSH fallback worker: warlock.ssh.<host>.exec|install|uninstall|configure "
                "and warlock.ssh.probe"
            ),
            metadata={"worker_id": self.settings.worker_id},
        )
        status = subjects.ssh_worker_status(self.settings.worker_id)
        await self._service.add_endpoint(name="status", subject=status, handler=self._on_status)

    @property
    def in_flight(self) -> int:
        """Requests being handled right now."""
        return len(self._tasks)

    # ------------------------------------------------------------------------- callbacks

    async def _on_exec(self, msg: Msg) -> None:
        """Start handling an exec request in its own task."""
        self._spawn(self._answer(msg, self._exec(msg)), f"ssh-exec-{msg.subject}")

    async def _on_probe(self, msg: Msg) -> None:
        """Start handling a probe request in its own task."""
        self._spawn(self._answer(msg, self._probe(msg)), "ssh-probe")

    async def _on_agent_op(self, msg: Msg) -> None:
        """Start handling an agent install / uninstall / configure request in its own task."""
        self._spawn(self._answer(msg, self._agent_op(msg)), f"ssh-agent-op-{msg.subject}")

    async def _on_cancel(self, msg: Msg) -> None:
        """Start handling a cancel request in its own task."""
        self._spawn(self._answer(msg, self._cancel(msg)), f"ssh-cancel-{msg.subject}")

    async def _on_status(self, request: Request) -> None:
        """Answer the micro status endpoint at once."""
        stats = self.pool.stats()
        status = WorkerStatus(
            worker_id=self.settings.worker_id,
            version=__version__,
            connections=stats.connections,
            in_flight=stats.in_flight,
            dials=stats.dials,
            reuses=stats.reuses,
            max_channels_per_host=self.settings.max_channels_per_host,
        )
        await request.respond(encode(status))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run `coro` in a task the worker tracks until it ends."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg, work: Coroutine[Any, Any, Message]) -> None:
        """Await `work` and reply with its message; any failure becomes a typed error reply."""
        try:
            answer = await work
        except asyncio.CancelledError:
            await self._reply(
                msg, error(ErrorCode.DISCONNECTED, "the SSH worker stopped with the request in flight")
            )
            raise
        except Exception:
            log.exception("unexpected failure handling %s", msg.subject)
            answer = error(ErrorCode.INTERNAL, "internal error in the SSH worker")
        await self._reply(msg, answer)

    async def _reply(self, msg: Msg, answer: Message) -> None:
        """Send `answer`, shortened to fit the server's max payload; a NATS failure is logged."""
        if isinstance(answer, ErrorReply):
            count_error(answer.code)  # warlock_errors_total{code}
        if isinstance(answer, ExecResult):
            answer = fit_result(answer, self.nc.max_payload)
        try:
            await reply(self.nc, msg, answer)
        except (nats.errors.Error, OSError) as exc:
            log.warning("could not reply on %s: %s", msg.subject, exc)

    # ------------------------------------------------------------------------- handlers

    def _refused(self, what: str, host: str, exc: CommandRefused, command_id: str | None = None) -> Message:
        """The typed error for a request that did not verify (nothing was dialed)."""
        log.info("%s for %s refused: %s: %s", what, host, exc.code, exc.description)
        return error(exc.code, exc.description, command_id)

    async def _exec(self, msg: Msg) -> Message:
        """`_run_exec`, observed in ``warlock_ssh_exec_total{outcome}`` and ``warlock_ssh_exec_seconds``."""
        t0 = time.monotonic()
        answer = await self._run_exec(msg)
        if isinstance(answer, ExecResult):
            if answer.cancelled:
                outcome = "cancelled"
            elif answer.timed_out:
                outcome = "timed_out"
            else:
                outcome = "ok" if answer.exit_code == 0 else "failed"
        else:
            outcome = "error"
        metrics.observe_exec(outcome, time.monotonic() - t0)
        return answer

    async def _run_exec(self, msg: Msg) -> Message:
        """Decode an exec request, verify its signature and run it over SSH on its signed target."""
        try:
            host = subjects.parse_ssh_exec(msg.subject)
            request = decode_model(SshExecRequest, msg.data)
        except (InvalidIdError, ProtocolError) as exc:
            return error(ErrorCode.BAD_REQUEST, str(exc))
        try:
            self.verifier.check("ssh_exec", request, host, request.command_id)
        except CommandRefused as exc:
            return self._refused("ssh exec", host, exc, request.command_id)
        if request.command_id is None or request.target is None:
            return error(
                ErrorCode.BAD_REQUEST,
                "a signed SSH exec carries its command_id and target (the worker looks up nothing)",
                request.command_id,
            )
        command_id = request.command_id
        self._running.add(command_id)
        chunks = OutputStreamer(command_id, self._chunk_sender(host, command_id)).start()
        try:
            result = await run_command(
                self.pool,
                request.target,
                command_id,
                request.command,
                request.timeout,
                self.settings.max_output_bytes,
                self.settings.exec_grace,
                lambda: command_id in self._cancelled,
                chunks,
            )
        except NotStarted:
            log.info(
                "command %s on %s: cancelled while it waited for a channel; nothing ran", command_id, host
            )
            return ExecResult(
                command_id=command_id, exit_code=None, duration_ms=0.0, via="ssh", cancelled=True
            )
        except SshError as exc:
            log.info("command %s on %s: %s: %s", command_id, host, exc.code, exc.description)
            return error(exc.code, exc.description, command_id)
        except Exception:
            # Unexpected: the command may have started, so answer a code that forbids a re-run.
            log.exception("command %s on %s: unexpected failure", command_id, host)
            return error(
                ErrorCode.UNKNOWN_RESULT,
                "internal error in the SSH worker; the command may have run",
                command_id,
            )
        finally:
            await chunks.abort()  # a no-op once `run_command` closed it
            self._running.discard(command_id)
            cancelled = command_id in self._cancelled
            self._cancelled.discard(command_id)
        if cancelled and result.signal == KILL:  # killed by the cancel (not ended on its own just before)
            result = result.model_copy(update={"cancelled": True, "timed_out": False})
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "command %s on %s: exit %s in %.1f ms", command_id, host, result.exit_code, result.duration_ms
            )
        return result

    async def _cancel(self, msg: Msg) -> Message:
        """Verify a cancel (kind ``ssh_cancel``: command id and target) and kill the command's processes on
        the signed target. ``accepted`` when this worker runs it (its result then says cancelled) or
        processes were found and killed; else ``not_running``. Idempotent: no replay memory."""
        try:
            host = subjects.parse_ssh_cancel(msg.subject)
            request = decode_model(SshCancelRequest, msg.data)
        except (InvalidIdError, ProtocolError) as exc:
            return error(ErrorCode.BAD_REQUEST, str(exc))
        command_id = request.command_id
        verifier = self.verifier
        try:
            signing.verify_command(
                "ssh_cancel",
                signing.signed_fields(request),
                request.signature,
                verifier.trusted,
                host,
                verifier.max_ttl,
                now=verifier.clock(),
            )
        except CommandRefused as exc:
            return self._refused("ssh cancel", host, exc, command_id)
        running_here = command_id in self._running
        if running_here:
            self._cancelled.add(command_id)
        try:
            killed = await kill_remote(self.pool, request.target, command_id)
            for _ in range(CANCEL_RETRIES):  # running here but not found: its channel may be opening now
                if killed or command_id not in self._running:
                    break
                await asyncio.sleep(CANCEL_RETRY_S)
                killed = await kill_remote(self.pool, request.target, command_id)
        except SshError as exc:
            self._cancelled.discard(command_id)
            log.info("cancel of %s on %s: %s: %s", command_id, host, exc.code, exc.description)
            return error(exc.code, exc.description, command_id)
        log.info("cancel of %s on %s: %d process(es) killed", command_id, host, killed)
        if running_here or killed:
            return CancelAnswer(
                command_id=command_id, state="accepted", description=f"{killed} process(es) killed"
            )
        return CancelAnswer(
            command_id=command_id, state="not_running", description="no process of it on the host"
        )

    def _chunk_sender(self, host: str, command_id: str) -> Callable[[OutputChunk], Awaitable[bool]]:
        """Publishes a command's output chunks on ``warlock.output.<host>.<command_id>`` (not authoritative:
        the API records the final result; a chunk NATS cannot take now is dropped)."""
        subject = subjects.output(host, command_id)

        async def send(chunk: OutputChunk) -> bool:
            try:
                await self.nc.publish(subject, encode(chunk))
            except (nats.errors.Error, OSError) as exc:
                log.debug("output chunk of %s not published: %s", command_id, exc)
                return False
            return True

        return send

    async def _probe(self, msg: Msg) -> Message:
        """Decode a probe request and probe the host."""
        try:
            request = decode_model(SshProbeRequest, msg.data)
        except ProtocolError as exc:
            return error(ErrorCode.BAD_REQUEST, str(exc))
        try:
            self.verifier.check("probe", request, request.host_id)
        except CommandRefused as exc:
            return self._refused("probe", request.host_id, exc)
        try:
            return await probe(request, self.client_key, self.settings)
        except SshError as exc:
            log.info("probe of %s:%s: %s: %s", request.address, request.port, exc.code, exc.description)
            return error(exc.code, exc.description)

    async def _agent_op(self, msg: Msg) -> Message:
        """Decode an agent operation, verify it (signature, host, wheel digest), carry it out over SSH."""
        try:
            host, op = subjects.parse_ssh_agent_op(msg.subject)
            request = decode_model(OP_MODELS[op], msg.data)
        except (InvalidIdError, ProtocolError) as exc:
            return error(ErrorCode.BAD_REQUEST, str(exc))
        try:
            self.verifier.check(op, request, host, request.command_id)
        except CommandRefused as exc:
            return self._refused(f"agent {op}", host, exc, request.command_id)
        named = getattr(request, "host_id", host)
        if named != host:  # not covered by the signature itself: it must be the host the signature names
            return error(
                ErrorCode.WRONG_HOST, f"{op} names host {named} on the subject of {host}; nothing was sent"
            )
        try:
            op_plan = plan(request)
            log.info("%s of the agent on %s (prefix %s) starting", op, host, request.prefix)
            result = await run_agent_op(self.pool, request.target, op_plan, self.settings.agent_op_timeout)
        except SshError as exc:
            log.info("%s of the agent on %s: %s: %s", op, host, exc.code, exc.description)
            return error(exc.code, exc.description)
        log.info(
            "%s of the agent on %s: %s (systemd %s, %d steps)",
            op,
            host,
            result.state,
            "yes" if result.systemd else "no",
            len(result.steps),
        )
        return result

    # ------------------------------------------------------------------------- shutdown

    async def stop(self) -> None:
        """Stop taking requests, let in-flight ones finish up to `drain_timeout`, close the pool."""
        for sub in self._subs:
            try:
                await sub.drain()  # type: ignore[no-untyped-call]
            except nats.errors.Error as exc:
                log.warning("could not drain %s: %s", sub.subject, exc)
        self._subs = []
        if self._tasks:
            log.info(
                "waiting up to %.0fs for %d request(s) in flight",
                self.settings.drain_timeout,
                len(self._tasks),
            )
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.settings.drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("cancelled %d request(s) still running after the drain timeout", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        if self._service is not None:
            await self._service.stop()
            self._service = None
        await self.pool.close()
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
