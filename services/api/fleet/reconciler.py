"""Settle the runs an API left pending: it died (or was killed) between recording a command and its outcome.

A run is recorded `pending` before anything is sent, and its sender settles it within the command's timeout
plus the longest grace (agent `exec_grace`, SSH `ssh_grace`). A row still pending after that (plus
`reconcile_margin`: its deadline) has no sender left in any API instance. Every API instance runs the
reconciler; each update is guarded by status, so two instances settle a row once. Nothing is ever re-sent.

The agent's ledger is asked first (`warlock.agent.<host>.result`, a `ResultQuery` signed by the API, kind
``result_query``; read-only on the host): once when the run is `reconcile_query_after` old, and again past
its deadline. A verified answer decides:

    done + the agent's signed result ──▶ the result, as the agent recorded it        (via agent)
    done + a recorded typed error ─────▶ failed (nothing ran) / timed_out (may have run), as its code says
    never_ran ─────────────────────────▶ failed + ``never_ran``: certain, see below
    running / unknown / no answer ─────▶ wait; past the deadline: timed_out + ``orphaned`` (may have run)
    an answer that does not verify ───▶ counted and logged, as no answer

``never_ran`` is certain: the agent answers it only while its clock is not past the exec's not-after (the
runner signs an exec with issued-at = the run's created_at, so not-after = created_at + `command_ttl`,
assuming every API instance has the same `command_ttl`), when its ledger would still hold the id had it
run, and it then records the id as used, so the exec, if it still arrives, is refused as a replay. Asked
later (``unknown``), the command can no longer start but may have run and been forgotten: the deadline
rule applies. A run whose sender is alive but slow may be asked too: the answer stays true for it (an exec
that arrives after a ``never_ran`` is refused, and its sender records that nothing ran).

SSH: the SSH worker keeps no ledger across restarts, so a pending run the runner routed over SSH (it
records ``via = 'ssh'`` before the SSH request leaves) is never asked about: the deadline rule settles it.
A late result (`warlock.result.<host>`, e.g. re-sent by the agent from its outbox) still settles a run
marked orphaned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.fleet.browser import announce_finished
from services.api.fleet.runner import outcome_of_error, outcome_of_result
from services.api.fleet.signer import ApiSigner
from services.api.fleet.verify import Rejections
from services.api.settings import ApiSettings
from services.api.store import crud
from services.api.store.models import CommandRun, CommandStatus, Via, utcnow
from shared import signing, subjects
from shared.errors import ProtocolError
from shared.ids import CommandId, new_command_id
from shared.protocol import ErrorReply, ResultAnswer, ResultQuery, decode_result_reply, encode

log = logging.getLogger("services.api")
ORPHANED = "orphaned"
NEVER_RAN = "never_ran"
BATCH = 500  # rows looked at per pass and per kind (early, past the deadline)
CONCURRENT_QUERIES = 16


def grace(settings: ApiSettings) -> float:
    """How long past its timeout any sender may still settle a run (plus the margin)."""
    return max(settings.exec_grace, settings.ssh_grace) + settings.reconcile_margin


def orphan_deadline(run: CommandRun, settings: ApiSettings) -> datetime:
    """When a pending `run` is past any sender's wait."""
    return run.created_at + timedelta(seconds=run.timeout + grace(settings))


def exec_not_after(run: CommandRun, settings: ApiSettings) -> float:
    """The not-after of the exec that carried `run` (the runner signs it issued at the run's created_at)."""
    return run.created_at.timestamp() + settings.command_ttl


# ----------------------------------------------------------------------------- decisions (no I/O)


@dataclass(frozen=True)
class Settle:
    """Set these columns on the pending run (the agent's ledger decided)."""

    values: dict[str, Any]
    why: str


@dataclass(frozen=True)
class Wait:
    """Nothing certain: leave the run to the deadline rule."""

    why: str


Decision = Settle | Wait


def orphaned_values(now: datetime) -> dict[str, Any]:
    """The deadline rule: may have run, never re-sent, a late result still settles it."""
    return {
        "status": CommandStatus.TIMED_OUT,
        "error_code": ORPHANED,
        "error_description": "the API that sent it stopped before its outcome was known; it may have run and "
        "is never re-sent (a late result still settles it)",
        "finished_at": now,
    }


