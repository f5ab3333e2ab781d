"""``/api/commands``: one command run by id."""

from __future__ import annotations

from fastapi import APIRouter

from services.api.http.deps import SessionDep
from services.api.http.schemas import CommandRunPublic
from services.api.store import crud

router = APIRouter(prefix="/commands", tags=["commands"])


@router.get("/{command_id}", response_model=CommandRunPublic, responses={404: {"description": "unknown"}})
async def get_command(command_id: str, session: SessionDep) -> CommandRunPublic:
    """A command run and its outcome."""
    return CommandRunPublic.model_validate(await crud.get_run(session, command_id), from_attributes=True)
