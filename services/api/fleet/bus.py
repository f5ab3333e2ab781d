"""NATS side of the API: the token authority, host targets, operator exec, presence, metrics, late results.

Nothing here believes a gateway: a presence ``connected`` counts only if the hello it passes through is
signed by the host's agent key, a late result only if the agent signed it (`services.api.fleet.verify`); what
does not verify is counted and logged once per source. ``warlock.ops.<host>.exec`` runs a command an
operator signed with a key in `OperatorKey` (``warlock req``), recorded and delivered like a REST exec.

Every subscription is in a queue group, so each message is handled by exactly one API instance, however
many run. nats-py runs one subscription's callbacks one at a time, so a callback only decodes (logging
and skipping what does not decode) and hands the database work to a tracked task. Presence events are
recorded in batches, in arrival order per host, and never dropped on a database error
(`services.api.fleet.presence`); metrics samples too, into the history, within a memory bound
(`services.api.fleet.metrics_history`). The request/reply endpoints are a NATS micro
service, ``warlock-api``, so ``nats micro ls`` lists them.

Token checks (the gateways' ``warlock.auth.verify``) that arrive together are answered from one query
(`TokenLookup`): a connect storm of 10,000 agents costs tens of queries, not 10,000 sessions with a
round trip each. Nothing is cached: every answer reads the database after the request arrived, so a
revoked or rotated token stops verifying at once on every API instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import nats.errors
from nats import micro
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.request import Request
from nats.micro.service import Service
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api import __version__
from services.api.errors import Conflict, DatabaseUnavailable
from services.api.fleet.browser import announce_run
from services.api.fleet.liveness import GatewayWatch
from services.api.fleet.metrics_history import MetricsRecorder, SqlMetricsStore
from services.api.fleet.presence import PresenceRecorder, SqlPresenceStore
from services.api.fleet.runner import Outcome, Runner, late_result_values
from services.api.fleet.tasks import TaskTracker
from services.api.fleet.verify import Rejections, result_problem
from services.api.store import crud
from services.api.store.models import CommandRun, CommandStatus, utcnow
from services.api.store.runstore import NewRun
from shared import signing, subjects
from shared.errors import ErrorCode, InvalidIdError, ProtocolError
from shared.natsx import error, respond
from shared.protocol import (
    ErrorReply,
    ExecRequest,
    ExecResult,
    Message,
    MetricsEvent,
    TokenOk,
    TokenVerifyRequest,
    decode_model,
    decode_presence,
)
from shared.tokens import fingerprint

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE_NAME = "warlock-api"
DB_ERRORS = (SQLAlchemyError, OSError, TimeoutError, DatabaseUnavailable)
OPS_HOWTO = (
    "commands on warlock.ops.<host>.exec must be signed with an operator key the API authorised: "
    "create one with `warlock signing-keys create NAME`, then send `warlock req warlock.ops.<host>.exec "
    '\'{"command": "uptime"}\' --key FILE` (or set WARLOCK_OPERATOR_KEY); nothing ran'
)


VERIFY_BATCH = 500  # token hashes per query at most (bind parameters: SQLite allows 32,766)
VERIFY_QUERY_TIMEOUT_S = 5.0  # a stuck query fails its checks (`unavailable`) instead of every later one


class TokenLookup:
    """Coalesces concurrent token checks: while one query runs, the hashes asked meanwhile wait for the
    next, which asks for all of them at once (`crud.agents_for_token_hashes`).

    A lone check costs one query, as before, and waits for nothing; under a storm the number of queries
    is what the database can answer one after the other, each covering up to `max_batch` hashes. Every
    answer comes from a query that began after the check arrived: nothing is remembered between queries.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        max_batch: int = VERIFY_BATCH,
        timeout: float = VERIFY_QUERY_TIMEOUT_S,
    ) -> None:
        self.sessions, self._engine = own_connection(sessions)
        self.max_batch = max_batch
        self.timeout = timeout
        self.queries = 0  # how many queries were made (for tests and the bench)
        self._waiting: dict[str, list[asyncio.Future[tuple[str, str | None] | None]]] = {}
        self._runner: asyncio.Task[None] | None = None

    async def lookup(self, token_hash: str) -> tuple[str, str | None] | None:
        """(host id, agent public key) of the agent whose current token hash is `token_hash`, else None.

        Raises what the database raised (the caller answers `unavailable`)."""
        future: asyncio.Future[tuple[str, str | None] | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(token_hash, []).append(future)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="token-lookup")
        return await future

    async def _run(self) -> None:
        """Query for every waiting hash, `max_batch` at a time, until none waits."""
        while self._waiting:
            hashes = list(itertools.islice(self._waiting, self.max_batch))
            batch = {h: self._waiting.pop(h) for h in hashes}
            try:
                self.queries += 1
                async with asyncio.timeout(self.timeout), self.sessions() as session:
                    found = await crud.agents_for_token_hashes(session, hashes)
            except BaseException as exc:  # the waiters get it (cancelled: they are failed below)
                for futures in batch.values():
                    _settle(futures, exc=exc)
                if not isinstance(exc, Exception):
                    self.fail_waiting()
                    raise
                continue
            for token_hash, futures in batch.items():
                _settle(futures, found.get(token_hash))

    def fail_waiting(self) -> None:
        """Fail every waiting check (the API is stopping)."""
        waiting, self._waiting = self._waiting, {}
        for futures in waiting.values():
            _settle(futures, exc=ConnectionError("the API is stopping"))

    async def stop(self) -> None:
        """Cancel the running query, if any, and fail every waiting check."""
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        self.fail_waiting()
        if self._engine is not None:
            await self._engine.dispose()


