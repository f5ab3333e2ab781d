"""Database operations: one small async function per question or change; no HTTP or NATS here."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import bindparam, delete, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, or_, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.errors import Conflict, NotFound
from services.api.http.schemas import HostCreate
from services.api.store.models import (
    AgentConnection,
    AgentStatus,
    ApiKey,
    CommandRun,
    CommandStatus,
    Host,
    KeyRole,
    OperatorKey,
    UtcDateTime,
    utcnow,
)
from services.api.store.runstore import HostTarget, NewRun
from shared.ids import is_host_id
from shared.protocol import PresenceConnected, PresenceDisconnected
from shared.tokens import generate_token, hash_token, hashes_equal

# ----------------------------------------------------------------------------- hosts


async def find_host(session: AsyncSession, ref: str) -> Host | None:
    """The host whose id is `ref`, else whose address is `ref`, else None."""
    if is_host_id(ref):
        host = await session.get(Host, ref)
        if host is not None:
            return host
    return (await session.exec(select(Host).where(Host.address == ref))).first()


async def get_host(session: AsyncSession, ref: str) -> Host:
    """The host named by id or address; NotFound otherwise."""
    host = await find_host(session, ref)
    if host is None:
        raise NotFound(f"unknown host {ref[:100]!r}")
    return host


async def list_hosts(session: AsyncSession) -> Sequence[Host]:
    """Every host, by id."""
    return (await session.exec(select(Host).order_by(col(Host.id)))).all()


async def check_new_host(session: AsyncSession, host_id: str, address: str) -> None:
    """Raise Conflict when a host with this id or address exists."""
    clash = (await session.exec(select(Host).where(or_(Host.id == host_id, Host.address == address)))).first()
    if clash is not None:
        which = "id" if clash.id == host_id else "address"
        raise Conflict(f"a host with this {which} exists: {clash.id}")


async def create_host(
    session: AsyncSession, body: HostCreate, host_key: str | None, fingerprint: str | None
) -> Host:
    """Insert a host (with its pinned key, if any) and commit; Conflict on a duplicate id or address."""
    host = Host(
        id=body.id,
        address=body.address,
        ssh_port=body.ssh_port,
        ssh_user=body.ssh_user,
        labels=dict(body.labels),
        host_key=host_key,
        host_key_fingerprint=fingerprint,
    )
    session.add(host)
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict(f"a host with this id or address exists: {body.id}") from exc
    return host


async def delete_host(session: AsyncSession, host: Host) -> None:
    """Delete a host and its agent record (command history is kept) and commit."""
    await session.exec(delete(AgentConnection).where(col(AgentConnection.host_id) == host.id))
    await session.delete(host)
    await session.commit()


# ----------------------------------------------------------------------------- agents


async def list_agents(session: AsyncSession) -> Sequence[AgentConnection]:
    """Every agent record, by host id."""
    return (await session.exec(select(AgentConnection).order_by(col(AgentConnection.host_id)))).all()


async def get_agent(session: AsyncSession, host_id: str) -> AgentConnection | None:
    """The agent record of `host_id`, if any."""
    return await session.get(AgentConnection, host_id)


async def issue_agent_token(session: AsyncSession, host_id: str) -> str:
    """Generate an agent token for a registered host, store only its hash, commit, return it once.

    Any previous token of the host stops being valid.
    """
    return (await replace_agent_token(session, host_id))[0]


async def replace_agent_token(session: AsyncSession, host_id: str) -> tuple[str, str | None]:
    """As `issue_agent_token`, also returning the hash it replaced (None: the host had no token)."""
    if await session.get(Host, host_id) is None:
        raise NotFound(f"unknown host {host_id[:100]!r}")
    token = generate_token()
    agent = await session.get(AgentConnection, host_id)
    if agent is None:
        agent = AgentConnection(host_id=host_id, status=AgentStatus.DISCONNECTED)
    previous = agent.token_hash
    agent.token_hash = hash_token(token)
    agent.updated_at = utcnow()
    session.add(agent)
    await session.commit()
    return token, previous


async def restore_agent_token(
    session: AsyncSession, host_id: str, current_hash: str, previous_hash: str | None
) -> bool:
    """Put `previous_hash` back if the stored hash is still `current_hash`; commit; return whether it did."""
    result = await session.exec(
        update(AgentConnection)
        .where(col(AgentConnection.host_id) == host_id)
        .where(col(AgentConnection.token_hash) == current_hash)
        .values(token_hash=previous_hash, updated_at=utcnow())
    )
    await session.commit()
    return bool(result.rowcount)


async def delete_agent(session: AsyncSession, host_id: str) -> tuple[bool, str | None]:
    """Delete the host's agent record and commit; return whether one existed and its token hash."""
    agent = await session.get(AgentConnection, host_id)
    if agent is None:
        return False, None
    token_hash = agent.token_hash
    await session.delete(agent)
    await session.commit()
    return True, token_hash


