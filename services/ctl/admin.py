"""Admin actions on the database, for `warlock api-key create`, `warlock agent-token` and
`warlock signing-keys`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.errors import Conflict
from services.api.settings import ApiSettings
from services.api.store import crud
from services.api.store.db import initialise, make_engine, sessionmaker
from services.api.store.models import OperatorKey
from shared import signing, subjects
from shared.protocol import TokenRevoked, encode
from shared.settings import split_servers

REVOKE_TIMEOUT = 5  # seconds (nats-py types flush timeouts as int)


@contextlib.asynccontextmanager
async def _database(settings: ApiSettings) -> AsyncIterator[AsyncSession]:
    """A session on the API's database (schema created if missing), its engine disposed afterwards."""
    engine = make_engine(settings.database_url)
    try:
        await initialise(engine, settings, bootstrap_key=False)
        async with sessionmaker(engine)() as session:
            yield session
    finally:
        await engine.dispose()


async def create_api_key(settings: ApiSettings, name: str) -> str:
    """Create an API key named `name` (schema created if missing); return the key, shown once."""
    async with _database(settings) as session:
        return await crud.create_api_key(session, name)


OPERATOR_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # also a file name


def default_operator_key_path(name: str) -> Path:
    """Where `warlock signing-keys create NAME` writes the private key: ``$XDG_CONFIG_HOME/warlock/NAME.key``
    (``~/.config/warlock/NAME.key``)."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "warlock" / f"{name}.key"


@dataclass(frozen=True)
class CreatedOperatorKey:
    """A new operator key: where its private half was written, and its public half's id."""

    name: str
    path: Path
    key_id: str
    public_key: str


async def create_operator_key(settings: ApiSettings, name: str, out: Path | None) -> CreatedOperatorKey:
    """Make an Ed25519 key pair for operator `name`: the private key goes to `out` (0600, never
    overwritten), the public key into `OperatorKey`. Conflict on a taken name or an existing file."""
    if not OPERATOR_KEY_NAME.fullmatch(name):
        raise Conflict(f"bad key name {name[:80]!r}: 1-64 of A-Z a-z 0-9 _ . - (starting alphanumeric)")
    path = out if out is not None else default_operator_key_path(name)
    if path.exists():
        raise Conflict(f"{path} exists; choose another --out (a key file is never overwritten)")
    key = signing.generate()
    public, kid = signing.public_text(key), signing.key_id(key)
    async with _database(settings) as session:
        if await crud.get_operator_key(session, kid) is not None:  # 2^-64: never, but cheap to say
            raise Conflict("key id clash; run again")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            signing.save_private(path, key)
        except FileExistsError as exc:
            raise Conflict(f"{path} exists; choose another --out") from exc
        try:
            await crud.create_operator_key(session, name, public, kid)
        except BaseException:
            path.unlink(missing_ok=True)  # no key file without its row
            raise
    return CreatedOperatorKey(name, path, kid, public)


async def list_operator_keys(settings: ApiSettings) -> Sequence[OperatorKey]:
    """Every operator key, revoked ones too."""
    async with _database(settings) as session:
        return await crud.list_operator_keys(session)


async def revoke_operator_key(settings: ApiSettings, name: str) -> OperatorKey:
    """Revoke the operator key `name`: the API refuses what it signs from now on (`forbidden`)."""
    async with _database(settings) as session:
        return await crud.revoke_operator_key(session, name)


async def register_agent_key(settings: ApiSettings, host: str, public_key: str) -> None:
    """Record `public_key` (``ed25519:...``) as the agent key of a registered host (by id or address)."""
    signing.parse_public(public_key)  # ValueError if it is not one
    async with _database(settings) as session:
        found = await crud.get_host(session, host)
        await crud.set_agent_public_key(session, found.id, public_key)


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
    async with _database(settings) as session:
        found = await crud.get_host(session, host)
        token, previous = await crud.replace_agent_token(session, found.id)
        return IssuedToken(found.id, token, previous)


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
                servers=split_servers(nats_url),
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