def own_connection(
    sessions: async_sessionmaker[AsyncSession],
) -> tuple[async_sessionmaker[AsyncSession], AsyncEngine | None]:
    """Sessions on a pool of one connection of their own (PostgreSQL), and that engine to dispose of.

    A storm also brings one presence event per agent, each holding a connection of the API's pool for a
    few queries: token checks queued behind them for a pooled connection would miss the gateway's timeout
    (measured: 3,500 of 10,000 agents refused once). SQLite keeps the shared engine (one file, one writer).
    """
    engine = getattr(sessions, "kw", {}).get("bind")
    if not isinstance(engine, AsyncEngine) or engine.dialect.name != "postgresql":
        return sessions, None
    own = create_async_engine(
        engine.url,
        pool_size=1,
        max_overflow=0,
        pool_timeout=10,
        pool_pre_ping=True,
        connect_args={"timeout": 5},
    )
    return async_sessionmaker(own, class_=AsyncSession, expire_on_commit=False), own


def _settle(
    futures: list[asyncio.Future[T]], value: T | None = None, exc: BaseException | None = None
) -> None:
    for future in futures:
        if future.done():
            continue
        if exc is not None:
            future.set_exception(exc if isinstance(exc, Exception) else ConnectionError("lookup cancelled"))
        else:
            future.set_result(value)  # type: ignore[arg-type]


