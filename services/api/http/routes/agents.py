"""``/api/agents``: the AgentConnection records and the agent lifecycle (install, uninstall, health, re-key).

Install and regenerate-token make the agent's token on its host: nobody sees it, only its SHA-256 is
stored. The one token the API makes is the pull token (``/pull-token``), shown once, for a host that
installs itself from ``GET /agent/install.sh``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from services.api.http.auth import ADMIN, READ, check_host, in_scope, scoped
from services.api.http.deps import LifecycleDep, SessionDep
from services.api.http.schemas import (
    AgentHealthPublic,
    AgentInstallBody,
    AgentInstallPublic,
    AgentPrefixBody,
    AgentPublic,
    AgentRegenerateBody,
    AgentUninstallPublic,
    PullTokenPublic,
    TokenRegeneratedPublic,
)
from services.api.store import crud
from services.api.store.models import AgentConnection, AgentStatus, Host

router = APIRouter(prefix="/agents", tags=["agents"])

Responses = dict[int | str, dict[str, Any]]
NOT_FOUND: Responses = {404: {"description": "unknown host"}}
SSH_OP: Responses = {
    **NOT_FOUND,
    422: {"description": "bad body, or the worker could not reach / log in to the host (code)"},
    502: {"description": "the SSH worker reported another typed error (code, description)"},
    503: {"description": "no SSH worker is running (nothing changed), or no agent wheel"},
    504: {"description": "the SSH worker did not finish in time; it may still be running"},
}


async def _host(session: SessionDep, ref: str) -> Host:
    """The host by id or address, with the request's database connection released (NATS work follows)."""
    found = await crud.get_host(session, ref)
    await session.commit()
    return found


@router.get("", response_model=list[AgentPublic], dependencies=[READ])
async def list_agents(session: SessionDep, request: Request) -> list[AgentPublic]:
    """Every host's agent record (a scoped key: of the hosts within its scope)."""
    agents = await crud.list_agents(session)
    if (key := scoped(request)) is not None:
        visible = {h.id for h in await crud.list_hosts(session) if in_scope(key.scope, h.labels)}
        agents = [a for a in agents if a.host_id in visible]
    return [AgentPublic.model_validate(a, from_attributes=True) for a in agents]


@router.get("/{host}", response_model=AgentPublic, responses=NOT_FOUND, dependencies=[READ])
async def get_agent(host: str, session: SessionDep, request: Request) -> AgentPublic:
    """One host's agent state (by host id or address); a host without agent record is disconnected."""
    found = await crud.get_host(session, host)
    check_host(request, found.id, found.labels)
    agent = await crud.get_agent(session, found.id)
    if agent is None:
        agent = AgentConnection(host_id=found.id, status=AgentStatus.DISCONNECTED)
    return AgentPublic.model_validate(agent, from_attributes=True)


@router.post(
    "/{host}/install",
    response_model=AgentInstallPublic,
    responses={
        **SSH_OP,
        409: {
            "description": "no pinned host key (add the host with ssh_check), or no systemd: retry with "
            '{"mode": "direct"} (body has the steps and a hint; nothing changed)'
        },
    },
    dependencies=[ADMIN],
)
async def install_agent(
    host: str, session: SessionDep, lifecycle: LifecycleDep, body: AgentInstallBody | None = None
) -> AgentInstallPublic:
    """Install or upgrade the agent over SSH: the host makes the agent's key and a new token (nobody sees
    it; its hash and the public key are stored, the old token is revoked)."""
    return await lifecycle.install(await _host(session, host), body or AgentInstallBody())


@router.post("/{host}/uninstall", response_model=AgentUninstallPublic, responses=SSH_OP, dependencies=[ADMIN])
async def uninstall_agent(
    host: str, session: SessionDep, lifecycle: LifecycleDep, body: AgentPrefixBody | None = None
) -> AgentUninstallPublic:
    """Stop and remove the agent over SSH, revoke its token, delete its record; a clean host is fine."""
    return await lifecycle.uninstall(await _host(session, host), body or AgentPrefixBody())


@router.post("/{host}/health", response_model=AgentHealthPublic, responses=NOT_FOUND, dependencies=[ADMIN])
async def agent_health(host: str, session: SessionDep, lifecycle: LifecycleDep) -> AgentHealthPublic:
    """Ping the agent through its gateway (latency on the API's clock); else check SSH reachability."""
    return await lifecycle.health(await _host(session, host))


@router.post(
    "/{host}/regenerate-token",
    response_model=TokenRegeneratedPublic,
    responses=NOT_FOUND,
    dependencies=[ADMIN],
)
async def regenerate_token(
    host: str, session: SessionDep, lifecycle: LifecycleDep, body: AgentRegenerateBody | None = None
) -> TokenRegeneratedPublic:
    """The agent makes itself a new token: live over its session (the hash signed by the agent's key),
    else over SSH; the old token is revoked and its session closed. No token is returned.

    `delivered` null means neither path worked: nothing changed, the previous token stays valid.
    """
    return await lifecycle.regenerate(await _host(session, host), body or AgentRegenerateBody())


@router.post("/{host}/pull-token", response_model=PullTokenPublic, responses=NOT_FOUND, dependencies=[ADMIN])
async def pull_token(host: str, session: SessionDep, lifecycle: LifecycleDep) -> PullTokenPublic:
    """A token for a host that pulls its install (GET /agent/install.sh), returned once: the old token
    stops verifying and its session closes; the install enrolls the agent's public key with it, once."""
    return await lifecycle.pull_token(await _host(session, host))
