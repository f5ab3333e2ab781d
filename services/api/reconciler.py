"""Settle the runs an API left pending: it died (or was killed) between recording a command and its outcome.

A run is recorded `pending` before anything is sent, and its sender settles it within the command's timeout
plus the longest grace (agent `exec_grace`, SSH `ssh_grace`). A row still pending well after that (plus
`reconcile_margin`) has no sender left in any API instance: the reconciler marks it `timed_out` with error
code `orphaned` — the command may have run, so it is never re-sent — and a result that arrives later
(`warlock.result.<host>`, e.g. re-sent by the agent from its outbox) still settles it. Every API instance
runs it; the update is guarded by status, so two instances settle a row once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api import crud
from services.api.models import CommandRun, CommandStatus, utcnow
from services.api.settings import ApiSettings

log = logging.getLogger("services.api")
ORPHANED = "orphaned"
BATCH = 500  # rows looked at per pass


def orphan_deadline(run: CommandRun, settings: ApiSettings) -> datetime:
    """When a pending `run` is past any sender's wait."""
    grace = max(settings.exec_grace, settings.ssh_grace) + settings.reconcile_margin
    return run.created_at + timedelta(seconds=run.timeout + grace)


async def settle_orphans(
    sessions: async_sessionmaker[AsyncSession], settings: ApiSettings, now: datetime | None = None
) -> list[str]:
    """Mark every pending run past its deadline `timed_out` / `orphaned`; return their command ids."""
    clock = utcnow() if now is None else now
    oldest_live = clock - timedelta(
        seconds=max(settings.exec_grace, settings.ssh_grace) + settings.reconcile_margin
    )
    settled: list[str] = []
    async with sessions() as session:
        query = (
            select(CommandRun)
            .where(col(CommandRun.status) == CommandStatus.PENDING)
            .where(col(CommandRun.created_at) < oldest_live)
            .order_by(col(CommandRun.created_at))
            .limit(BATCH)
        )
        candidates = [
            run for run in (await session.exec(query)).all() if orphan_deadline(run, settings) < clock
        ]
        for run in candidates:
            values = {
                "status": CommandStatus.TIMED_OUT,
                "error_code": ORPHANED,
                "error_description": "the API that sent it stopped before its outcome was known; it may have "
                "run and is never re-sent (a late result still settles it)",
                "finished_at": clock,
            }
            if await crud.update_run(session, run.command_id, values, when=(CommandStatus.PENDING,)):
                settled.append(run.command_id)
    for command_id in settled:
        log.warning("command %s was left pending by a stopped API: marked timed_out (orphaned)", command_id)
    return settled


async def reconcile_forever(
    sessions: async_sessionmaker[AsyncSession], settings: ApiSettings, ready: Callable[[], bool]
) -> None:
    """Run `settle_orphans` every `reconcile_interval` seconds while the database is ready; never raises."""
    while True:
        await asyncio.sleep(settings.reconcile_interval)
        if not ready():
            continue
        try:
            await settle_orphans(sessions, settings)
        except Exception as exc:  # a database hiccup: try again next time, one line, no traceback
            log.warning("reconciler pass failed: %s: %s", type(exc).__name__, str(exc)[:200])
