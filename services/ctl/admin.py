"""Admin actions on the database, for `warlock api-key create`, `warlock agent-token` and
`warlock signing-keys`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import nats.errors
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.errors import Conflict
from services.api.settings import ApiSettings
from services.api.store import crud
from services.api.store.db import initialise, make_engine, sessionmaker
from services.api.store.models import KEY_NAME_PATTERN, KeyRole, OperatorKey
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


async def create_api_key(
    settings: ApiSettings,
    name: str,
    role: str = KeyRole.ADMIN.value,
    scope: Sequence[str] = (),
    expires: str | None = None,
) -> str:
    """Create an API key named `name` with `role`, a label `scope` (``k=v`` items; read and operate keys
    only) and an expiry (`parse_expiry`); the schema is created if missing. Return the key, shown once.
    Conflict (code bad_request) on bad input, Conflict on a taken name."""
    if not re.fullmatch(KEY_NAME_PATTERN, name):
        raise Conflict(
            f"bad key name {name[:80]!r}: 1-64 of A-Z a-z 0-9 _ . - (starting alphanumeric)", "bad_request"
        )
    try:
        key_role = KeyRole(role)
    except ValueError:
        raise Conflict(f"bad role {role[:40]!r}: read, operate or admin", "bad_request") from None
    labels = parse_scope(scope)
    if labels is not None and key_role == KeyRole.ADMIN:
        raise Conflict(
            "admin keys cannot be scoped (an admin can create keys); use --role operate", "bad_request"
        )
    expires_at = parse_expiry(expires) if expires is not None else None
    async with _database(settings) as session:
        return await crud.create_api_key(session, name, role=key_role, scope=labels, expires_at=expires_at)


MAX_SCOPE_LABELS = 16
_LABEL_KEY = re.compile(r"^[^=\s]{1,63}$")
_DURATION = re.compile(r"^(\d+)([smhdw]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_scope(items: Sequence[str]) -> dict[str, str] | None:
    """``["role=web", "dc=eu"]`` → ``{"role": "web", "dc": "eu"}``; None for no items; Conflict (code
    bad_request) on an item without ``=``, an empty or repeated key, a value over 255 characters."""
    if not items:
        return None
    labels: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not _LABEL_KEY.fullmatch(k) or len(v) > 255 or k in labels:
            raise Conflict(f"bad scope label {item[:80]!r}: give KEY=VALUE, each key once", "bad_request")
        labels[k] = v
    if len(labels) > MAX_SCOPE_LABELS:
        raise Conflict(f"at most {MAX_SCOPE_LABELS} scope labels", "bad_request")
    return labels


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """A duration from now (``3600``, ``90m``, ``12h``, ``30d``, ``2w``) or an ISO 8601 time with a zone
    (``2030-01-01T00:00:00Z``); Conflict (code bad_request) if neither, zero, or in the past."""
    now = now or datetime.now(UTC)
    match = _DURATION.fullmatch(text.strip())
    if match:
        seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
        if seconds <= 0 or seconds > 10 * 366 * 86400:
            raise Conflict(f"bad --expires {text[:40]!r}: between 1 s and 10 years", "bad_request")
        return now + timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise Conflict(
            f"bad --expires {text[:40]!r}: a duration (3600, 90m, 12h, 30d, 2w) or an ISO time with a zone",
            "bad_request",
        ) from None
    if when.tzinfo is None:
        raise Conflict(f"bad --expires {text[:40]!r}: give a time zone (e.g. Z)", "bad_request")
    if when <= now:
        raise Conflict(f"--expires {text[:40]!r} is in the past", "bad_request")
    return when.astimezone(UTC)


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
