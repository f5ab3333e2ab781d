"""Stored output chunks (`CommandOutput`): written in batches, read for SSE replay, swept by age.

    add_chunks(session, chunks, cap)   keep the chunks of known runs of the publishing host, within the
                                       per-command cap; a chunk already stored (same id and seq) is skipped
    read_chunks(session, id, after)    a command's chunks after a seq, in order
    purge(session, before)             drop chunks older than the retention

The cap counts UTF-8 bytes per command; the chunk that crosses it is stored cut and marked truncated, and
nothing after a truncated chunk is stored. Two API instances writing chunks of one command at the same
moment can overshoot the cap by at most one batch each (the sums are read, then written): a bound, not an
exact figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, delete, func
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.store.models import CommandOutput, CommandRun, utcnow


@dataclass(frozen=True, slots=True)
class Chunk:
    """One received chunk: the host its subject names and the chunk's fields."""

    host_id: str
    command_id: str
    seq: int
    stream: str
    data: str
    truncated: bool = False


def _cut(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` UTF-8 bytes, on a character boundary."""
    return text.encode()[:max_bytes].decode("utf-8", errors="ignore")


async def add_chunks(session: AsyncSession, chunks: Sequence[Chunk], cap_bytes: int) -> int:
    """Store `chunks` (commits); return how many rows were written.

    A chunk counts only if its command is a recorded run of the host whose subject it came on (a gateway
    publishes only its own agents' subjects, but nothing is believed here that costs a row otherwise).
    """
    if not chunks:
        return 0
    ids = sorted({c.command_id for c in chunks})
    found = select(col(CommandRun.command_id), col(CommandRun.host_id)).where(
        col(CommandRun.command_id).in_(ids)
    )
    owners: dict[str, str] = {row[0]: row[1] for row in (await session.exec(found)).all()}
    cut = func.sum(case((col(CommandOutput.truncated), 1), else_=0))
    sums = (
        select(col(CommandOutput.command_id), func.coalesce(func.sum(col(CommandOutput.size)), 0), cut)
        .where(col(CommandOutput.command_id).in_(ids))
        .group_by(col(CommandOutput.command_id))
    )
    # a command whose stream was cut (here, or by its source's budget) keeps nothing more
    stored: dict[str, int] = {
        row[0]: cap_bytes if row[2] else int(row[1]) for row in (await session.exec(sums)).all()
    }
    now = utcnow()
    rows: list[dict[str, Any]] = []
    for chunk in sorted(chunks, key=lambda c: (c.command_id, c.seq)):
        if owners.get(chunk.command_id) != chunk.host_id:
            continue
        spent = int(stored.get(chunk.command_id, 0))
        if spent >= cap_bytes:
            continue
        data, truncated = chunk.data, chunk.truncated
        size = len(data.encode())
        if spent + size > cap_bytes:
            data, truncated = _cut(data, cap_bytes - spent), True
            size = len(data.encode())
            stored[chunk.command_id] = cap_bytes  # nothing more of it is kept
        else:
            stored[chunk.command_id] = spent + size
        rows.append(
            {
                "command_id": chunk.command_id,
                "seq": chunk.seq,
                "stream": chunk.stream,
                "data": data,
                "size": size,
                "truncated": truncated,
                "created_at": now,
            }
        )
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert(CommandOutput).values(rows).on_conflict_do_nothing(index_elements=["command_id", "seq"])
    result = await session.exec(stmt)
    await session.commit()
    return int(result.rowcount)


async def read_chunks(
    session: AsyncSession, command_id: str, after_seq: int, limit: int = 1000
) -> Sequence[CommandOutput]:
    """The stored chunks of `command_id` with seq > `after_seq`, in order (at most `limit`)."""
    stmt = (
        select(CommandOutput)
        .where(col(CommandOutput.command_id) == command_id)
        .where(col(CommandOutput.seq) > after_seq)
        .order_by(col(CommandOutput.seq))
        .limit(limit)
    )
    return (await session.exec(stmt)).all()


async def purge(session: AsyncSession, before: datetime) -> int:
    """Delete chunks stored before `before` (commits); return how many."""
    result = await session.exec(delete(CommandOutput).where(col(CommandOutput.created_at) < before))
    await session.commit()
    return int(result.rowcount)
