"""Jobs: one command to many hosts, in batches, with one outcome per host.

    submit ─ select the hosts ─ record the job and one run per host (one transaction: first batch
             pending, the rest queued) ─ 202 ─┐
                                              └ tracked task, per batch:
                 promote the batch's queued runs → pending (a cancel may have taken some: not sent)
                 send each run concurrently (a window of at most `SEND_WINDOW` in flight) through the
                 hybrid runner's `send` (agent, SSH on no responders; every rule of a single exec)
                 outcomes collected by `OutcomeWriter`: one executemany every ~20 ms
             after a batch with a failure and `stop_on_failure`: the rest → skipped (nothing sent)
             at the end: the job finished (or stays cancelled)

Batches run one after the other: at most `batch_size` hosts of a job are in flight at once, and a batch
starts when the previous one has every outcome. Each run is an ordinary CommandRun (job_id set), recorded
before it is sent, sent at most once, its exec signed issued at the run's created_at (as the single exec
path, so the reconciler's result query names the right not-after).

If the API running a job dies: its pending runs are settled by the reconciler like any orphan (the
agent's ledger, else the deadline rule); its queued runs were never sent, so any API's `JobRunner`
(`settle_stale`) marks them skipped once the job's heartbeat (every `HEARTBEAT_S`) is `STALE_S` old.
Promotion is guarded by status, so an API that was only slow cannot send a run settled meanwhile.

Cancel: the job → cancelled and its queued runs → cancelled, in the database (so any API instance can
cancel any job); the running job starts no further batch. Runs in flight are left to finish — or to
`cancel_in_flight`, a hook for the per-command cancel (set by the app when it exists).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.api.errors import DatabaseUnavailable, DomainError, NotFound
from services.api.fleet.runner import Outcome, Runner, ssh_target
from services.api.fleet.tasks import TaskTracker
from services.api.store import jobs as store
from services.api.store.models import CommandStatus, Job, JobState, utcnow
from services.api.store.runstore import HostTarget
from shared.errors import ErrorCode
from shared.ids import CommandId, new_command_id

log = logging.getLogger(__name__)

SEND_WINDOW = 2000  # requests of one job in flight at once at most (within a batch)
FLUSH_S = 0.02  # outcomes are written together every this often
FLUSH_ROWS = 2000  # ... or as soon as this many wait
HEARTBEAT_S = 5.0
STALE_S = 30.0  # a job whose heartbeat is this old has no API running it
STATUS_HEADER, NO_RESPONDERS = "Status", "503"  # what nats-server sets on a request nobody took
SKIPPED = "skipped"
STOPPED = "never sent: the API running the job stopped before this host's batch started; nothing ran"
NOT_SENT = "not_sent"
FAILURE = frozenset(
    {CommandStatus.FAILED, CommandStatus.TIMED_OUT, CommandStatus.UNDELIVERABLE, CommandStatus.CANCELLED}
)


class BadSelection(DomainError):
    """The selection names unknown hosts (`extra["unknown"]`), or no host at all: nothing recorded."""


@dataclass(frozen=True)
class JobSpec:
    """What to run where: exactly one of `hosts`, `labels`, `all_hosts`."""

    command: str
    timeout: float
    hosts: Sequence[str] | None = None
    labels: dict[str, str] | None = None
    all_hosts: bool = False
    batch: int | str | None = None  # N, "N%", or None (all at once)
    stop_on_failure: bool = False

    def selection(self) -> dict[str, Any]:
        """The selection as asked (stored with the job)."""
        if self.hosts is not None:
            return {"hosts": list(self.hosts)}
        if self.labels is not None:
            return {"labels": dict(self.labels)}
        return {"all": True}


def batch_size(batch: int | str | None, total: int) -> int:
    """Hosts per batch: all (None), N, or N% of `total` rounded down; at least 1."""
    if total <= 0:
        return 0
    if batch is None:
        return total
    if isinstance(batch, str):
        percent = int(batch.rstrip("%"))
        return max(1, min(total, total * percent // 100))
    return max(1, min(total, batch))


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """`items` cut into consecutive batches of `size` (the last may be shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)] if size > 0 else []


