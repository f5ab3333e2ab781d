"""``/api/commands``: one command run by id, and its cancel."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response, status

from services.api.errors import (
    Conflict,
    DependencyUnavailable,
    DomainError,
    RemoteFailed,
    RemoteTimeout,
)
from services.api.fleet.cancel import CancelOutcome, cancel_run
from services.api.http.auth import OPERATE, READ, check_run_host
from services.api.http.deps import SessionDep, app_state
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


CANCEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"description": "the host is killing the command; the run is not final yet (body: the run)"},
    404: {"description": "unknown command id"},
    409: {
        "description": "already finished (code finished) or not running on the host (code not_running); "
        "body: detail, code and the run, unchanged"
    },
    502: {"description": "the host or SSH worker answered a typed error (code), body with the run"},
    503: {"description": "NATS unavailable, or no agent session and no SSH worker for the host"},
    504: {"description": "no answer to the cancel in time; it may or may not have been carried out"},
}

_ERRORS: dict[str, type[DomainError]] = {
    "finished": Conflict,
    "not_running": Conflict,
    "unreachable": DependencyUnavailable,
    "no_answer": RemoteTimeout,
    "failed": RemoteFailed,
}


def run_public(outcome: CancelOutcome) -> CommandRunPublic:
    """The run a cancel outcome carries, as the API answers it."""
    return CommandRunPublic.model_validate(outcome.run, from_attributes=True)


def cancel_error(outcome: CancelOutcome) -> DomainError:
    """The domain error of a cancel that did not (yet) kill anything; its body carries the run."""
    error = _ERRORS[outcome.state]
    extra = {"state": outcome.state, "run": run_public(outcome).model_dump(mode="json")}
    return error(outcome.detail, code=outcome.code or outcome.state, extra=extra)


@router.post(
    "/{command_id}/cancel",
    response_model=CommandRunPublic,
    responses=CANCEL_RESPONSES,
    dependencies=[OPERATE],
)
async def cancel_command(
    command_id: str, request: Request, response: Response, session: SessionDep
) -> CommandRunPublic:
    """Cancel a running command: the agent kills its process group (the SSH worker its remote processes).

    200 with the run, now ``cancelled`` (output up to the kill kept); 202 while the host's result is still
    on its way; 409 when it had already finished (its result stands) or is not running on the host.
    """
    state = app_state(request)
    state.require_db()
    run = await crud.get_run(session, command_id)  # unknown: 404
    await check_run_host(request, session, run.host_id)  # outside the key's scope: 403
    state.require_nats()
    outcome = await cancel_run(state.runner, command_id)
    if outcome.state == "cancelled":
        return run_public(outcome)
    if outcome.state == "cancelling":
        response.status_code = status.HTTP_202_ACCEPTED
        response.headers["Location"] = f"/api/commands/{command_id}"
        return run_public(outcome)
    raise cancel_error(outcome)
