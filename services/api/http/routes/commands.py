"""``/api/commands``: one command run by id."""

from __future__ import annotations

from fastapi import APIRouter, Request

from services.api.http.auth import READ, check_host, scoped
from services.api.http.deps import SessionDep
from services.api.http.schemas import CommandRunPublic
from services.api.store import crud
from services.api.store.models import Host

router = APIRouter(prefix="/commands", tags=["commands"])


@router.get(
    "/{command_id}",
    response_model=CommandRunPublic,
    responses={404: {"description": "unknown"}, 403: {"description": "its host is outside the key's scope"}},
    dependencies=[READ],
)
async def get_command(command_id: str, session: SessionDep, request: Request) -> CommandRunPublic:
    """A command run and its outcome."""
    run = await crud.get_run(session, command_id)
    if scoped(request) is not None:  # a deleted host's runs are outside every scope
        host = await session.get(Host, run.host_id)
        check_host(request, run.host_id, host.labels if host is not None else None)
    return CommandRunPublic.model_validate(run, from_attributes=True)
