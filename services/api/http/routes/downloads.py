"""``/agent/...``: what a host pulls to install itself (no API key: the host has none), and enrollment.

    curl -fsS http://API/agent/install.sh | WARLOCK_TOKEN=... sh   # or the token on the script's stdin

The token reaches the script on standard input or in ``WARLOCK_TOKEN``, never in its arguments or a URL:
the downloads take no token and serve the same bytes to everyone. The wheel's SHA-256 must come from an
authenticated source: ``GET /api/agent-wheel`` (API key) answers its name, SHA-256 and URL; the
``X-Warlock-Sha256`` header of the plain download says the same but proves nothing (whoever can change
the wheel in transit can change the header). The script checks the hash before changing anything.

``POST /agent/enroll`` (``Authorization: Bearer <the agent's token>``, body ``{host_id, public_key}``):
the pulled install registers the agent's own public key, made on the host. Accepted once per token (while
the host has no key since its pull token was issued; the same key again is fine); a token of another
host, or a second, different key, is refused.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from fastapi import APIRouter, Request, Response

from services.api.errors import Conflict, DependencyUnavailable, NotFound, Unauthorized
from services.api.http.auth import READ
from services.api.http.deps import SessionDep, StateDep
from services.api.http.schemas import AgentWheelPublic, EnrollBody, EnrollPublic
from services.api.store import crud
from services.api.store.models import AgentConnection, utcnow
from shared import signing
from shared.tokens import hash_token, is_well_formed

log = logging.getLogger(__name__)

router = APIRouter(prefix="/agent", tags=["agent downloads"])
api_router = APIRouter(tags=["agent downloads"])  # under /api: the API key is checked by the edge

WHEEL_ALIAS = "warlock_agent.whl"
SHA_HEADER = "X-Warlock-Sha256"
NAME_HEADER = "X-Warlock-Wheel-Name"  # pip needs the real file name: save it under this name


def install_module() -> ModuleType:
    """``shared.install``, imported on first use."""
    return importlib.import_module("shared.install")


def _script(name: str) -> bytes:
    """The named script from ``shared.install`` (loaded lazily: it ships separately)."""
    try:
        text = install_module().script(name)
    except (ImportError, AttributeError, OSError, KeyError, ValueError) as exc:
        log.warning("install script %s unavailable: %s", name, type(exc).__name__)
        raise DependencyUnavailable(f"{name} is not available in this build of the API") from exc
    return text if isinstance(text, bytes) else str(text).encode()


@router.get(
    "/install.sh",
    response_class=Response,
    responses={200: {"content": {"text/x-shellscript": {}}}, 503: {"description": "no script in this build"}},
)
async def install_script() -> Response:
    """The pull installer; give it the token on stdin or in WARLOCK_TOKEN, never in a URL."""
    return Response(_script("install.sh"), media_type="text/x-shellscript")


@router.get(
    "/{name}",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": f"the wheel; {SHA_HEADER} header"},
        404: {"description": "not the agent wheel"},
        503: {"description": "the wheel could not be read or built"},
    },
)
async def agent_wheel(name: str, state: StateDep) -> Response:
    """The agent wheel, as ``warlock_agent.whl`` or by its real file name, with its SHA-256 in a header.

    The name is checked before anything is read or built: any other name is 404 at no cost.
    """
    wheels = state.lifecycle.wheels
    expected = wheels.file_name()
    if name not in (WHEEL_ALIAS, expected):
        raise NotFound(f"unknown file {name[:100]!r}; this API serves {expected} (or {WHEEL_ALIAS})")
    wheel = await wheels.get()
    headers = {
        SHA_HEADER: wheel.sha256,
        NAME_HEADER: wheel.name,
        "Content-Disposition": f'attachment; filename="{wheel.name}"',
    }
    return Response(wheel.data, media_type="application/octet-stream", headers=headers)


@api_router.get("/agent-wheel", response_model=AgentWheelPublic, dependencies=[READ])
async def agent_wheel_info(state: StateDep, request: Request) -> AgentWheelPublic:
    """The agent wheel's file name and SHA-256, from an authenticated source (the API key), where to
    download it, and the API keys the agent must trust: a pull install takes the hash and keys from here,
    never from the download's own header."""
    wheel = await state.lifecycle.wheels.get()
    return AgentWheelPublic(
        name=wheel.name,
        sha256=wheel.sha256,
        url=str(request.url_for("agent_wheel", name=wheel.name)),
        trusted_keys=list(state.signer.trusted_keys),
    )


def _bearer(request: Request) -> str:
    """The agent token of ``Authorization: Bearer``; Unauthorized if absent or malformed (never echoed)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not is_well_formed(token):
        raise Unauthorized("enrollment needs the agent's token: Authorization: Bearer <64 hex>")
    return token


@router.post(
    "/enroll",
    response_model=EnrollPublic,
    responses={
        401: {"description": "no token, or not a token of this host"},
        409: {"description": "this host already enrolled another key with its current token"},
    },
)
async def enroll(body: EnrollBody, request: Request, session: SessionDep) -> EnrollPublic:
    """Register the pulled agent's public key with its token (once per token)."""
    token_hash = hash_token(_bearer(request))
    try:
        signing.parse_public(body.public_key)
    except ValueError as exc:
        raise Conflict(f"public_key: {exc}", code="bad_request") from exc
    host_id = await crud.host_for_token_hash(session, token_hash)
    if host_id is None or host_id != body.host_id:
        raise Unauthorized("not a valid agent token for this host")
    agent = await session.get(AgentConnection, host_id)
    if agent is None:  # pragma: no cover - the token was just found on this record
        raise Unauthorized("not a valid agent token for this host")
    if agent.public_key is not None and agent.public_key != body.public_key:
        raise Conflict(
            f"{host_id} already enrolled key {signing.key_id(agent.public_key)} with this token; issue a new "
            "pull token to enroll another",
            code="already_enrolled",
        )
    agent.public_key = body.public_key
    agent.updated_at = utcnow()
    session.add(agent)
    await session.commit()
    log.info("agent key %s enrolled for %s", signing.key_id(body.public_key), host_id)
    return EnrollPublic(host_id=host_id, key_id=signing.key_id(body.public_key))