async def agent_for_token_hash(session: AsyncSession, token_hash: str) -> AgentConnection | None:
    """The agent whose stored token hash equals `token_hash` (compared in constant time), else None."""
    agent = (
        await session.exec(select(AgentConnection).where(AgentConnection.token_hash == token_hash))
    ).first()
    if agent is None or agent.token_hash is None or not hashes_equal(agent.token_hash, token_hash):
        return None
    return agent


async def agents_for_token_hashes(
    session: AsyncSession, token_hashes: Iterable[str]
) -> dict[str, tuple[str, str | None]]:
    """In one query: for each of `token_hashes` that is an agent's current token hash, that hash →
    (host id, agent public key). Hashes of no agent are absent; the match is exact (stored == asked)."""
    wanted = set(token_hashes)
    if not wanted:
        return {}
    statement = select(AgentConnection.host_id, AgentConnection.public_key, AgentConnection.token_hash).where(
        col(AgentConnection.token_hash).in_(wanted)
    )
    found: dict[str, tuple[str, str | None]] = {}
    for host_id, public_key, stored in (await session.exec(statement)).all():
        if stored is not None and stored in wanted:
            found[stored] = (host_id, public_key)
    return found


async def host_for_token_hash(session: AsyncSession, token_hash: str) -> str | None:
    """The host whose stored token hash equals `token_hash` (compared in constant time), else None."""
    agent = await agent_for_token_hash(session, token_hash)
    return None if agent is None else agent.host_id


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class PresenceRow(NamedTuple):
    """What recording a presence event needs to know of a registered host (`presence_rows`)."""

    public_key: str | None  # the agent's key (None: no agent record yet, or no key recorded yet)
    session_id: str | None
    connected_at: datetime | None


def presence_time(ts: float) -> datetime:
    """A presence event's `at` as stored."""
    return _at(ts)


async def presence_rows(session: AsyncSession, host_ids: Iterable[str]) -> dict[str, PresenceRow]:
    """In one query: each registered host of `host_ids` → its agent's key and recorded session (hosts
    that are not registered are absent; a host with no agent record has all None)."""
    wanted = set(host_ids)
    if not wanted:
        return {}
    statement = (
        select(Host.id, AgentConnection.public_key, AgentConnection.session_id, AgentConnection.connected_at)
        .select_from(Host)
        .outerjoin(AgentConnection, col(AgentConnection.host_id) == col(Host.id))
        .where(col(Host.id).in_(wanted))
    )
    return {
        host_id: PresenceRow(public_key, session_id, connected_at)
        for host_id, public_key, session_id, connected_at in (await session.exec(statement)).all()
    }


_CONNECTED = (
    update(AgentConnection)
    .where(col(AgentConnection.host_id) == bindparam("b_host"))
    # a newer session already recorded is not overwritten by an older one's (late) connect
    .where(
        or_(
            col(AgentConnection.session_id) == bindparam("b_session"),
            col(AgentConnection.connected_at).is_(None),
            col(AgentConnection.connected_at) <= bindparam("b_at", type_=UtcDateTime()),
        )
    )
    .values(
        session_id=bindparam("b_session"),
        gateway_id=bindparam("b_gateway"),
        agent_version=bindparam("b_version"),
        hostname=bindparam("b_hostname"),
        platform=bindparam("b_platform"),
        connected_at=bindparam("b_at", type_=UtcDateTime()),
        status=str(AgentStatus.CONNECTED),
        updated_at=bindparam("b_now", type_=UtcDateTime()),
    )
)
_DISCONNECTED = (
    update(AgentConnection)
    .where(col(AgentConnection.host_id) == bindparam("b_host"))
    .where(col(AgentConnection.session_id) == bindparam("b_session"))
    .values(status=str(AgentStatus.DISCONNECTED), updated_at=bindparam("b_now", type_=UtcDateTime()))
)


