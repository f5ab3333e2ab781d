"""Metrics history in the database: batched writes, the retention job's SQL and the range query.

Raw samples go to ``metric_sample`` (one executemany INSERT per batch, a sample already stored — the
same host and time, a batch retried after an ambiguous commit — is skipped), with one UPDATE of the
batch's hosts' ``last_ping`` in the same transaction. `downsample` folds raw samples older than the raw
retention into 5-minute averages in ``metric_rollup`` (weighted by their sample counts, so a bucket folded
twice — a late sample — averages right) and deletes what is past either retention. `history` reads both
tables for a range; a sample is in exactly one of them (moved in one transaction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.store.models import AgentConnection, MetricSample

ROLLUP_S = 300  # the downsampled buckets: 5 minutes
VALUES = ("cpu", "load_1", "mem", "swap", "disk", "net_rx", "net_tx", "rtt_ms")
LOCK_ID = 0x574D4554  # "WMET": one API instance runs the retention job at a time (PostgreSQL)


async def write_samples(session: AsyncSession, rows: Sequence[dict[str, Any]], pinged_at: float) -> None:
    """Insert `rows` (``MetricSample`` columns) and set the hosts' last_ping to `pinged_at` (Unix seconds)
    where it is older; one transaction, committed."""
    if not rows:
        return
    bind = session.get_bind()
    insert = postgresql.insert if bind.dialect.name == "postgresql" else sqlite.insert
    table = MetricSample.__table__  # type: ignore[attr-defined]
    conn = await session.connection()  # core statements: sqlmodel's session.execute is deprecated
    await conn.execute(insert(table).on_conflict_do_nothing(), list(rows))
    hosts = sorted({row["host_id"] for row in rows})
    when = datetime.fromtimestamp(pinged_at, UTC)
    last_ping = col(AgentConnection.last_ping)
    await conn.execute(
        update(AgentConnection)
        .where(col(AgentConnection.host_id).in_(hosts))
        .where(last_ping.is_(None) | (last_ping < when))
        .values(last_ping=when)
    )
    await session.commit()


def _bucket(dialect: str, column: str, step: int | str) -> str:
    """SQL for the start of `column`'s bucket of `step` seconds (values are positive Unix seconds)."""
    if dialect == "postgresql":
        return f"floor({column} / {step}) * {step}"
    return f"CAST({column} / {step} AS INTEGER) * {step}"  # truncation is floor for positive values


def _merged(name: str) -> str:
    """The ON CONFLICT value of one column: both buckets' averages weighted by their sample counts."""
    old, new = f"metric_rollup.{name}", f"excluded.{name}"
    weights = "metric_rollup.samples", "excluded.samples"
    weighted = f"({old} * {weights[0]} + {new} * {weights[1]}) / ({weights[0]} + {weights[1]})"
    return f"CASE WHEN {old} IS NULL THEN {new} WHEN {new} IS NULL THEN {old} ELSE {weighted} END"


@dataclass
class Downsampled:
    """What one retention pass did (None when another API instance held the job's lock)."""

    folded: int  # raw samples averaged into buckets and deleted
    buckets: int  # buckets written or merged
    expired: int  # buckets deleted past the rollup retention


async def downsample(
    conn: AsyncConnection, now: float, raw_retention: float, rollup_retention: float
) -> Downsampled | None:
    """Fold raw samples older than `raw_retention` (whole buckets only) into ``metric_rollup`` and delete
    them; delete buckets older than `rollup_retention`. Call inside a transaction (``engine.begin()``).

    On PostgreSQL a transaction-scoped advisory lock keeps a second API instance out (it skips: None);
    were two to run anyway, each sample is folded once (the second finds it deleted)."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        got = (await conn.execute(text("SELECT pg_try_advisory_xact_lock(:id)"), {"id": LOCK_ID})).scalar()
        if not got:
            return None
    cutoff = math.floor((now - raw_retention) / ROLLUP_S) * ROLLUP_S
    columns = ", ".join(VALUES)
    averages = ", ".join(f"avg({name})" for name in VALUES)
    merges = ", ".join(f"{name} = {_merged(name)}" for name in VALUES)
    # names below are this module's constants, the step an int; every value is bound
    fold = text(
        f"INSERT INTO metric_rollup (host_id, at, samples, {columns}) "  # noqa: S608
        f"SELECT host_id, {_bucket(dialect, 'at', ROLLUP_S)} AS bucket, count(*), {averages} "
        "FROM metric_sample WHERE at < :cutoff GROUP BY host_id, bucket "
        f"ON CONFLICT (host_id, at) DO UPDATE SET {merges}, "
        "samples = metric_rollup.samples + excluded.samples"
    )
    buckets = (await conn.execute(fold, {"cutoff": cutoff})).rowcount
    folded = await conn.execute(text("DELETE FROM metric_sample WHERE at < :cutoff"), {"cutoff": cutoff})
    expire = text("DELETE FROM metric_rollup WHERE at < :cutoff")
    expired = (await conn.execute(expire, {"cutoff": now - rollup_retention})).rowcount
    return Downsampled(folded=folded.rowcount, buckets=buckets, expired=expired)


@dataclass
class Point:
    """One bucket of a host's history: averages, and the sample count behind them."""

    at: float
    samples: int
    values: dict[str, float | None]


async def history(session: AsyncSession, host_id: str, since: float, until: float, step: int) -> list[Point]:
    """The host's samples with ``since <= at < until`` averaged over buckets of `step` seconds (aligned to
    the epoch), raw and downsampled alike (a downsampled bucket weighs as many samples as it holds), in time
    order; buckets without samples are left out."""
    dialect = session.get_bind().dialect.name
    sums = ", ".join(f"sum({name} * w), sum(CASE WHEN {name} IS NULL THEN 0 ELSE w END)" for name in VALUES)
    both = (
        f"SELECT at, 1 AS w, {', '.join(VALUES)} FROM metric_sample "  # noqa: S608
        "WHERE host_id = :host AND at >= :since AND at < :until "
        f"UNION ALL SELECT at, samples AS w, {', '.join(VALUES)} FROM metric_rollup "
        "WHERE host_id = :host AND at >= :since AND at < :until"
    )
    query = text(
        f"SELECT {_bucket(dialect, 'at', int(step))} AS bucket, sum(w), {sums} FROM ({both}) AS s "  # noqa: S608
        "GROUP BY bucket ORDER BY bucket"
    )
    params = {"host": host_id, "since": since, "until": until}
    rows = (await (await session.connection()).execute(query, params)).all()
    points = []
    for row in rows:
        values: dict[str, float | None] = {}
        for i, name in enumerate(VALUES):
            total, weight = row[2 + 2 * i], row[3 + 2 * i]
            values[name] = None if not weight else float(total) / float(weight)
        points.append(Point(at=float(row[0]), samples=int(row[1]), values=values))
    return points
