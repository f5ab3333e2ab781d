"""Agent health: a ping through the gateway on the API's clock, else an SSH reachability check.

warlock.agent.<host>.ping ── pong_reply ──────▶ connected, via agent, latency_ms (time.perf_counter)
                          ├─ error / timeout ─▶ SSH check, with the agent's error
                          └─ no responders ───▶ SSH check
warlock.ssh.<host>.exec `true` (signed) ── result ──▶ via ssh, reachable (any exit status: the login worked)
                               ├─ error ───▶ via ssh, not reachable, the code
                               └─ no responders ─▶ via null, not reachable
"""

from __future__ import annotations

import time

import nats.errors
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.fleet.runner import ssh_target
from services.api.fleet.signer import ApiSigner
from services.api.http.schemas import AgentHealthPublic
from services.api.settings import ApiSettings
from services.api.store import crud
from services.api.store.models import Host, Via, utcnow
from shared import subjects
from shared.errors import ProtocolError
from shared.ids import new_command_id
from shared.protocol import (
    ErrorReply,
    PingReply,
    PingRequest,
    SshExecRequest,
    decode_exec_reply,
    decode_ping_reply,
    encode,
)

SSH_CHECK_TIMEOUT = 5.0


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


async def check_health(
    nc: NATS,
    sessions: async_sessionmaker[AsyncSession],
    settings: ApiSettings,
    signer: ApiSigner,
    host: Host,
) -> AgentHealthPublic:
    """Ping the agent through its gateway; without a session, check SSH reachability instead."""
    agent_error: str | None = None
    t0 = time.perf_counter()
    try:
        msg = await nc.request(
            subjects.agent_ping(host.id), encode(PingRequest()), timeout=settings.health_timeout
        )
    except nats.errors.NoRespondersError:
        pass
    except nats.errors.TimeoutError:
        agent_error = f"the agent did not answer within {settings.health_timeout:g}s"
    except nats.errors.Error as exc:
        agent_error = f"NATS unavailable: {type(exc).__name__}"
    else:
        latency = _ms(t0)
        try:
            reply = decode_ping_reply(msg.data)
        except ProtocolError as exc:
            agent_error = f"bad ping reply: {exc.message}"
        else:
            if isinstance(reply, PingReply):
                async with sessions() as session:
                    await crud.record_ping(session, host.id, utcnow())
                return AgentHealthPublic(
                    connected=True,
                    via=Via.AGENT,
                    reachable=True,
                    latency_ms=latency,
                    agent_rtt_ms=reply.agent_rtt_ms,
                    gateway_id=reply.gateway_id,
                )
            agent_error = f"{reply.code}: {reply.description}"
    health = await ssh_reachable(nc, settings, signer, host)
    if agent_error is not None:
        health.error = f"agent: {agent_error}" + (f"; ssh: {health.error}" if health.error else "")
    return health


async def ssh_reachable(nc: NATS, settings: ApiSettings, signer: ApiSigner, host: Host) -> AgentHealthPublic:
    """Run ``true`` over SSH through the worker (the runner's target, signed); any exit status: a login."""
    request = SshExecRequest(
        command="true", timeout=SSH_CHECK_TIMEOUT, command_id=new_command_id(), target=ssh_target(host)
    )
    request = signer.sign("ssh_exec", request, host.id)
    wait = settings.ssh_health_timeout
    t0 = time.perf_counter()
    try:
        msg = await nc.request(subjects.ssh_exec(host.id), encode(request), timeout=wait)
    except nats.errors.NoRespondersError:
        return AgentHealthPublic(connected=False, via=None, reachable=False, error="no SSH worker")
    except nats.errors.TimeoutError:
        return AgentHealthPublic(
            connected=False, via=Via.SSH, reachable=False, error=f"no answer in {wait:g}s"
        )
    except nats.errors.Error as exc:
        return AgentHealthPublic(connected=False, via=None, reachable=False, error=type(exc).__name__)
    latency = _ms(t0)
    try:
        reply = decode_exec_reply(msg.data)
    except ProtocolError as exc:
        return AgentHealthPublic(connected=False, via=Via.SSH, reachable=False, error=exc.message)
    if isinstance(reply, ErrorReply):
        error = f"{reply.code}: {reply.description}"
        return AgentHealthPublic(
            connected=False, via=Via.SSH, reachable=False, latency_ms=latency, error=error
        )
    return AgentHealthPublic(connected=False, via=Via.SSH, reachable=True, latency_ms=latency)