async def record_presence_batch(
    session: AsyncSession,
    connected: Sequence[PresenceConnected],
    disconnected: Sequence[PresenceDisconnected],
) -> None:
    """Apply verified connects and disconnects (at most one per host) with one executemany each, then
    commit. Guarded in the SQL: a connect never overwrites a newer recorded session, a disconnect changes
    only its own session. Hosts without an agent record are unchanged (a verified connect always has one:
    the agent's key is kept there)."""
    now = utcnow()
    conn = await session.connection()
    if connected:
        rows = [
            {
                "b_host": e.host_id,
                "b_session": e.session_id,
                "b_gateway": e.gateway_id,
                "b_version": e.agent_version,
                "b_hostname": e.hostname,
                "b_platform": e.platform,
                "b_at": _at(e.at),
                "b_now": now,
            }
            for e in connected
        ]
        await conn.execute(_CONNECTED, rows)
    if disconnected:
        await conn.execute(
            _DISCONNECTED,
            [{"b_host": e.host_id, "b_session": e.session_id, "b_now": now} for e in disconnected],
        )
    await session.commit()


async def connected_gateways(session: AsyncSession) -> set[str]:
    """The gateways holding at least one agent recorded connected."""
    rows = await session.exec(
        select(AgentConnection.gateway_id).where(col(AgentConnection.status) == AgentStatus.CONNECTED)
    )
    return {gateway for gateway in rows.all() if gateway is not None}


async def mark_gateway_gone(session: AsyncSession, gateway_id: str) -> int:
    """Mark every agent recorded connected through `gateway_id` disconnected; return how many."""
    result = await session.exec(
        update(AgentConnection)
        .where(col(AgentConnection.gateway_id) == gateway_id)
        .where(col(AgentConnection.status) == AgentStatus.CONNECTED)
        .values(status=AgentStatus.DISCONNECTED, updated_at=utcnow())
    )
    await session.commit()
    return int(result.rowcount or 0)


async def record_ping(session: AsyncSession, host_id: str, at: datetime) -> bool:
    """Set the agent's last_ping; False when the host has no agent record."""
    result = await session.exec(
        update(AgentConnection).where(col(AgentConnection.host_id) == host_id).values(last_ping=at)
    )
    await session.commit()
    return bool(result.rowcount)


# ----------------------------------------------------------------------------- api keys


async def create_api_key(
    session: AsyncSession,
    name: str,
    commit: bool = True,
    role: KeyRole = KeyRole.ADMIN,
    scope: dict[str, str] | None = None,
    expires_at: datetime | None = None,
) -> str:
    """Create an API key named `name`, store only its hash, return the key once; Conflict on a taken name
    (revoked keys' names included: a name always means one key)."""
    if (await session.exec(select(ApiKey).where(ApiKey.name == name))).first() is not None:
        raise Conflict(f"an API key named {name!r} exists")
    key = generate_token()
    row = ApiKey(
        id=uuid.uuid4().hex[:16],
        name=name,
        key_hash=hash_token(key),
        role=role,
        scope=scope,
        expires_at=expires_at,
    )
    session.add(row)
    if commit:
        try:
            await session.commit()
        except IntegrityError as exc:  # a concurrent create of the same name
            await session.rollback()
            raise Conflict(f"an API key named {name!r} exists") from exc
    else:
        await session.flush()
    return key


async def api_key_by_hash(session: AsyncSession, key_hash: str) -> ApiKey | None:
    """The API key whose hash equals `key_hash` (compared in constant time), else None."""
    key = (await session.exec(select(ApiKey).where(ApiKey.key_hash == key_hash))).first()
    if key is None or not hashes_equal(key.key_hash, key_hash):
        return None
    return key


async def get_api_key(session: AsyncSession, name: str) -> ApiKey:
    """The API key named `name` (revoked or expired too); NotFound if there is none."""
    key = (await session.exec(select(ApiKey).where(ApiKey.name == name))).first()
    if key is None:
        raise NotFound(f"no API key named {name[:100]!r}")
    return key


async def list_api_keys(session: AsyncSession) -> Sequence[ApiKey]:
    """Every API key (revoked and expired ones too), by name."""
    return (await session.exec(select(ApiKey).order_by(col(ApiKey.name)))).all()


async def revoke_api_key(session: AsyncSession, name: str) -> ApiKey:
    """Mark the key named `name` revoked and commit; NotFound if there is none. Revoking a revoked key
    keeps its first revocation time."""
    key = await get_api_key(session, name)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.add(key)
        await session.commit()
        await session.refresh(key)
    return key


async def touch_api_key(session: AsyncSession, key_id: str, at: datetime, older_than: datetime) -> None:
    """Set the key's `last_used_at` to `at` if it is unset or before `older_than` (one cheap UPDATE)."""
    stale = or_(col(ApiKey.last_used_at).is_(None), col(ApiKey.last_used_at) < older_than)
    await session.exec(update(ApiKey).where(col(ApiKey.id) == key_id).where(stale).values(last_used_at=at))
    await session.commit()


# ----------------------------------------------------------------------------- operator keys


