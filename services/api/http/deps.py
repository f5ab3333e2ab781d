"""Request dependencies, as ``Annotated`` aliases (app state, database session, lifecycle), and the API key
check that `services.api.http.edge` runs before the app reads a request."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, Request
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.errors import DatabaseUnavailable, NatsUnavailable, Unauthorized
from services.api.fleet.lifecycle import AgentLifecycle
from services.api.fleet.runner import Runner
from services.api.fleet.signer import ApiSigner
from services.api.fleet.tasks import TaskTracker
from services.api.http.ratelimit import Limit, RateLimiter
from services.api.settings import ApiSettings
from services.api.store import crud
from services.api.store.models import ApiKey, KeyRole, utcnow
from shared.natsx import NatsLink
from shared.tokens import hash_token


@dataclass(frozen=True)
class KeyInfo:
    """What the edge knows of the verified API key of a request: its name, role, label scope, expiry."""

    name: str
    role: KeyRole = KeyRole.ADMIN
    scope: dict[str, str] | None = None
    expires_at: datetime | None = None
    id: str = ""

    @classmethod
    def of(cls, key: ApiKey) -> KeyInfo:
        """The info of a stored key."""
        return cls(
            key.name, KeyRole(key.role), dict(key.scope) if key.scope else None, key.expires_at, key.id
        )

    def expired(self, now: datetime) -> bool:
        """Whether the key's expiry has passed at `now`."""
        return self.expires_at is not None and self.expires_at <= now


class AuthCache:
    """Recently verified API key hashes → key info, for `ttl` seconds (0 disables it)."""

    def __init__(self, ttl: float, size: int = 1024) -> None:
        self.ttl = ttl
        self.size = size
        self._entries: dict[str, tuple[KeyInfo, float]] = {}

    def get(self, key_hash: str) -> KeyInfo | None:
        """The cached key info, if fresh."""
        entry = self._entries.get(key_hash)
        if entry is None or entry[1] <= time.monotonic():
            self._entries.pop(key_hash, None)
            return None
        return entry[0]

    def put(self, key_hash: str, info: KeyInfo) -> None:
        """Remember a verified key."""
        if self.ttl <= 0:
            return
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[key_hash] = (info, time.monotonic() + self.ttl)

    def drop(self, name: str) -> None:
        """Forget the key named `name` (revoked here: refused from the next request on)."""
        for key_hash in [h for h, (info, _) in self._entries.items() if info.name == name]:
            del self._entries[key_hash]


@dataclass
class ApiState:
    """Everything the lifespan opened, handed to requests through `app.state.api`."""

    settings: ApiSettings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    link: NatsLink
    runner: Runner
    tasks: TaskTracker
    auth_cache: AuthCache
    lifecycle: AgentLifecycle
    signer: ApiSigner
    db_ready: bool = False
    db_error: str | None = field(default="not initialised yet")
    limiter: RateLimiter = field(init=False)  # per-key rate limits (`services.api.http.auth`)

    def __post_init__(self) -> None:
        self.limiter = RateLimiter(
            {
                "read": Limit(self.settings.rate_limit_per_minute, self.settings.rate_limit_burst),
                "exec": Limit(self.settings.exec_rate_limit_per_minute, self.settings.exec_rate_limit_burst),
            }
        )

    @property
    def nc(self) -> NATS:
        """The NATS client (connected or not: see `require_nats`)."""
        return self.link.nc

    def require_db(self) -> None:
        """Raise DatabaseUnavailable (503) while the schema is not initialised."""
        if not self.db_ready:
            raise DatabaseUnavailable(f"database unavailable: {self.db_error}")

    def require_nats(self) -> None:
        """Raise NatsUnavailable (503) while NATS is not connected: nothing is sent, nothing recorded."""
        if not self.link.connected:
            why = self.link.problem or "reconnecting"
            raise NatsUnavailable(f"NATS unavailable ({why}): nothing was sent")


def app_state(request: Request) -> ApiState:
    """The app's state (set by the lifespan)."""
    state: ApiState = request.app.state.api
    return state