class OutcomeWriter:
    """Collects outcomes and writes them with one executemany every `FLUSH_S` (or `FLUSH_ROWS`)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._rows: list[tuple[str, dict[str, Any]]] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._task = asyncio.ensure_future(self._loop())
        self.written = 0

    def put(self, command_id: str, values: dict[str, Any]) -> None:
        """Queue one run's outcome."""
        self._rows.append((command_id, values))
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            if not self._closed and len(self._rows) < FLUSH_ROWS:
                await asyncio.sleep(FLUSH_S)
            self._wake.clear()
            rows, self._rows = self._rows, []
            await self._write(rows)
            if self._closed and not self._rows:
                return

    async def _write(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        if not rows:
            return
        for attempt in (1, 2):
            try:
                await store.finish_runs(self.engine, rows)
                self.written += len(rows)
                return
            except (SQLAlchemyError, OSError) as exc:
                log.error("%d job outcomes not written (attempt %d): %s", len(rows), attempt, exc)
                await asyncio.sleep(0.5)
        # left pending: the reconciler settles them from the agents' ledgers (never re-sent)

    async def close(self) -> None:
        """Write what is left and stop."""
        self._closed = True
        self._wake.set()
        await self._task


class ReplyMux:
    """Jobs' agent requests over one reply subscription (``<api inbox>.<nuid>.<n>``, inside the API's own
    reply-inbox prefix: no new subject or permission), as `NATS.request` but without its per-request
    future callback, ``wait_for`` and timer: one sweep every `SWEEP_S` fails the requests past their
    timeout (nats TimeoutError); a *no responders* status reply raises NoRespondersError, as there."""

    SWEEP_S = 0.25

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.base = ""
        self.waiting: dict[str, tuple[asyncio.Future[Msg], float]] = {}
        self._sub: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()
        self._count = 0

    async def _open(self) -> None:
        async with self._opening:
            if self._sub is None:
                self.base = self.nc.new_inbox()
                self._sub = await self.nc.subscribe(f"{self.base}.*", cb=self._on_reply)
                self._sweeper = asyncio.ensure_future(self._sweep())

    async def _on_reply(self, msg: Msg) -> None:
        entry = self.waiting.pop(msg.subject[len(self.base) + 1 :], None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(msg)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.SWEEP_S)
            now = time.monotonic()
            late = [token for token, (_, deadline) in self.waiting.items() if deadline <= now]
            for token in late:
                future, _ = self.waiting.pop(token)
                if not future.done():
                    future.set_exception(nats.errors.TimeoutError())

    async def request(self, subject: str, payload: bytes, *, timeout: float) -> Msg:  # noqa: ASYNC109 - as NATS.request
        """The reply to `payload` on `subject` (see the class docstring)."""
        if self._sub is None:
            await self._open()
        self._count += 1
        token = str(self._count)
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self.waiting[token] = (future, time.monotonic() + timeout)
        try:
            await self.nc.publish(subject, payload, reply=f"{self.base}.{token}")
            msg = await future
        finally:
            self.waiting.pop(token, None)
        if msg.headers and msg.headers.get(STATUS_HEADER) == NO_RESPONDERS:
            raise nats.errors.NoRespondersError
        return msg

    async def close(self) -> None:
        """Stop the sweep and the subscription (requests still waiting fail as NATS would)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for future, _ in self.waiting.values():
            if not future.done():
                future.set_exception(nats.errors.ConnectionClosedError())
        self.waiting.clear()
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None


class JobRunner:
    """Runs jobs in this API process (tracked tasks); settles the queued runs of jobs whose API died."""

    def __init__(self, runner: Runner, engine: AsyncEngine, tasks: TaskTracker) -> None:
        self.runner = runner
        self.engine = engine
        self.tasks = tasks
        self.instance = uuid.uuid4().hex[:16]
        self.running: dict[str, asyncio.Task[None]] = {}
        self.cancelled: set[str] = set()
        # per-command cancel of runs in flight (None: they are left to finish)
        self.cancel_in_flight: Callable[[Sequence[str]], Awaitable[None]] | None = None
        self._in_flight: dict[str, set[str]] = {}  # job id -> command ids in flight
        self.mux = ReplyMux(runner.nc)

    async def submit(
        self,
        spec: JobSpec,
        requested_by: str | None,
        admit: Callable[[list[tuple[str, dict[str, str]]]], None] | None = None,
    ) -> tuple[Job, asyncio.Task[None]]:
        """Select the hosts, record the job and its runs (committed), start it; BadSelection (nothing
        recorded) if a host list names unknown hosts or the selection names no host. `admit` sees the
        selected hosts (id, labels) before anything is recorded and may raise to refuse the job (the
        API key's scope)."""
        labels = None if spec.labels is None else list(spec.labels.items())
        try:
            selected = await store.select_targets(self.engine, spec.hosts, labels)
        except (SQLAlchemyError, OSError) as exc:
            raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}") from exc
        if selected.unknown:
            shown = ", ".join(repr(h[:100]) for h in selected.unknown[:20])
            more = f" and {len(selected.unknown) - 20} more" if len(selected.unknown) > 20 else ""
            raise BadSelection(
                f"unknown hosts: {shown}{more}; nothing was recorded or sent",
                code="unknown_hosts",
                extra={"unknown": selected.unknown[:1000]},
            )
        targets = selected.targets
        if not targets:
            raise BadSelection("the selection matches no host; nothing was recorded or sent", "no_targets")
        if admit is not None:
            admit([(t.id, selected.labels.get(t.id, {})) for t in targets])
        size = batch_size(spec.batch, len(targets))
        now = utcnow()
        job = Job(
            job_id=f"job-{uuid.uuid4().hex[:20]}",
            command=spec.command,
            timeout=spec.timeout,
            selection=spec.selection(),
            targets=len(targets),
            batch=None if spec.batch is None else str(spec.batch),
            batch_size=size,
            stop_on_failure=spec.stop_on_failure,
            state=JobState.RUNNING,
            requested_by=requested_by,
            api_instance=self.instance,
            created_at=now,
            heartbeat_at=now,
        )
        ids: list[str] = [new_command_id() for _ in targets]
        work = list(zip(ids, targets, strict=True))
        runs = [store.JobRun(cid, t.id, i < size) for i, (cid, t) in enumerate(work)]
        try:
            await store.create_job(self.engine, job, runs)
        except (SQLAlchemyError, OSError) as exc:
            raise DatabaseUnavailable(f"database unavailable: {type(exc).__name__}") from exc
        task = self.tasks.spawn(self._run(job, work), name=job.job_id)
        self.running[job.job_id] = task
        task.add_done_callback(lambda _: self.running.pop(job.job_id, None))
        return job, task

    async def _run(self, job: Job, work: list[tuple[str, HostTarget]]) -> None:
        writer = OutcomeWriter(self.engine)
        created = job.created_at
        completed = False
        try:
            for number, batch in enumerate(batches(work, job.batch_size)):
                if number > 0:
                    if job.job_id in self.cancelled:
                        break
                    created = utcnow()
                    promoted = await store.promote(self.engine, job.job_id, [c for c, _ in batch], created)
                    batch = [(c, t) for c, t in batch if c in promoted]
                failed = await self._batch(job, batch, created, writer)
                if failed and job.stop_on_failure:
                    n = await store.settle_queued(
                        self.engine,
                        job.job_id,
                        CommandStatus.SKIPPED,
                        SKIPPED,
                        "not sent: an earlier batch had a failure and the job stops on failure; nothing ran",
                        utcnow(),
                    )
                    log.info("job %s: stopped on failure, %d hosts skipped", job.job_id, n)
                    break
            completed = True
        finally:
            await writer.close()
            self.cancelled.discard(job.job_id)
            try:
                if not completed:  # the API is stopping (or a bug): what was never sent is skipped
                    await store.settle_queued(
                        self.engine, job.job_id, CommandStatus.SKIPPED, NOT_SENT, STOPPED, utcnow()
                    )
                await store.finish_job(self.engine, job.job_id, utcnow())
            except (SQLAlchemyError, OSError) as exc:
                log.error("job %s: end not recorded: %s", job.job_id, exc)

    async def _batch(
        self, job: Job, batch: Sequence[tuple[str, HostTarget]], created: Any, writer: OutcomeWriter
    ) -> bool:
        """Send one batch (at most `SEND_WINDOW` at once) and wait for every outcome; whether any failed."""
        items = iter(batch)
        failed = False
        issued_at = created.timestamp()
        in_flight = self._in_flight.setdefault(job.job_id, set())

        async def worker() -> None:
            nonlocal failed
            for command_id, target in items:
                in_flight.add(command_id)
                try:
                    status = await self._one(job, command_id, target, issued_at, writer)
                finally:
                    in_flight.discard(command_id)
                if status in FAILURE:
                    failed = True

        workers = [asyncio.ensure_future(worker()) for _ in range(min(SEND_WINDOW, len(batch)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            if not in_flight:
                self._in_flight.pop(job.job_id, None)
        return failed

    async def _one(
        self, job: Job, command_id: str, target: HostTarget, issued_at: float, writer: OutcomeWriter
    ) -> CommandStatus:
        started = utcnow()
        t0 = time.monotonic()
        runner = self.runner
        runner.delivering.add(command_id)
        try:
            outcome = await runner.send(
                target.id,
                CommandId(command_id),
                job.command,
                job.timeout,
                ssh_target(target),
                target.public_key,
                gateway_id=target.gateway_id,
                issued_at=issued_at,
                before_ssh=lambda: runner.store.route_ssh(command_id),
                requester=self.mux.request,
            )
        except Exception as exc:  # one host's failure must not lose the others' outcomes
            log.exception("job %s: command %s on %s failed", job.job_id, command_id, target.id)
            outcome = Outcome(
                CommandStatus.TIMED_OUT,
                None,
                error_code=ErrorCode.INTERNAL,
                error_description=f"internal error while sending ({type(exc).__name__}); it may have run",
            )
        finally:
            runner.delivering.discard(command_id)
        values = outcome.values()
        values["started_at"] = started
        values["finished_at"] = utcnow()
        if values["duration_ms"] is None:
            values["duration_ms"] = round((time.monotonic() - t0) * 1000, 3)
        writer.put(command_id, values)
        return outcome.status

    async def cancel(self, job_id: str) -> Job:
        """Stop starting batches of `job_id` and cancel its queued runs (nothing ran); NotFound if unknown.

        Runs already sent finish (or go to `cancel_in_flight`)."""
        job = await store.get_job(self.engine, job_id)
        if job is None:
            raise NotFound(f"unknown job {job_id[:100]!r}")
        await store.cancel_job(self.engine, job_id, utcnow())
        if job_id in self.running:
            self.cancelled.add(job_id)
            if self.cancel_in_flight is not None and self._in_flight.get(job_id):
                await self.cancel_in_flight(sorted(self._in_flight[job_id]))
        found = await store.get_job(self.engine, job_id)
        assert found is not None
        return found

    async def settle_stale(self) -> int:
        """Queued runs of jobs no API runs any more (heartbeat `STALE_S` old) → skipped; how many jobs."""
        now = utcnow()
        stale = await store.stale_jobs(self.engine, now - timedelta(seconds=STALE_S), self.running)
        for job_id in stale:
            n = await store.settle_queued(
                self.engine,
                job_id,
                CommandStatus.SKIPPED,
                NOT_SENT,
                STOPPED,
                now,
            )
            await store.finish_job(self.engine, job_id, now)
            log.warning("job %s: its API stopped; %d hosts never sent marked skipped", job_id, n)
        return len(stale)

    async def maintain_forever(self, ready: Callable[[], bool]) -> None:
        """Heartbeat this API's jobs every `HEARTBEAT_S`; settle stale jobs of other (dead) APIs."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if not ready():
                continue
            try:
                await store.heartbeat(self.engine, list(self.running), utcnow())
                await self.settle_stale()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("job maintenance failed: %s", exc)
