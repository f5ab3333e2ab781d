"""The database: async engine, schema initialisation and upgrade, the bootstrap API key.

Schema decision: no migrations tool yet. At start the API runs ``metadata.create_all`` (creates what is
missing, never alters) and records ``schema_version``. A database of an older version that this API can
upgrade (`UPGRADABLE`: every change since it only added tables, columns and indexes) is upgraded in place
at start: the missing columns are added (nullable, or with their scalar default for the rows already
there) and the missing indexes created, then the version row is moved on. Any other version is refused with
a clear error instead of being silently used; the first change that is not additive brings Alembic. On
PostgreSQL the whole initialisation, upgrade included, runs in one transaction under an advisory lock, so
API replicas starting together neither race on DDL nor each create a bootstrap key.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, event, inspect, select, text
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
        elif row.version in UPGRADABLE:
            added = await conn.run_sync(add_missing_columns)
            log.warning(
                "database schema upgraded from version %d to %d (%s)",
                row.version,
                SCHEMA_VERSION,
                ", ".join(added) or "nothing to add",
            )
            row.version = SCHEMA_VERSION
            session.add(row)
        elif row.version != SCHEMA_VERSION:
            raise SchemaMismatch(
                "database_url",
                f"database schema version {row.version}, this API needs {SCHEMA_VERSION} and upgrades only "
                f"from {', '.join(map(str, sorted(UPGRADABLE)))}: migrate first",
            )
        if bootstrap_key and (await session.exec(select(ApiKey.id).limit(1))).first() is None:  # type: ignore[call-overload]
            key = await crud.create_api_key(session, BOOTSTRAP_KEY_NAME, commit=False)
            write_key_file(settings.api_key_file, key)  # before the commit: a failed commit rewrites it
            written = settings.api_key_file
        await session.flush()
    return written


# versions whose databases differ from this one only by tables, columns and indexes it adds
UPGRADABLE = frozenset({2, 3})  # 2 → 3: API key roles, jobs (command_run.job_id), command output;
# 3 → 4: browser stream tickets (ws_ticket), metric_sample.rtt_ms


def add_missing_columns(conn: Connection) -> list[str]:
    """Add every column and index of the metadata that an existing table lacks; return what was added.

    A column is added nullable, or NOT NULL with its scalar default filling the rows already there (a
    required column without a scalar default cannot be added: ConfigError). Tables that were missing were
    just made by ``create_all``."""
    inspector = inspect(conn)
    preparer = conn.dialect.identifier_preparer
    added: list[str] = []
    for table in SQLModel.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            ddl = f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {preparer.format_column(column)} "
            ddl += column.type.compile(dialect=conn.dialect)
            if not column.nullable:
                default = _literal(column)
                if default is None:
                    what = f"cannot add required column {table.name}.{column.name}"
                    raise ConfigError("database_url", what)
                ddl += f" NOT NULL DEFAULT {default}"
            conn.execute(text(ddl))
            added.append(f"{table.name}.{column.name}")
        indexes = {i["name"] for i in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(conn)
                added.append(f"index {index.name}")
    return added


def _literal(column: Any) -> str | None:
    """The SQL literal of `column`'s scalar default (str, enum, bool, number), else None."""
    default = getattr(column.default, "arg", None)
    if default is None or callable(default):
        return None
    if isinstance(default, bool):
        return "TRUE" if default else "FALSE"
    if isinstance(default, int | float):
        return repr(default)
    if isinstance(default, str):  # a StrEnum too
        return "'" + str(default).replace("'", "''") + "'"
    return None


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