def never_ran_values(now: datetime) -> dict[str, Any]:
    """The agent's ledger shows it never ran, and now refuses its id."""
    return {
        "status": CommandStatus.FAILED,
        "via": Via.AGENT,
        "error_code": NEVER_RAN,
        "error_description": "the API that sent it stopped before its outcome was known; the agent's ledger "
        "shows it never ran there and now refuses its id: nothing ran",
        "finished_at": now,
    }


def decide(
    data: bytes, host_id: str, query_id: str, public_key: str | None, max_chars: int, now: datetime
) -> Decision:
    """What the agent's reply to result query `query_id` settles, if anything: only an answer signed with
    the host's agent key `public_key` counts (see the module docstring)."""
    try:
        reply = decode_result_reply(data)
    except ProtocolError as exc:
        return Wait(f"undecodable answer: {exc.message}")
    if isinstance(reply, ErrorReply):
        return Wait(f"no answer from the agent: {reply.code}: {reply.description[:200]}")
    if public_key is None:
        return Wait("no agent key registered: no answer can be verified")
    problem = signing.answer_problem(signing.parse_public(public_key), host_id, query_id, reply)
    if problem is not None:
        return Wait(f"rejected: {problem}")
    return decide_answer(reply, max_chars, now)


def decide_answer(answer: ResultAnswer, max_chars: int, now: datetime) -> Decision:
    """The decision for a verified answer."""
    if answer.state == "done" and answer.result is not None:
        outcome = outcome_of_result(answer.result, Via.AGENT, max_chars)
        return Settle({**outcome.values(), "finished_at": now}, "the agent's recorded result")
    if answer.state == "done" and answer.error is not None:
        error = answer.error
        reply = ErrorReply(code=error.code, description=error.description, command_id=error.command_id)
        outcome = outcome_of_error(reply, Via.AGENT)
        return Settle({**outcome.values(), "finished_at": now}, f"the agent's recorded error {error.code}")
    if answer.state == "never_ran":
        return Settle(never_ran_values(now), "never ran on the agent (its id is now refused there)")
    return Wait(f"the agent says {answer.state}")


# ----------------------------------------------------------------------------- the reconciler


