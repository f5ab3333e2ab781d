"""``/api/agents``: the AgentConnection records."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from services.api import crud
from services.api.deps import SessionDep
from services.api.models import AgentConnection, AgentPublic, AgentStatus

router = APIRouter(prefix="/agents", tags=["agents"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "unknown host"}}


@router.get("", response_model=list[AgentPublic])
async def list_agents(session: SessionDep) -> list[AgentPublic]:
    """Every host's agent record."""
    return [AgentPublic.model_validate(a, from_attributes=True) for a in await crud.list_agents(session)]


@router.get("/{host}", response_model=AgentPublic, responses=NOT_FOUND)
async def get_agent(host: str, session: SessionDep) -> AgentPublic:
    """One host's agent state (by host id or address); a host without agent record is disconnected."""
    found = await crud.get_host(session, host)
    agent = await crud.get_agent(session, found.id)
    if agent is None:
        agent = AgentConnection(host_id=found.id, status=AgentStatus.DISCONNECTED)
    return AgentPublic.model_validate(agent, from_attributes=True)
