"""A database of schema version 2 (before API key roles, jobs and stored output) is upgraded in place when
the API starts: the new tables made, the new columns added with their defaults, its keys and history kept;
a version it cannot upgrade is refused with a clear error. On real SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.settings import ApiSettings
from services.api.store import crud
from services.api.store.db import SchemaMismatch, initialise, make_engine
from services.api.store.models import SCHEMA_VERSION, CommandRun, KeyRole
from shared.tokens import hash_token

V3_COLUMNS = {
    "api_key": ("role", "scope", "expires_at", "revoked_at", "last_used_at"),
    "command_run": ("job_id",),
}
V3_TABLES = ("job", "command_output")


async def make_v2(database_url: str, tmp_path: Path) -> None:
    """Today's schema with what version 3 added taken away again, a key and a run in it, version 2."""
    engine = make_engine(database_url)
    try:
        settings = ApiSettings(database_url=database_url, api_key_file=tmp_path / "first-key")
        await initialise(engine, settings, bootstrap_key=False)
        async with engine.begin() as conn:
            await conn.execute(text("DROP INDEX IF EXISTS ix_command_run_job_id"))
            for table, columns in V3_COLUMNS.items():
                for column in columns:
                    await conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
            for table in V3_TABLES:
                await conn.execute(text(f"DROP TABLE {table}"))
            now = datetime.now(UTC).replace(tzinfo=None)
            await conn.execute(
                text("INSERT INTO api_key (id, name, key_hash, created_at) VALUES ('k1', 'old', :h, :t)"),
                {"h": hash_token("an-old-key-" + "x" * 40), "t": now},
            )
            await conn.execute(
                text(
                    "INSERT INTO command_run (command_id, host_id, command, timeout, status, stdout, stderr, "
                    "truncated, created_at) VALUES ('c1', 'h1', 'uptime', 30, 'succeeded', 'up', '', "
                    ":f, :t)"
                ),
                {"f": False, "t": now},
            )
            await conn.execute(text("UPDATE schema_version SET version = 2"))
    finally:
        await engine.dispose()


def columns_of(sync_conn: object, table: str) -> set[str]:
    return {c["name"] for c in inspect(sync_conn).get_columns(table)}


def index_names(sync_conn: object) -> set[str | None]:
    return {i["name"] for i in inspect(sync_conn).get_indexes("command_run")}


async def test_a_version_2_database_is_upgraded_at_start_and_keeps_its_keys_and_history(
    database: str, tmp_path: Path
) -> None:
    await make_v2(database, tmp_path)
    engine = make_engine(database)
    try:
        async with engine.connect() as conn:
            assert not set(V3_COLUMNS["api_key"]) & await conn.run_sync(columns_of, "api_key")
        settings = ApiSettings(database_url=database, api_key_file=tmp_path / "key")
        assert await initialise(engine, settings) is None  # the old key is kept: no bootstrap key
        async with engine.connect() as conn:
            for table, columns in V3_COLUMNS.items():
                assert set(columns) <= await conn.run_sync(columns_of, table)
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            assert set(V3_TABLES) <= tables
            indexes = await conn.run_sync(index_names)
            assert "ix_command_run_job_id" in indexes
            version = (await conn.execute(text("SELECT version FROM schema_version"))).scalar_one()
        assert version == SCHEMA_VERSION
        async with AsyncSession(engine, expire_on_commit=False) as session:
            key = await crud.api_key_by_hash(session, hash_token("an-old-key-" + "x" * 40))
            assert key is not None
            assert (key.name, key.role, key.scope, key.expires_at) == ("old", KeyRole.ADMIN, None, None)
            run = await session.get(CommandRun, "c1")
            assert run is not None
            assert (run.stdout, run.job_id) == ("up", None)
        assert await initialise(engine, settings) is None  # a second start: nothing more to do
    finally:
        await engine.dispose()


async def test_a_version_it_cannot_upgrade_is_refused_naming_both_versions(
    database: str, tmp_path: Path
) -> None:
    engine = make_engine(database)
    try:
        settings = ApiSettings(database_url=database, api_key_file=tmp_path / "key")
        await initialise(engine, settings, bootstrap_key=False)
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE schema_version SET version = 1"))
        with pytest.raises(SchemaMismatch) as refused:
            await initialise(engine, settings)
        assert f"version 1, this API needs {SCHEMA_VERSION} and upgrades only from 2" in str(refused.value)
    finally:
        await engine.dispose()


async def test_a_version_3_database_gets_the_metrics_rtt_columns(database: str, tmp_path: Path) -> None:
    """3 → 4 is additive: ``rtt_ms`` on the metrics tables, added at start."""
    engine = make_engine(database)
    try:
        settings = ApiSettings(database_url=database, api_key_file=tmp_path / "first-key")
        await initialise(engine, settings, bootstrap_key=False)
        async with engine.begin() as conn:
            for table in ("metric_sample", "metric_rollup"):
                await conn.execute(text(f"ALTER TABLE {table} DROP COLUMN rtt_ms"))
            await conn.execute(text("UPDATE schema_version SET version = 3"))
        await initialise(engine, settings, bootstrap_key=False)
        async with engine.connect() as conn:
            for table in ("metric_sample", "metric_rollup"):
                assert "rtt_ms" in await conn.run_sync(columns_of, table)
            version = (await conn.execute(text("SELECT version FROM schema_version"))).scalar()
        assert version == SCHEMA_VERSION == 4
    finally:
        await engine.dispose()
