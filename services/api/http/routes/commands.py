"""``/api/commands``: one command run by id."""

from __future__ import annotations

from fastapi import APIRouter, Request

from services.api.http.auth import READ, check_run_host
from services.api.http.deps import SessionDep
from services.api.http.schemas import CommandRunPublic
from services.api.store import crud

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
    await check_run_host(request, session, run.host_id)
    return CommandRunPublic.model_validate(run, from_attributes=True)
