"""Request dependencies, as ``Annotated`` aliases: the app state, a database session, the API key."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api import crud
from services.api.errors import DatabaseUnavailable, Unauthorized
from services.api.lifecycle import AgentLifecycle
from services.api.runner import Runner
from services.api.settings import ApiSettings
from services.api.tasks import TaskTracker
from shared.tokens import hash_token


class AuthCache:
    """Recently verified API key hashes → key name, for `ttl` seconds (0 disables it)."""

    def __init__(self, ttl: float, size: int = 1024) -> None:
        self.ttl = ttl
        self.size = size
        self._entries: dict[str, tuple[str, float]] = {}

    def get(self, key_hash: str) -> str | None:
        """The cached key name, if fresh."""
        entry = self._entries.get(key_hash)
        if entry is None or entry[1] <= time.monotonic():
            self._entries.pop(key_hash, None)
            return None
        return entry[0]

    def put(self, key_hash: str, name: str) -> None:
        """Remember a verified key."""
        if self.ttl <= 0:
            return
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[key_hash] = (name, time.monotonic() + self.ttl)


@dataclass
class ApiState:
    """Everything the lifespan opened, handed to requests through `app.state.api`."""

    settings: ApiSettings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    nc: NATS
    runner: Runner
    tasks: TaskTracker
    auth_cache: AuthCache
    lifecycle: AgentLifecycle
    db_ready: bool = False
    db_error: str | None = field(default="not initialised yet")


async def get_state(request: Request) -> ApiState:
    """The app's state (set by the lifespan); async, as every dependency here: FastAPI runs a sync one in a
    thread pool, a thread hop per request."""
    state: ApiState = request.app.state.api
    return state


StateDep = Annotated[ApiState, Depends(get_state)]


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    """A session for this request; 503 while the schema is not initialised."""
    if not state.db_ready:
        raise DatabaseUnavailable(f"database unavailable: {state.db_error}")
    async with state.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]

bearer = HTTPBearer(auto_error=False, description="an API key (`warlock api-key create`)")


async def require_api_key(
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The name of the request's API key; 401 when it is missing or unknown."""
    if credentials is None or not credentials.credentials:
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    key_hash = hash_token(credentials.credentials)
    name = state.auth_cache.get(key_hash)
    if name is None:
        if not state.db_ready:
            raise DatabaseUnavailable(f"database unavailable: {state.db_error}")
        async with state.sessions() as session:  # its own short session: no connection held after
            key = await crud.api_key_by_hash(session, key_hash)
        if key is None:
            raise Unauthorized("invalid API key")
        name = key.name
        state.auth_cache.put(key_hash, name)
    return name


ApiKeyDep = Annotated[str, Depends(require_api_key)]


async def get_runner(state: StateDep) -> Runner:
    """The app's hybrid runner."""
    return state.runner


RunnerDep = Annotated[Runner, Depends(get_runner)]


async def get_lifecycle(state: StateDep) -> AgentLifecycle:
    """The app's agent lifecycle (install, uninstall, health, regenerate-token)."""
    return state.lifecycle


LifecycleDep = Annotated[AgentLifecycle, Depends(get_lifecycle)]
