"""Admin actions on the database, for `warlock api-key create` and `warlock agent-token`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors

from services.api import crud
from services.api.db import initialise, make_engine, sessionmaker
from services.api.settings import ApiSettings
from shared import subjects
from shared.protocol import TokenRevoked, encode

REVOKE_TIMEOUT = 5  # seconds (nats-py types flush timeouts as int)


async def create_api_key(settings: ApiSettings, name: str) -> str:
    """Create an API key named `name` (schema created if missing); return the key, shown once."""
    engine = make_engine(settings.database_url)
    try:
        await initialise(engine, settings, bootstrap_key=False)
        async with sessionmaker(engine)() as session:
            return await crud.create_api_key(session, name)
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class IssuedToken:
    """A new agent token (shown once) and the hash of the one it replaced (None: the host had none)."""

    host_id: str
    token: str
    previous_hash: str | None

    def __repr__(self) -> str:  # never print the token
        return f"IssuedToken(host_id={self.host_id!r}, token=<hidden>)"


async def issue_agent_token(settings: ApiSettings, host: str) -> IssuedToken:
    """Issue a new agent token for a registered host (by id or address); the old one stops verifying."""
    engine = make_engine(settings.database_url)
    try:
        await initialise(engine, settings, bootstrap_key=False)
        async with sessionmaker(engine)() as session:
            found = await crud.get_host(session, host)
            token, previous = await crud.replace_agent_token(session, found.id)
            return IssuedToken(found.id, token, previous)
    finally:
        await engine.dispose()


async def _quiet(_exc: Exception) -> None:
    """NATS error callback: the caller reports the failure (nats-py would log a traceback per attempt)."""


async def revoke_sessions(nats_url: str, host_id: str, options: dict[str, Any] | None = None) -> str | None:
    """Publish on NATS the revocation of every token of `host_id` but the one just issued, which nobody
    holds yet: gateways close the host's live sessions (4003) and forget its cached tokens. None when it
    was published, else why not. `options` are the API identity's `nats.connect` options
    (`shared.natsx.client_options`: its nkey, inbox prefix and TLS).

    Every token rather than only the replaced one's hash: run again after a failure, it still closes a
    session opened with a token two generations back.
    """
    try:
        async with asyncio.timeout(REVOKE_TIMEOUT):
            nc = await nats.connect(
                nats_url,
                connect_timeout=REVOKE_TIMEOUT,
                max_reconnect_attempts=1,  # 0 would mean: retry forever
                reconnect_time_wait=0.2,
                allow_reconnect=False,
                error_cb=_quiet,
                **(options or {}),
            )
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        return f"NATS at {nats_url} unreachable ({type(exc).__name__})"
    try:
        revoked = TokenRevoked(host_id=host_id, token_sha256=None)
        await nc.publish(subjects.TOKEN_REVOKED, encode(revoked))
        await nc.flush(timeout=REVOKE_TIMEOUT)
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        return f"publishing on NATS at {nats_url} failed ({type(exc).__name__})"
    finally:
        await nc.close()
    return None