class Bus:
    """Owns the API's subscriptions and micro service; `start` in the lifespan, `stop` at shutdown."""

    def __init__(
        self,
        nc: NATS,
        sessions: async_sessionmaker[AsyncSession],
        tasks: TaskTracker,
        max_output_chars: int,
        ready: Callable[[], bool],
        runner: Runner,
        command_ttl: float,
        watch: GatewayWatch | None = None,
    ) -> None:
        self.nc = nc
        self.sessions = sessions
        self.tasks = tasks
        self.max_output_chars = max_output_chars
        self.ready = ready
        self.runner = runner
        self.command_ttl = command_ttl
        self.watch = watch
        self.rejections: Rejections = runner.rejections
        self._subs: list[Subscription] = []
        self._service: Service | None = None
        self.tokens = TokenLookup(sessions)
        self.presence = PresenceRecorder(SqlPresenceStore(sessions), self.rejections)
        self.metrics = MetricsRecorder(SqlMetricsStore(sessions))  # samples and last_ping, in batches

    async def start(self) -> None:
        """Subscribe to presence, metrics and results; register the micro service endpoints."""
        for subject, handler in (
            (subjects.ALL_PRESENCE, self._on_presence),
            (subjects.ALL_METRICS, self._on_metrics),
            (subjects.ALL_RESULTS, self._on_result),
        ):
            self._subs.append(await self.nc.subscribe(subject, queue=subjects.API_QUEUE, cb=handler))
        if self.watch is not None:  # every instance hears every gateway (no queue group)
            self._subs.append(
                await self.nc.subscribe(subjects.GATEWAY_HEARTBEATS, cb=self.watch.on_heartbeat)
            )
        self._service = await micro.add_service(
            self.nc, name=SERVICE_NAME, version=__version__, description="Warlock API: tokens, operator exec"
        )
        await self._service.add_endpoint(
            name="token-verify",
            subject=subjects.TOKEN_VERIFY,
            queue_group=subjects.AUTH_QUEUE,
            handler=self._on_token_verify,
        )
        await self._service.add_endpoint(
            name="ops-exec",
            subject=subjects.ops_exec_wildcard(),
            queue_group=subjects.API_QUEUE,
            handler=self._on_ops_exec,
        )
        await self.nc.flush()

    async def stop(self) -> None:
        """Unsubscribe everything (handlers already running finish as tracked tasks)."""
        try:
            if self._service is not None:
                await self._service.stop()
            for sub in self._subs:
                await sub.unsubscribe()
        except nats.errors.Error as exc:
            log.warning("unsubscribing at shutdown: %s", exc)
        self._subs.clear()
        await self.tokens.stop()
        await self.presence.stop()
        await self.metrics.stop()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self.tasks.spawn(self._guard(coro, name), name=name)

    async def _guard(self, coro: Awaitable[None], name: str) -> None:
        try:
            await coro
        except DB_ERRORS as exc:
            log.warning("%s: database unavailable, event dropped: %s", name, type(exc).__name__)

    # ------------------------------------------------------------------------- request/reply

    async def _answer(self, req: Request, make: Callable[[], Awaitable[Message]], name: str) -> None:
        try:
            if not self.ready():
                raise ConnectionError("database not initialised")
            message = await make()
        except DB_ERRORS as exc:
            log.warning("%s: database unavailable: %s", name, type(exc).__name__)
            message = error(ErrorCode.UNAVAILABLE, "database unavailable; retry")
        except ProtocolError as exc:
            message = error(ErrorCode.BAD_REQUEST, exc.message)
        try:
            await respond(req, message)
        except nats.errors.Error as exc:
            log.warning("%s: reply not sent: %s", name, exc)

    async def _on_token_verify(self, req: Request) -> None:
        self._spawn(self._answer(req, lambda: self._verify(req.data), "token-verify"), "token-verify")

    async def _verify(self, data: bytes) -> Message:
        request = decode_model(TokenVerifyRequest, data)
        agent = await self.tokens.lookup(request.token_sha256)
        if agent is None:
            log.info("token check refused: token %s", fingerprint(request.token_sha256))
            return error(ErrorCode.UNAUTHORIZED, "unknown or revoked token")
        host_id, public_key = agent
        return TokenOk.model_validate({"host_id": host_id, "public_key": public_key})

    async def _on_ops_exec(self, req: Request) -> None:
        self._spawn(self._answer(req, lambda: self._ops_exec(req.subject, req.data), "ops-exec"), "ops-exec")

    async def _ops_exec(self, subject: str, data: bytes) -> Message:
        """Verify an operator-signed exec, record it (refusing a used id), run it like a REST exec."""
        try:
            host_id = subjects.parse_ops_exec(subject)
        except InvalidIdError as exc:
            return error(ErrorCode.BAD_REQUEST, str(exc))
        request = decode_model(ExecRequest, data)
        signature = request.signature
        if signature is None:
            return error(ErrorCode.UNSIGNED, OPS_HOWTO, request.command_id)
        async with self.sessions() as session:
            key = await crud.get_operator_key(session, signature.key_id)
        if key is None:
            why = f"key {signature.key_id} is not an operator key of this API (warlock signing-keys list)"
            why += "; nothing ran"
            return self._refuse(ErrorCode.UNKNOWN_KEY, why, request, host_id)
        if key.revoked_at is not None:
            why = f"operator key {key.name} was revoked at {key.revoked_at.isoformat()}; nothing ran"
            return self._refuse(ErrorCode.FORBIDDEN, why, request, host_id)
        fields = signing.signed_fields(request)
        try:
            trusted = signing.TrustedKeys([key.public_key])
            signing.verify_command("ops_exec", fields, signature, trusted, host_id, self.command_ttl)
        except signing.CommandRefused as exc:
            return self._refuse(exc.code, f"{exc.description}; nothing ran", request, host_id)
        if request.command_id is None:
            why = "an operator command needs a command_id (warlock req makes one); nothing ran"
            return error(ErrorCode.BAD_REQUEST, why)
        run = NewRun(request.command_id, request.command, request.timeout, f"operator:{key.name}", utcnow())
        try:
            async with self.sessions() as session:
                host = await crud.start_run(session, host_id, run)
        except Conflict:
            why = f"command id {run.command_id} was already used; nothing ran again"
            return error(ErrorCode.REPLAY, why, run.command_id)
        if host is None:
            return error(ErrorCode.NOT_FOUND, f"unknown host {host_id}; nothing ran", run.command_id)
        log.info("operator %s: command %s on %s", key.name, run.command_id, host_id)
        _, outcome = await self.runner.deliver(run, host)
        return reply_of(outcome, run.command_id)

    def _refuse(self, code: ErrorCode, why: str, request: ExecRequest, host_id: str) -> ErrorReply:
        self.rejections.reject("operator exec", f"key {request.signature and request.signature.key_id}", why)
        return error(code, why, request.command_id)

    # ------------------------------------------------------------------------- events

    async def _on_presence(self, msg: Msg) -> None:
        try:
            event = decode_presence(msg.data)
        except ProtocolError as exc:
            log.warning("bad presence event on %s skipped: %s", msg.subject, exc.message)
            return
        self.presence.submit(event)  # recorded in a batch, in arrival order per host, never dropped

    async def _on_metrics(self, msg: Msg) -> None:
        try:
            event = decode_model(MetricsEvent, msg.data)
        except ProtocolError as exc:
            log.warning("bad metrics event on %s skipped: %s", msg.subject, exc.message)
            return
        self.metrics.submit(event)  # kept in the history and last_ping set, in batches (metrics_history)

    async def _on_result(self, msg: Msg) -> None:
        try:
            result = decode_model(ExecResult, msg.data)
        except ProtocolError as exc:
            log.warning("bad late result on %s skipped: %s", msg.subject, exc.message)
            return
        try:
            host = subjects.parse_result(msg.subject)
        except InvalidIdError as exc:
            log.warning("late result on a bad subject skipped: %s", exc)
            return
        self._spawn(self._late_result(host, result), f"result-{result.command_id}")

    async def _late_result(self, host: str, result: ExecResult) -> None:
        values = late_result_values(result, self.max_output_chars, utcnow())
        async with self.sessions() as session:
            agent = await crud.get_agent(session, host)
            problem = result_problem(None if agent is None else agent.public_key, host, result)
            if problem is not None:
                self.rejections.reject("late result", host, f"command {result.command_id}: {problem}")
                return
            changed = await crud.update_run(
                session,
                result.command_id,
                values,
                when=(CommandStatus.PENDING, CommandStatus.TIMED_OUT),
                host_id=host,
            )
            run = await session.get(CommandRun, result.command_id) if changed else None
        log.info("late result for command %s %s", result.command_id, "recorded" if changed else "ignored")
        if changed:
            self.runner.settled_elsewhere(result.command_id)  # a caller still waiting answers now
        await announce_run(self.nc, run)  # to the browsers of every instance (fleet.browser)


def reply_of(outcome: Outcome, command_id: str) -> Message:
    """The NATS answer of an operator exec: the result as recorded (via agent or ssh), or a typed error."""
    if outcome.is_result:
        return ExecResult(
            command_id=command_id,
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            truncated=outcome.truncated,
            timed_out=outcome.status == CommandStatus.TIMED_OUT,
            duration_ms=outcome.duration_ms or 0.0,
            via="ssh" if outcome.via == "ssh" else "agent",
            cancelled=outcome.status == CommandStatus.CANCELLED,
        )
    codes = {str(c) for c in ErrorCode}
    code = ErrorCode(outcome.error_code) if outcome.error_code in codes else ErrorCode.INTERNAL
    return error(code, outcome.error_description or str(code), command_id)
