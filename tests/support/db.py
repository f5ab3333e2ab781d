"""Fresh databases for the API tests (a new PostgreSQL database or SQLite file per test), and the API
app driven in-process with its lifespan running.

PostgreSQL: ``CREATE DATABASE warlock_test_<random>`` on 127.0.0.1:5432 as user ``postgres`` (trust auth),
dropped ``WITH (FORCE)`` afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from services.api.http.deps import ApiState
from services.api.main import create_app
from services.api.settings import ApiSettings
from tests.support.natsserver import server_at

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_ADMIN_URL = f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/test"
BACKENDS = ("sqlite", "postgresql")
T = TypeVar("T")


def pg_url(name: str) -> str:
    """Async URL of database `name` on the test PostgreSQL."""
    return f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/{name}"


async def pg_admin(sql: str) -> None:
    """Run `sql` on the test PostgreSQL as its superuser, outside a transaction."""
    engine = create_async_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(sql))
    finally:
        await engine.dispose()


async def create_pg_database() -> str:
    """Create a fresh, empty PostgreSQL database; return its name."""
    name = f"warlock_test_{uuid.uuid4().hex[:12]}"
    await pg_admin(f'CREATE DATABASE "{name}"')
    return name


async def drop_pg_database(name: str) -> None:
    """Drop a test database, closing whatever is connected to it."""
    await pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def fresh_database(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """Yield the URL of a new empty database of `backend` ("sqlite" or "postgresql"); drop it after."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / f'warlock-{uuid.uuid4().hex[:8]}.db'}"
        return
    name = await create_pg_database()
    try:
        yield pg_url(name)
    finally:
        await drop_pg_database(name)


def api_settings(tmp_path: Path, nats_url: str, database_url: str, **values: Any) -> ApiSettings:
    """Settings for an in-process API: the test's NATS and database, the key files under `tmp_path` (the
    signing key is `tests.support.trust.TestSigner(tmp_path)`'s file)."""
    values.setdefault("api_key_file", tmp_path / "state" / "api-key")
    values.setdefault("signing_key_file", tmp_path / "signing.key")
    server = server_at(nats_url)
    if server is not None:
        values.setdefault("nats_nkey_file", server.nkey_file("api"))  # connects as the api role
    return ApiSettings(nats_url=nats_url, database_url=database_url, **values)


@dataclass
class RunningApi:
    """An app with its lifespan running, an HTTP client on it, and the bootstrap key (if one was written)."""

    app: FastAPI
    client: httpx.AsyncClient
    settings: ApiSettings
    key: str

    @property
    def state(self) -> ApiState:
        """The app's state (engine, sessions, NATS connection)."""
        state: ApiState = self.app.state.api
        return state

    @property
    def auth(self) -> dict[str, str]:
        """Headers carrying the bootstrap key."""
        return {"Authorization": f"Bearer {self.key}"}


@contextlib.asynccontextmanager
async def running_api(settings: ApiSettings) -> AsyncIterator[RunningApi]:
    """Run `create_app(settings)` in-process (lifespan included), with an httpx client on it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=60) as client:
            key_file = settings.api_key_file
            key = key_file.read_text().strip() if key_file.exists() else ""
            yield RunningApi(app, client, settings, key)


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = 10.0) -> T:
    """Poll `check` until it returns something other than None/False; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)
