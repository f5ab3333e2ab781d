"""The database: async engine, schema initialisation, the bootstrap API key.

Schema decision: there is no migrations tool yet and exactly one schema (version 1). At start the API runs
``metadata.create_all`` (creates what is missing, never alters) and records ``schema_version``. A database
whose recorded version differs from ours is refused with a clear error instead of being silently used:
the first schema change will bring Alembic, starting from this version row. On PostgreSQL the whole
initialisation runs in one transaction under an advisory lock, so API replicas starting together neither
race on CREATE TABLE nor each create a bootstrap key.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

from sqlalchemy import event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.settings import ApiSettings
from services.api.store import crud
from services.api.store.models import SCHEMA_VERSION, ApiKey, SchemaVersion
from shared.errors import ConfigError

log = logging.getLogger(__name__)

_ADVISORY_LOCK_ID = 0x5741524C  # "WARL"
BOOTSTRAP_KEY_NAME = "bootstrap"


class SchemaMismatch(ConfigError):
    """The database was created by another schema version."""


def make_engine(url: str) -> AsyncEngine:
    """An async engine for `url` (sqlite+aiosqlite or postgresql+asyncpg), with per-backend settings."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": 30}
        path = parsed.database
        if path and path != ":memory:" and not path.startswith("file:"):
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            private_sqlite_file(Path(path))
    elif parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"timeout": 5}
        kwargs["pool_timeout"] = 10
        kwargs["pool_pre_ping"] = True  # a server restart must not fail the next request
    engine = create_async_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def private_sqlite_file(path: Path) -> None:
    """Create the SQLite file 0600 before the first connection (it holds command output; SQLite gives its
    ``-wal`` and ``-shm`` files the main file's mode), and tighten an existing one readable by others."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # empty: a valid database
    except FileExistsError:
        pass
    except OSError as exc:
        log.warning("cannot create %s 0600: %s", path, exc)  # the engine reports it on first connect
        return
    for file in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        try:
            mode = stat.S_IMODE(file.stat().st_mode)
            if mode & 0o077:
                file.chmod(0o600)
                log.warning("%s was readable by others (mode %04o): tightened to 0600", file, mode)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot tighten %s to 0600: %s", file, exc)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL: a commit survives a crash of the API, not a power cut; FULL would fsync every commit
    # (two per command) and dominate the exec path on the embedded default.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (rows are returned after the commit)."""
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def _create_schema(conn: AsyncConnection) -> None:
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _ADVISORY_LOCK_ID})
    await conn.run_sync(SQLModel.metadata.create_all)


async def initialise(engine: AsyncEngine, settings: ApiSettings, bootstrap_key: bool = True) -> Path | None:
    """Create the schema if missing, check its version, create the bootstrap API key on first start.

    Returns the key file path when a bootstrap key was written, else None.
    """
    written: Path | None = None
    async with engine.begin() as conn:
        await _create_schema(conn)
        session = AsyncSession(bind=conn, expire_on_commit=False)
        row = await session.get(SchemaVersion, 1)
        if row is None:
            session.add(SchemaVersion(version=SCHEMA_VERSION))
        elif row.version != SCHEMA_VERSION:
            raise SchemaMismatch(
                "database_url",
                f"database schema version {row.version}, this API needs {SCHEMA_VERSION}: migrate first",
            )
        if bootstrap_key and (await session.exec(select(ApiKey.id).limit(1))).first() is None:  # type: ignore[call-overload]
            key = await crud.create_api_key(session, BOOTSTRAP_KEY_NAME, commit=False)
            write_key_file(settings.api_key_file, key)  # before the commit: a failed commit rewrites it
            written = settings.api_key_file
        await session.flush()
    return written


def write_key_file(path: Path, key: str) -> None:
    """Write `key` to `path` atomically with mode 0600, creating the parent directory with 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, f"{key}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


async def ping(engine: AsyncEngine) -> None:
    """Run ``SELECT 1``; raises the driver's error when the database is unreachable."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
