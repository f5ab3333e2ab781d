"""``/api/hosts``: add (SSH check, key pinned, agent install), list, show, delete, exec, command history."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.errors import DomainError
from services.api.fleet.probe import probe_host
from services.api.http.auth import ADMIN, OPERATE, READ, check_host, in_scope, scoped
from services.api.http.deps import SessionDep, StateDep, api_key_info, api_key_name, app_state
from services.api.http.errors import status_of
from services.api.http.routes.jobs import parse_label_selectors
from services.api.http.schemas import (
    AgentInstallBody,
    CommandRunPublic,
    ExecBody,
    HostAddPublic,
    HostCreate,
    HostPublic,
    InstallFailedPublic,
)
from services.api.store import crud
from services.api.store.jobs import labels_match
from services.api.store.models import Host

router = APIRouter(prefix="/hosts", tags=["hosts"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "unknown host"}}
OUT_OF_SCOPE: dict[int | str, dict[str, Any]] = {403: {"description": "the host is outside the key's scope"}}


@router.post(
    "",
    response_model=HostAddPublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        409: {"description": "a host with this id or address exists"},
        422: {"description": "bad body, or the SSH check failed (connect_failed, auth_failed ...)"},
        503: {"description": "no SSH worker answered the check, or NATS is unavailable"},
    },
    dependencies=[ADMIN],
)
async def add_host(body: HostCreate, state: StateDep, session: SessionDep) -> HostAddPublic:
    """Register a host; with ``ssh_check`` (default) probe it over SSH and pin its host key.

    With ``install_agent`` the agent is installed next; its outcome (the agent's public key, or why it
    failed) is under ``install``: the host stays added either way.
    """
    if body.ssh_check:  # the probe (and an install) go over NATS: refuse before anything is written
        state.require_nats()
    await crud.check_new_host(session, body.id, body.address)
    await session.commit()  # release the connection while the probe runs
    host_key = fingerprint = None
    if body.ssh_check:
        ok = await probe_host(
            state.nc,
            state.signer,
            body.id,
            body.address,
            body.ssh_port,
            body.ssh_user,
            wait_s=state.settings.probe_timeout,
        )
        host_key, fingerprint = ok.host_key, ok.fingerprint
    host = await crud.create_host(session, body, host_key, fingerprint)
    added = HostAddPublic.model_validate(host, from_attributes=True)
    if body.install_agent:
        try:
            added.install = await state.lifecycle.install(host, AgentInstallBody(mode=body.install_mode))
        except DomainError as exc:
            added.install = InstallFailedPublic.model_validate(
                {**exc.extra, "status": status_of(exc), "detail": exc.detail, "code": exc.code}
            )
    return added


LabelQuery = Annotated[
    list[str] | None,
    Query(description="k=v: the label equals v; k: the host has label k; repeated: all must match"),
]


async def visible_hosts(session: AsyncSession, request: Request, label: list[str] | None) -> list[Host]:
    """The hosts the request's key may see (its scope) matching every ``label`` selector (422 for a
    malformed one)."""
    selectors = parse_label_selectors(label or [])
    hosts = list(await crud.list_hosts(session))
    if (key := scoped(request)) is not None:
        hosts = [h for h in hosts if in_scope(key.scope, h.labels)]
    if selectors:
        hosts = [h for h in hosts if labels_match(h.labels, selectors)]
    return hosts


@router.get(
    "",
    response_model=list[HostPublic],
    responses={422: {"description": "malformed label"}},
    dependencies=[READ],
)
async def list_hosts(session: SessionDep, request: Request, label: LabelQuery = None) -> list[HostPublic]:
    """Every host, or those whose labels match every ``label`` selector (a scoped key: within its scope)."""
    hosts = await visible_hosts(session, request, label)
    return [HostPublic.model_validate(h, from_attributes=True) for h in hosts]


@router.get(
    "/{host}", response_model=HostPublic, responses={**NOT_FOUND, **OUT_OF_SCOPE}, dependencies=[READ]
)
async def get_host(host: str, session: SessionDep, request: Request) -> HostPublic:
    """One host, by id or address."""
    found = await crud.get_host(session, host)
    check_host(request, found.id, found.labels)
    return HostPublic.model_validate(found, from_attributes=True)


@router.delete(
    "/{host}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**NOT_FOUND, 503: {"description": "NATS unavailable: the live session could not be closed"}},
    dependencies=[ADMIN],
)
async def delete_host(host: str, state: StateDep, session: SessionDep) -> Response:
    """Remove a host and its agent record, then revoke every token of the host: a live agent session is
    closed (4003) and cannot come back. Command history is kept. Without NATS nothing is deleted (503)."""
    state.require_nats()
    found = await crud.get_host(session, host)
    host_id = found.id
    await crud.delete_host(session, found)  # first: an agent reconnecting after the close finds no token
    await state.lifecycle.revoke(host_id, None)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{host}/exec",
    response_model=CommandRunPublic,
    responses={
        **NOT_FOUND,
        **OUT_OF_SCOPE,
        503: {"description": "database or NATS unavailable: nothing was sent"},
    },
    dependencies=[OPERATE],
)
async def exec_command(host: str, body: ExecBody, request: Request) -> CommandRunPublic | JSONResponse:
    """Run a command: by the agent if one is connected, else over SSH; the answer says which (`via`).

    With ``?async=true``: 202 ``{command_id, status: "pending"}`` and ``Location: /api/commands/{id}`` as
    soon as the run is recorded; the command runs on in the API (GET the command for its outcome)."""
    # no further dependencies (state, runner, key name): FastAPI resolves each on every command
    state = app_state(request)
    state.require_db()
    state.require_nats()
    if api_key_info(request).scope:  # one more lookup, for scoped keys only
        async with state.sessions() as session:
            found = await crud.get_host(session, host)
        check_host(request, found.id, found.labels)
    requested_by = f"api-key:{api_key_name(request)}"
    if request.query_params.get("async") is not None and exec_async(request.query_params.getlist("async")):
        command_id = await state.runner.run_async(host, body, requested_by=requested_by)
        return JSONResponse(
            {"command_id": command_id, "status": "pending"},
            status_code=status.HTTP_202_ACCEPTED,
            headers={"Location": f"/api/commands/{command_id}"},
        )
    return await state.runner.run(host, body, requested_by=requested_by)


def exec_async(values: list[str]) -> bool:
    """The ``async`` query parameter: ``true`` or ``false`` once (422 naming the parameter otherwise)."""
    if len(values) == 1 and values[0] in ("true", "false"):
        return values[0] == "true"
    raise RequestValidationError(
        [{"type": "bool_parsing", "loc": ("query", "async"), "msg": "true or false", "input": values}]
    )


@router.get(
    "/{host}/commands",
    response_model=list[CommandRunPublic],
    responses={**NOT_FOUND, **OUT_OF_SCOPE},
    dependencies=[READ],
)
async def list_commands(
    host: str, session: SessionDep, request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> list[CommandRunPublic]:
    """The host's command runs, newest first."""
    found = await crud.get_host(session, host)
    check_host(request, found.id, found.labels)
    runs = await crud.list_runs(session, found.id, limit)
    return [CommandRunPublic.model_validate(r, from_attributes=True) for r in runs]