async def create_operator_key(session: AsyncSession, name: str, public_key: str, key_id: str) -> OperatorKey:
    """Store an operator's public key under `name` and commit; Conflict if the name or key is taken
    (revoked names included: a name always means one key)."""
    taken = (await session.exec(select(OperatorKey).where(OperatorKey.name == name))).first()
    if taken is not None:
        raise Conflict(f"an operator key named {name!r} exists")
    key = OperatorKey(key_id=key_id, name=name, public_key=public_key)
    session.add(key)
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict(f"an operator key named {name!r} (or this key) exists") from exc
    return key


async def list_operator_keys(session: AsyncSession) -> Sequence[OperatorKey]:
    """Every operator key (revoked ones too), by name."""
    return (await session.exec(select(OperatorKey).order_by(col(OperatorKey.name)))).all()


async def get_operator_key(session: AsyncSession, key_id: str) -> OperatorKey | None:
    """The operator key with this key id, revoked or not."""
    return await session.get(OperatorKey, key_id)


async def revoke_operator_key(session: AsyncSession, name: str) -> OperatorKey:
    """Mark the key named `name` revoked (commands it signs are refused from now on) and commit; NotFound
    if there is none. Revoking a revoked key keeps its first revocation time."""
    key = (await session.exec(select(OperatorKey).where(OperatorKey.name == name))).first()
    if key is None:
        raise NotFound(f"no operator key named {name[:100]!r}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.add(key)
        await session.commit()
        await session.refresh(key)
    return key


async def set_agent_public_key(session: AsyncSession, host_id: str, public_key: str) -> None:
    """Record the public key of `host_id`'s agent (its hello and results must verify with it); commit."""
    if await session.get(Host, host_id) is None:
        raise NotFound(f"unknown host {host_id[:100]!r}")
    agent = await session.get(AgentConnection, host_id)
    if agent is None:
        agent = AgentConnection(host_id=host_id, status=AgentStatus.DISCONNECTED)
    agent.public_key = public_key
    agent.updated_at = utcnow()
    session.add(agent)
    await session.commit()


# ----------------------------------------------------------------------------- command runs


# REST runs are inserted by services.api.store.runstore (the exec path's plain-SQL writes)


async def start_run(session: AsyncSession, host_id: str, run: NewRun) -> HostTarget | None:
    """Insert `run` as pending for host `host_id` and commit (an operator's command: its id is the
    operator's); None if the host is unknown, Conflict if the command id was used before (a replay)."""
    host = await session.get(Host, host_id)
    if host is None:
        return None
    agent = await session.get(AgentConnection, host_id)
    public_key = None if agent is None else agent.public_key
    gateway_id = agent.gateway_id if agent is not None and agent.status == AgentStatus.CONNECTED else None
    target = HostTarget(
        host.id, host.address, host.ssh_port, host.ssh_user, host.host_key, public_key, gateway_id
    )
    row = CommandRun(
        command_id=run.command_id,
        host_id=host.id,
        command=run.command,
        timeout=run.timeout,
        requested_by=run.requested_by,
        status=CommandStatus.PENDING,
        created_at=run.created_at,
    )
    session.add(row)
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict(f"command id {run.command_id} was used before") from exc
    return target


async def get_run(session: AsyncSession, command_id: str) -> CommandRun:
    """The run with this id; NotFound otherwise."""
    run = await session.get(CommandRun, command_id)
    if run is None:
        raise NotFound(f"unknown command {command_id[:100]!r}")
    return run


async def list_runs(session: AsyncSession, host_id: str, limit: int) -> Sequence[CommandRun]:
    """The host's most recent runs, newest first."""
    stmt = (
        select(CommandRun)
        .where(CommandRun.host_id == host_id)
        .order_by(col(CommandRun.created_at).desc(), col(CommandRun.command_id))
        .limit(limit)
    )
    return (await session.exec(stmt)).all()


async def update_run(
    session: AsyncSession,
    command_id: str,
    values: Mapping[str, Any],
    when: Iterable[CommandStatus],
    host_id: str | None = None,
    unrouted: bool = False,
) -> bool:
    """Set `values` on the run if its status is one of `when` (and its host is `host_id`, if given; and,
    with `unrouted`, it was not routed over SSH: its via is still unset).

    Commits; returns whether the row changed.
    """
    stmt = (
        update(CommandRun)
        .where(col(CommandRun.command_id) == command_id)
        .where(col(CommandRun.status).in_([str(s) for s in when]))
    )
    if host_id is not None:
        stmt = stmt.where(col(CommandRun.host_id) == host_id)
    if unrouted:
        stmt = stmt.where(col(CommandRun.via).is_(None))
    result = await session.exec(stmt.values(**values))
    await session.commit()
    return bool(result.rowcount)