async def get_state(request: Request) -> ApiState:
    """`app_state` as a dependency; async, as every dependency here: FastAPI runs a sync one in a thread
    pool, a thread hop per request."""
    return app_state(request)


StateDep = Annotated[ApiState, Depends(get_state)]


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    """A session for this request; 503 while the schema is not initialised."""
    state.require_db()
    async with state.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]

SECURITY_SCHEME = "ApiKey"  # the OpenAPI name of the bearer scheme (see `document_api_key`)
MISSING_KEY = "missing API key: send Authorization: Bearer <key>"
LAST_USED_EVERY = timedelta(seconds=60)  # an API key's last_used_at is written at most this often


async def verify_api_key(state: ApiState, authorization: str) -> KeyInfo:
    """The API key of an ``Authorization`` header value; Unauthorized (401) when it is missing, unknown,
    revoked or expired, DatabaseUnavailable (503) when it is not cached and the database is not ready.

    Called by `services.api.http.edge.ApiEdge` before the app reads anything of the request. A cached key
    is trusted for `auth_cache_ttl` seconds: a key revoked on another API instance stops working here
    within that time (at once on the instance that revoked it, which drops it from its cache). Expiry is
    checked on every request, cached or not.
    """
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized(MISSING_KEY)
    key_hash = hash_token(key)
    info = state.auth_cache.get(key_hash)
    now = utcnow()
    if info is None:
        state.require_db()
        async with state.sessions() as session:  # its own short session: no connection held after
            found = await crud.api_key_by_hash(session, key_hash)
            if found is None:
                raise Unauthorized("invalid API key")
            if found.revoked_at is not None:
                raise Unauthorized(f"API key {found.name!r} was revoked", code="key_revoked")
            try:
                info = KeyInfo.of(found)
            except (ValueError, TypeError):  # a row edited by hand: refuse rather than guess a role
                raise Unauthorized(
                    f"API key {found.name!r} has an invalid role or scope", code="bad_key"
                ) from None
            if not info.expired(now) and (
                found.last_used_at is None or found.last_used_at < now - LAST_USED_EVERY
            ):
                await crud.touch_api_key(session, found.id, now, now - LAST_USED_EVERY)
        state.auth_cache.put(key_hash, info)
    if info.expired(now):
        assert info.expires_at is not None
        raise Unauthorized(
            f"API key {info.name!r} expired at {info.expires_at.isoformat()}", code="key_expired"
        )
    return info


def api_key_info(request: Request) -> KeyInfo:
    """The key the edge verified for this request (``request.state.api_key_info``; ``/api`` routes only)."""
    info = getattr(request.state, "api_key_info", None)
    if not isinstance(info, KeyInfo):
        raise Unauthorized(MISSING_KEY)
    return info


def api_key_name(request: Request) -> str:
    """The key name the edge verified for this request (``request.state.api_key``; ``/api`` routes only)."""
    name = getattr(request.state, "api_key", None)
    if not isinstance(name, str):
        raise Unauthorized(MISSING_KEY)
    return name


KEY_RESPONSES = {
    "401": "no key, or an unknown, expired (key_expired) or revoked (key_revoked) key",
    "403": "outside the key's role (forbidden) or label scope (out_of_scope)",
    "429": "the key's rate limit is spent (rate_limited); Retry-After says when to retry",
}


def document_api_key(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare the bearer scheme in an OpenAPI `schema` and require it on every ``/api`` operation."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[SECURITY_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key (`warlock api-key create`)",
    }
    for path, operations in schema.get("paths", {}).items():
        if path.startswith("/api/"):
            for operation in operations.values():
                operation["security"] = [{SECURITY_SCHEME: []}]
                for code, text in KEY_RESPONSES.items():
                    operation.setdefault("responses", {}).setdefault(code, {"description": text})
    return schema


async def get_lifecycle(state: StateDep) -> AgentLifecycle:
    """The app's agent lifecycle (install, uninstall, health, regenerate-token); 503 without NATS."""
    state.require_nats()
    return state.lifecycle


LifecycleDep = Annotated[AgentLifecycle, Depends(get_lifecycle)]