class Reconciler:
    """One per API instance: `settle` is one pass (ask agents, then apply the deadline rule)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        settings: ApiSettings,
        nc: NATS | None = None,
        signer: ApiSigner | None = None,
        rejections: Rejections | None = None,
        delivering: Collection[str] = (),
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.nc = nc
        self.signer = signer
        self.rejections = rejections or Rejections()
        self.delivering = delivering  # this instance's own runs in flight: never asked about
        self.asked: set[str] = set()  # runs asked about before their deadline (asked once)

    async def _pending(
        self, session: AsyncSession, older: datetime, newer: datetime | None
    ) -> list[CommandRun]:
        query = (
            select(CommandRun)
            .where(col(CommandRun.status) == CommandStatus.PENDING)
            .where(col(CommandRun.created_at) < older)
        )
        if newer is not None:
            query = query.where(col(CommandRun.created_at) > newer)
        query = query.order_by(col(CommandRun.created_at)).limit(BATCH)
        return list((await session.exec(query)).all())

    async def settle(self, now: datetime | None = None) -> list[str]:
        """One pass; return the command ids it settled."""
        clock = utcnow() if now is None else now
        settings = self.settings
        async with self.sessions() as session:
            late = await self._pending(session, clock - timedelta(seconds=grace(settings)), None)
            late = [run for run in late if orphan_deadline(run, settings) < clock]
            early: list[CommandRun] = []
            if self.nc is not None and self.signer is not None:
                window = settings.command_ttl  # asked later, a run that never reached the agent is unknown
                first_ask = clock - timedelta(seconds=settings.reconcile_query_after)
                recent = await self._pending(session, first_ask, clock - timedelta(seconds=window))
                late_ids = {run.command_id for run in late}
                early = [
                    run
                    for run in recent
                    if run.command_id not in late_ids
                    and run.command_id not in self.asked
                    and run.command_id not in self.delivering
                    and run.via is None
                ]
                self.asked &= {run.command_id for run in recent}  # forget what is no longer pending
            keys = await self._agent_keys(session, {run.host_id for run in (*late, *early)})
        decisions = await self._ask_all([*early, *late], keys, clock)
        self.asked |= {run.command_id for run in early}
        settled: list[str] = []
        past_deadline = {run.command_id for run in late}
        async with self.sessions() as session:
            for run in [*early, *late]:
                decision = decisions.get(run.command_id)
                unrouted = isinstance(decision, Settle)  # the agent's word: not if it went by SSH meanwhile
                if isinstance(decision, Settle):
                    values, why = decision.values, decision.why
                elif run.command_id in past_deadline:
                    values, why = orphaned_values(clock), "orphaned" if decision is None else decision.why
                else:
                    continue
                pending = (CommandStatus.PENDING,)
                if await crud.update_run(session, run.command_id, values, when=pending, unrouted=unrouted):
                    settled.append(run.command_id)
                    log.warning(
                        "command %s was left pending by a stopped API: %s (%s)",
                        run.command_id,
                        values["status"],
                        why,
                    )
                    announced = {"via": run.via, **values}  # the agent's result sets via; orphaned keeps it
                    await announce_finished(self.nc, run.host_id, run.command_id, announced)
        return settled

    async def _agent_keys(self, session: AsyncSession, hosts: set[str]) -> dict[str, str | None]:
        keys: dict[str, str | None] = {}
        for host in hosts:
            agent = await crud.get_agent(session, host)
            keys[host] = None if agent is None else agent.public_key
        return keys

    async def _ask_all(
        self, runs: list[CommandRun], keys: dict[str, str | None], now: datetime
    ) -> dict[str, Decision]:
        """Ask the agents about `runs` (not those routed over SSH or without an agent key), a few at once."""
        if self.nc is None or self.signer is None:
            return {}
        limit = asyncio.Semaphore(CONCURRENT_QUERIES)
        decisions: dict[str, Decision] = {}

        async def ask(run: CommandRun) -> None:
            async with limit:
                decisions[run.command_id] = await self.ask(run, keys.get(run.host_id), now)

        askable = [run for run in runs if run.via is None and keys.get(run.host_id) is not None]
        await asyncio.gather(*(ask(run) for run in askable))
        return decisions

    async def ask(self, run: CommandRun, public_key: str | None, now: datetime) -> Decision:
        """Ask `run`'s agent what its ledger holds of the run's id; the decision its answer supports."""
        nc, signer = self.nc, self.signer
        assert nc is not None
        assert signer is not None
        query = ResultQuery(
            query_id=new_command_id(),
            command_id=CommandId(run.command_id),
            exec_not_after=exec_not_after(run, self.settings),
        )
        query = signer.sign("result_query", query, run.host_id)
        subject, wait = subjects.agent_result(run.host_id), self.settings.reconcile_query_timeout
        try:
            msg = await nc.request(subject, encode(query), timeout=wait)
        except nats.errors.NoRespondersError:
            return Wait("no agent session")
        except Exception as exc:  # NATS down or anything else: this run is left to the deadline rule
            return Wait(f"no answer: {type(exc).__name__}")
        decision = decide(
            msg.data, run.host_id, query.query_id, public_key, self.settings.max_output_chars, now
        )
        if isinstance(decision, Wait) and decision.why.startswith("rejected: "):
            self.rejections.reject("result answer", run.host_id, f"command {run.command_id}: {decision.why}")
        return decision


async def settle_orphans(
    sessions: async_sessionmaker[AsyncSession], settings: ApiSettings, now: datetime | None = None
) -> list[str]:
    """The deadline rule alone (no agent asked): every pending run past its deadline → `timed_out` /
    `orphaned`; return their command ids."""
    return await Reconciler(sessions, settings).settle(now)


async def reconcile_forever(reconciler: Reconciler, settings: ApiSettings, ready: Callable[[], bool]) -> None:
    """Run a pass every `reconcile_interval` seconds while the database is ready; never raises."""
    while True:
        await asyncio.sleep(settings.reconcile_interval)
        if not ready():
            continue
        try:
            await reconciler.settle()
        except Exception as exc:  # a database hiccup: try again next time, one line, no traceback
            log.warning("reconciler pass failed: %s: %s", type(exc).__name__, str(exc)[:200])
